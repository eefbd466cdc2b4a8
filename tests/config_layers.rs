//! Configuration layers against the test world (IMDS user-data and tags, EC2 DescribeTags):
//! precedence with every layer present, `config show` naming each key's layer, and
//! `nodeagent render --facts` writing exactly what `run` writes for the same facts.

use crate::support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use support::{transcript, World};

const USER_DATA: &str = r#"# shared with another tool, which reads [other]
[other]
anything = 1

[nodeagent.vars]
layer = "user-data"
ud_and_below = "user-data"

[nodeagent.supervision]
log_lines = 7
"#;

/// Starts a world whose node carries user-data and `nodeagent:` tags; `imds_tags`: the tags
/// are shown in instance metadata (else nodeagent must ask DescribeTags).
fn layered_world(imds_tags: bool) -> (World, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let user_data = dir.path().join("user-data.toml");
    std::fs::write(&user_data, USER_DATA).unwrap();
    let mut args = vec![
        "--user-data",
        user_data.to_str().unwrap(),
        "--node-tag",
        "Name=l5d-demo-ecs",
        "--node-tag",
        "nodeagent:vars.layer=tag",
        "--node-tag",
        "nodeagent:consul.datacenter=dc-tag",
        "--node-tag",
        "nodeagent:lifecycle.drain_on_rebalance=true",
        "--node-tag",
        "nodeagent:supervision.crash_loop_restarts=9",
        "--node-tag",
        "nodeagent:ecs.config.ECS_ENABLE_TASK_IAM_ROLE=true",
        "--node-tag",
        "other:ignored=1",
    ];
    if imds_tags {
        args.push("--imds-tags");
    }
    let world = World::start(&args);
    let config = world.config(
        "[vars]\nlayer = \"file\"\nud_and_below = \"file\"\nconf_d_and_below = \"file\"\nfile_only = \"file\"\n\
         [ecs.config]\nECS_ENGINE_AUTH_DATA = \"{\\\"registry\\\":{\\\"auth\\\":\\\"c2VjcmV0\\\"}}\"\n",
    );
    let conf_d = world.root.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::write(
        conf_d.join("10-a.toml"),
        "[vars]\nlayer = \"conf.d/10\"\nud_and_below = \"conf.d/10\"\nconf_d_and_below = \"conf.d/10\"\n",
    )
    .unwrap();
    std::fs::write(
        conf_d.join("20-b.toml"),
        "[vars]\nlayer = \"conf.d/20\"\nud_and_below = \"conf.d/20\"\nconf_d_and_below = \"conf.d/20\"\n",
    )
    .unwrap();
    (world, config, dir)
}

/// `config show`: key → (value, layer).
fn show(world: &World, config: &Path) -> BTreeMap<String, (String, String)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
    cmd.args(["config", "show", "--config"])
        .arg(config)
        .arg("--root")
        .arg(world.root.path());
    world.wire(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", transcript(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("c2VjcmV0"), "a secret was printed: {text}");
    // What a tag may not set is shown as ignored, by key and why, never by value.
    let tagged = text.contains("nodeagent:vars.layer");
    for key in [
        "ecs.config.ECS_ENABLE_TASK_IAM_ROLE",
        "supervision.crash_loop_restarts",
    ] {
        assert!(
            !tagged
                || text.contains(&format!(
                    "# ignored: {key} (instance tag nodeagent:{key}): instance tags may not set it"
                )),
            "{text}"
        );
    }
    // What it prints is TOML: comments aside, it parses.
    toml::from_str::<toml::Table>(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (kv, origin) = l.rsplit_once("  # ").unwrap();
            let (k, v) = kv.split_once(" = ").unwrap();
            (k.to_string(), (v.to_string(), origin.to_string()))
        })
        .collect()
}

fn check_layers(world: &World, config: &Path) {
    let shown = show(world, config);
    let get = |k: &str| -> (&str, &str) {
        let (v, o) = shown
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {shown:#?}"));
        (v.as_str(), o.as_str())
    };
    let conf_d = world.root.path().join("conf.d");
    let main = config.display().to_string();
    let c20 = conf_d.join("20-b.toml").display().to_string();
    assert_eq!(
        get("vars.layer"),
        ("\"tag\"", "instance tag nodeagent:vars.layer")
    );
    assert_eq!(get("vars.ud_and_below"), ("\"user-data\"", "EC2 user-data"));
    assert_eq!(
        get("vars.conf_d_and_below"),
        ("\"conf.d/20\"", c20.as_str())
    );
    assert_eq!(get("vars.file_only"), ("\"file\"", main.as_str()));
    assert_eq!(get("runtime"), ("\"ecs\"", "built-in defaults"));
    assert_eq!(get("supervision.log_lines"), ("7", "EC2 user-data"));
    assert_eq!(
        get("lifecycle.drain_on_rebalance"),
        (
            "true",
            "instance tag nodeagent:lifecycle.drain_on_rebalance"
        ),
        "a tag's text becomes the type below it"
    );
    assert_eq!(
        get("supervision.crash_loop_restarts"),
        ("5", "built-in defaults"),
        "a tag may not change how tasks are supervised"
    );
    assert_eq!(
        get("consul.datacenter"),
        ("\"dc-tag\"", "instance tag nodeagent:consul.datacenter")
    );
    assert_eq!(
        get("ecs.config.ECS_ENGINE_AUTH_DATA"),
        ("\"<redacted>\"", main.as_str())
    );
    assert!(
        !shown.keys().any(|k| k.contains("other")),
        "other tools' tables and tags are not ours"
    );

    // The run uses the same layers.
    let out = world.run_once(config);
    assert!(out.status.success(), "{}", transcript(&out));
    let consul: serde_json::Value =
        serde_json::from_str(&world.read("/opt/consul/config/consul-agent.json")).unwrap();
    assert_eq!(consul["datacenter"], "dc-tag");
    let ecs_config = world.read("/etc/ecs/ecs.config");
    assert!(
        !ecs_config.contains("ECS_ENABLE_TASK_IAM_ROLE"),
        "a tag may not write ecs.config: {ecs_config}"
    );
}

#[test]
fn user_data_that_is_a_script_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("user-data.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\ncat > /etc/other.toml <<EOF\n[nodeagent]\ncluster = \"nope\"\nEOF\n",
    )
    .unwrap();
    let world = World::start(&["--user-data", script.to_str().unwrap()]);
    let config = world.config("");
    let shown = show(&world, &config);
    assert_eq!(
        shown["cluster"],
        ("\"l5d-demo\"".to_string(), "built-in defaults".to_string())
    );
    assert!(!shown.values().any(|(_, origin)| origin == "EC2 user-data"));
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", transcript(&out));
}

/// Every layer, with the tags read from IMDS (`imds_tags`) or through DescribeTags.
async fn every_layer_wins_in_order(imds_tags: bool) {
    let (world, config, _user_data) = layered_world(imds_tags);
    check_layers(&world, &config);
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    let described = stats["aws"]["by_operation"]
        .get("ec2:DescribeTags")
        .is_some();
    assert_eq!(
        described, !imds_tags,
        "DescribeTags only without tags in IMDS: {stats}"
    );
}

#[tokio::test]
async fn every_layer_wins_in_order_with_tags_from_instance_metadata() {
    every_layer_wins_in_order(true).await;
}

#[tokio::test]
async fn every_layer_wins_in_order_with_tags_from_describe_tags() {
    every_layer_wins_in_order(false).await;
}

/// A metadata item from the world's IMDSv2 fixture.
async fn imds(world: &World, item: &str) -> String {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = http
        .put(format!("{}/latest/api/token", world.info.imds_url))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    http.get(format!("{}/latest/meta-data/{item}", world.info.imds_url))
        .header("X-aws-ec2-metadata-token", token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Every file under `dir`: relative path → (bytes, mode).
fn tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    support::files_under(dir)
        .into_iter()
        .map(|rel| {
            let path = dir.join(&rel);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            (
                rel.display().to_string(),
                (std::fs::read(&path).unwrap(), mode),
            )
        })
        .collect()
}

#[tokio::test]
async fn render_writes_exactly_what_run_writes_for_the_same_facts() {
    let world = World::start(&[]);
    let config = world.config("");
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", transcript(&out));

    // In the order the boot puts them: by address.
    let mut servers = world.info.server_ips.clone();
    servers.sort_by_key(|ip| ip.parse::<std::net::Ipv4Addr>().unwrap());
    let facts = serde_json::json!({
        "instance_id": world.info.instance_id,
        "local_ipv4": world.info.local_ipv4,
        "region": imds(&world, "placement/region").await,
        "availability_zone": imds(&world, "placement/availability-zone").await,
        "instance_type": imds(&world, "instance-type").await,
        "ami_id": imds(&world, "ami-id").await,
        "consul_servers": servers,
        "container_instance_arn": world.container_instance().await.unwrap(),
    });
    let facts_path = world.root.path().join("facts.json");
    std::fs::write(&facts_path, facts.to_string()).unwrap();
    let review = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["render", "--config"])
        .arg(&config)
        .arg("--root")
        .arg(world.root.path())
        .arg("--facts")
        .arg(&facts_path)
        .arg("--out")
        .arg(review.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", transcript(&out));
    let rendered = tree(review.path());
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        [
            "etc/linkerd/linkerd.yaml",
            "opt/consul-registrator/bin/start.sh",
            "opt/consul/config/consul-agent.json"
        ],
        "every config file, nothing else"
    );
    for (rel, (bytes, mode)) in &rendered {
        let on_node = world.path(rel);
        assert_eq!(
            &std::fs::read(&on_node).unwrap(),
            bytes,
            "{rel} differs from run's"
        );
        let node_mode = std::fs::metadata(&on_node).unwrap().permissions().mode() & 0o7777;
        assert_eq!(*mode, node_mode, "{rel} mode");
    }
    let listed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(listed.lines().count(), 3, "{listed}");
}

#[test]
fn the_shipped_sample_facts_render() {
    let review = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["render", "--root"])
        .arg(root.path())
        .arg("--facts")
        .arg(support::repo().join("packaging/sample-facts.json"))
        .arg("--out")
        .arg(review.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", transcript(&out));
    let consul: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(review.path().join("opt/consul/config/consul-agent.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(consul["advertise_addr"], "10.0.1.23");
    assert_eq!(consul["retry_join"].as_array().unwrap().len(), 3);

    let bad = root.path().join("bad.json");
    std::fs::write(&bad, r#"{"instance_id": "i-1"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["render", "--root"])
        .arg(root.path())
        .arg("--facts")
        .arg(&bad)
        .arg("--out")
        .arg(review.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a facts document") && stderr.contains("missing field"),
        "{stderr}"
    );
}
