//! The boot sequence end to end: the real binary against moto, the IMDSv2 fixture and the ECS
//! agent fixture (see tests/README.md).

use crate::support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{transcript, World};

fn consul_config(world: &World) -> serde_json::Value {
    serde_json::from_str(&world.read("/opt/consul/config/consul-agent.json")).unwrap()
}

#[tokio::test]
async fn boot_starts_the_three_tasks_with_discovered_servers() {
    let world = World::start(&[]);
    let out = world.run_once(&world.config(""));
    assert!(out.status.success(), "{}", transcript(&out));

    let tasks = world.running_tasks().await;
    let families: Vec<&str> = tasks.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(families, ["consul-agent", "consul-registrator", "linkerd"]);
    let started_by = format!("nodeagent/{}", world.info.instance_id);
    assert!(tasks.iter().all(|t| t.1 == started_by), "{tasks:?}");

    let consul = consul_config(&world);
    let mut servers = world.info.server_ips.clone();
    servers.sort_by_key(|ip| ip.parse::<std::net::Ipv4Addr>().unwrap());
    assert_eq!(consul["retry_join"], serde_json::json!(servers));
    for stopped in &world.info.stopped_server_ips {
        assert!(!consul["retry_join"].to_string().contains(stopped.as_str()));
    }
    assert_eq!(consul["advertise_addr"], world.info.local_ipv4.as_str());
    assert_eq!(consul["node_name"], world.info.instance_id.as_str());

    let ecs_config = world.read("/etc/ecs/ecs.config");
    assert_eq!(
        ecs_config.matches("ECS_CLUSTER=").count(),
        1,
        "{ecs_config}"
    );
    assert!(ecs_config.contains("ECS_CLUSTER=l5d-demo\n"));

    let start = world.path("/opt/consul-registrator/bin/start.sh");
    assert_eq!(
        std::fs::metadata(&start).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert!(world
        .read("/opt/consul-registrator/bin/start.sh")
        .contains(&format!(
            "-ip {ip} -retry-attempts -1 consul://{ip}:8500",
            ip = world.info.local_ipv4
        )));
    let linkerd: serde_yaml::Value =
        serde_yaml::from_str(&world.read("/etc/linkerd/linkerd.yaml")).unwrap();
    assert_eq!(
        linkerd["namers"][0]["host"].as_str(),
        Some(world.info.local_ipv4.as_str())
    );
    assert!(world.path("/opt/consul/data").is_dir());
}

#[tokio::test]
async fn reruns_and_an_ecs_agent_restart_never_duplicate() {
    let world = World::start(&[]);
    std::fs::create_dir_all(world.path("/etc/ecs")).unwrap();
    std::fs::write(
        world.path("/etc/ecs/ecs.config"),
        "# from the AMI\nECS_LOGLEVEL=debug\nECS_CLUSTER=l5d-demo\nECS_CLUSTER=l5d-demo\n",
    )
    .unwrap();
    let config = world.config("[ecs.config]\nECS_ENABLE_CONTAINER_METADATA = \"true\"\n");

    let mut ecs_configs = Vec::new();
    let mut task_sets = Vec::new();
    for _ in 0..3 {
        let out = world.run_once(&config);
        assert!(out.status.success(), "{}", transcript(&out));
        ecs_configs.push(world.read("/etc/ecs/ecs.config"));
        task_sets.push(world.running_tasks().await);
    }
    assert_eq!(
        ecs_configs[0],
        "# from the AMI\nECS_LOGLEVEL=debug\nECS_CLUSTER=l5d-demo\nECS_ENABLE_CONTAINER_METADATA=true\n"
    );
    assert!(
        ecs_configs.iter().all(|c| c == &ecs_configs[0]),
        "byte-identical: {ecs_configs:?}"
    );
    assert_eq!(task_sets[0].len(), 3);
    assert!(
        task_sets.iter().all(|t| t == &task_sets[0]),
        "same 3 tasks: {task_sets:?}"
    );

    world
        .control(
            "POST",
            "/agent/restart",
            serde_json::json!({"down_ms": 300}),
        )
        .await;
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", transcript(&out));
    assert_eq!(
        world.running_tasks().await,
        task_sets[0],
        "adopted after the agent restart"
    );
    assert_eq!(world.read("/etc/ecs/ecs.config"), ecs_configs[0]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adopted=3"), "{stderr}");
}

#[tokio::test]
async fn waits_for_a_consul_server_that_boots_later() {
    let world = World::start(&["--servers", "0", "--stopped-servers", "0"]);
    let started = Instant::now();
    let mut child = world
        .nodeagent(&world.config(""))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting for a server"
    );

    let server_ip = world.run_consul_server_async().await;

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", transcript(&out));
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(
        consul_config(&world)["retry_join"],
        serde_json::json!([server_ip])
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tag:Name=l5d-demo-consul-server and instance-state-name=running"),
        "logs the filter it waits on: {stderr}"
    );
    assert_eq!(world.running_tasks().await.len(), 3);
}

#[tokio::test]
async fn waits_for_an_ecs_agent_that_comes_up_late() {
    // 5 s: the boot's first AWS call (the tags, in the instance-metadata phase) waits up to 1 s
    // (jitter), and the agent must still be waited for past the first 2 quiet seconds.
    let world = World::start(&["--agent-ready-after", "5"]);
    let started = Instant::now();
    let out = world.run_once(&world.config(""));
    assert!(out.status.success(), "{}", transcript(&out));
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(world.running_tasks().await.len(), 3);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("waiting for the ECS agent"), "{stderr}");
}

#[tokio::test]
async fn an_agent_in_another_cluster_is_an_error() {
    let world = World::start(&[]);
    // The agent fixture registers into the cluster ecs.config names; nodeagent is told another.
    std::fs::create_dir_all(world.path("/etc/ecs")).unwrap();
    let other = world.config("");
    let out = world.run_once(&other);
    assert!(out.status.success(), "{}", transcript(&out));
    let wrong = world.root.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        format!(
            "cluster = \"elsewhere\"\n[ecs]\nintrospection_url = \"{}\"\nconfig_path = \"/opt/ecs/other.config\"\nagent_timeout = \"5s\"\n",
            world.info.agent_url
        ),
    )
    .unwrap();
    let out = world.run_once(&wrong);
    assert_eq!(out.status.code(), Some(1), "{}", transcript(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("registered into cluster \"l5d-demo\", not \"elsewhere\""),
        "{stderr}"
    );
}

/// Every file under the root except the given ones (and the world's log).
fn files_under(root: &std::path::Path, except: &[&std::path::Path]) -> Vec<std::path::PathBuf> {
    support::files_under(root)
        .into_iter()
        .map(|rel| root.join(rel))
        .filter(|p| !except.contains(&p.as_path()) && !p.ends_with("world.log"))
        .collect()
}

#[test]
fn bad_configuration_exits_2_with_its_location_and_writes_nothing() {
    let cases = [
        ("cluster = \"a\"\n[consul\n", ":2:"),
        (
            "cluster = \"a\"\n[consul]\ndatacentre = \"x\"\n",
            ":3:1: unknown field `datacentre`",
        ),
        ("[tasks.linkerd]\nenabled = \"no\"\n", ":2:11:"),
        (
            "[tasks.linkerd]\ndepends_on = [\"nope\"]\n",
            "not an enabled task",
        ),
        (
            "[ecs.config]\nECS_X = \"a\\nECS_CLUSTER=evil\"\n",
            "control character",
        ),
    ];
    for (text, expected) in cases {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
            .args(["run", "--once", "--config"])
            .arg(&config)
            .arg("--root")
            .arg(root.path())
            // Nothing may be asked of IMDS before the config is valid.
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{text:?}: expected {expected:?} in {stderr}"
        );
        if expected.starts_with(':') {
            assert!(
                stderr.contains(&format!("{}{expected}", config.display())),
                "{stderr}"
            );
        }
        assert!(
            files_under(root.path(), &[&config]).is_empty(),
            "nothing written"
        );
    }
}

#[test]
fn imds_unreachable_exits_1_naming_the_endpoint_after_bounded_retries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let root = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["run", "--once", "--root"])
        .arg(root.path())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&endpoint), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "bounded");
    // Only the node's lock (runtime state, in /run on a node) is left.
    let lock = root.path().join("run/nodeagent/agent.lock");
    assert_eq!(
        files_under(root.path(), &[&lock]),
        Vec::<std::path::PathBuf>::new(),
        "nothing written"
    );
}

#[tokio::test]
async fn imds_errors_are_reported_and_imdsv1_is_never_tried() {
    let world = World::start(&[]);
    let config = world.config("");

    world
        .control(
            "POST",
            "/imds",
            serde_json::json!({"mode": "refuse-tokens"}),
        )
        .await;
    let out = world.run_once(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&world.info.imds_url) && stderr.contains("token"),
        "{stderr}"
    );
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    assert_eq!(
        stats["imds"]["unauthorized"], 0,
        "no token-less (IMDSv1) request: {stats}"
    );

    world
        .control("POST", "/imds", serde_json::json!({"mode": "fail"}))
        .await;
    let out = world.run_once(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&world.info.imds_url), "{stderr}");
    assert!(
        !world.path("/etc/ecs/ecs.config").exists(),
        "nothing written"
    );
}

#[tokio::test]
async fn an_unknown_task_family_exits_1_naming_it() {
    let world = World::start(&[]);
    let out = world.run_once(&world.config("[tasks.linkerd]\nfamily = \"no-such-family\"\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("\"no-such-family\" is not registered"),
        "{stderr}"
    );
}

#[tokio::test]
async fn hostile_tag_and_metadata_values_render_literally() {
    let hostile = "q\"uo'te\n{{ x }} $(touch /tmp/pwned) `id` \\ ; # end";
    let tag_arg = format!("Name={hostile}");
    let az_arg = format!("placement/availability-zone={hostile}");
    let type_arg = format!("instance-type={hostile}");
    let world = World::start(&["--server-tag", &tag_arg, "--imds-set", &az_arg, &type_arg]);
    let templates = world.path("/etc/nodeagent/templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(
        templates.join("all.json"),
        "{\"instance\": {{ instance }}, \"tag\": {{ consul.server_tag }}, \"dc\": {{ consul.datacenter }}, \"note\": {{ vars.note }}, \"ci\": {{ ecs.container_instance_arn }}}\n",
    )
    .unwrap();
    std::fs::write(
        templates.join("all.yaml"),
        "az: {{ instance.availability_zone }}\ntype: {{ instance.instance_type }}\ntag: {{ consul.server_tag.value }}\nnote: {{ vars.note }}\nservers: {{ consul.servers }}\n",
    )
    .unwrap();
    std::fs::write(
        templates.join("all.sh"),
        "#!/bin/sh\nprintf '%s\\n' {{ instance.availability_zone }} {{ consul.server_tag.value }} {{ vars.note }} {{ consul.servers }}\n",
    )
    .unwrap();
    let lit = |s: &str| toml::Value::String(s.to_string()).to_string();
    let extra = format!(
        "[consul]\nserver_tag = {{ key = \"Name\", value = {v} }}\ndatacenter = {v}\n[vars]\nnote = {v}\n\
         [tasks.linkerd.files.\"/opt/out/all.json\"]\ntemplate = \"/etc/nodeagent/templates/all.json\"\nmode = \"0600\"\n\
         [tasks.linkerd.files.\"/opt/out/all.yaml\"]\ntemplate = \"/etc/nodeagent/templates/all.yaml\"\nmode = \"0600\"\n\
         [tasks.linkerd.files.\"/opt/out/all.sh\"]\ntemplate = \"/etc/nodeagent/templates/all.sh\"\nmode = \"0700\"\n",
        v = lit(hostile)
    );
    let out = world.run_once(&world.config(&extra));
    assert!(out.status.success(), "{}", transcript(&out));
    let servers: Vec<String> = world
        .info
        .server_ips
        .iter()
        .map(|s| s.parse::<std::net::Ipv4Addr>().unwrap())
        .collect::<BTreeSet<_>>()
        .iter()
        .map(|ip| ip.to_string())
        .collect();

    let json: serde_json::Value = serde_json::from_str(&world.read("/opt/out/all.json")).unwrap();
    assert_eq!(json["instance"]["availability_zone"], hostile);
    assert_eq!(json["instance"]["instance_type"], hostile);
    assert_eq!(json["tag"]["value"], hostile);
    assert_eq!(json["dc"], hostile);
    assert_eq!(json["note"], hostile);

    let yaml: serde_yaml::Value = serde_yaml::from_str(&world.read("/opt/out/all.yaml")).unwrap();
    for key in ["az", "type", "tag", "note"] {
        assert_eq!(yaml[key].as_str(), Some(hostile), "{key}");
    }

    let sh = world.read("/opt/out/all.sh");
    let words = shlex::split(sh.strip_prefix("#!/bin/sh\n").unwrap()).unwrap();
    let mut expected = vec![
        "printf".to_string(),
        "%s\\n".into(),
        hostile.into(),
        hostile.into(),
        hostile.into(),
    ];
    expected.extend(servers.iter().cloned());
    assert_eq!(words, expected);

    let consul = consul_config(&world);
    assert_eq!(consul["datacenter"], hostile);
    assert_eq!(consul["retry_join"], serde_json::json!(servers));
    let linkerd: serde_yaml::Value =
        serde_yaml::from_str(&world.read("/etc/linkerd/linkerd.yaml")).unwrap();
    assert_eq!(
        linkerd["routers"][1]["dtab"].as_str().unwrap(),
        format!("/svc => /#/io.l5d.consul/{hostile};\n")
    );
    assert!(!std::path::Path::new("/tmp/pwned").exists());
}
