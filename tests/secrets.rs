//! Secrets from SSM Parameter Store and Secrets Manager, against moto: a boot renders them
//! into 0640 files only; a missing parameter makes the boot wait, then fail naming it; a value
//! changed in moto is re-rendered and restarts only the task owning the file, once; and no
//! log line (at every level), `config show`, `status` (table and JSON) or `/metrics` ever
//! holds a value. The Consul 1.x profile (`packaging/examples/consul-1.toml`) checks and
//! renders; misplaced secrets are configuration errors.

use crate::support::agent::Agent;
use crate::support::{self, transcript, wait_for_async, World};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const GOSSIP_1: &str = "gossip-one-Zk9XvQ2mL7pR4tY8wB3nC6dF1hJ5sA0e=";
const GOSSIP_2: &str = "gossip-two-Qw8ErT7yU6iO5pA4sD3fG2hJ1kL0zX9c=";
const TOKEN: &str = "agent-token-5f0c9b1e-7d2a-4c3b-9e8f-1a2b3c4d5e6f";

async fn put_parameter(world: &World, name: &str, value: &str) {
    aws_sdk_ssm::Client::new(&world.sdk().await)
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .overwrite(true)
        .send()
        .await
        .unwrap();
}

async fn create_secret(world: &World, name: &str, value: &str) {
    aws_sdk_secretsmanager::Client::new(&world.sdk().await)
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .unwrap();
}

/// A world whose SSM holds the gossip key (`GOSSIP_1`) and whose Secrets Manager holds the agent
/// token (`TOKEN`, field `token`).
async fn secrets_world() -> World {
    secrets_world_holding(&format!("{{\"token\": \"{TOKEN}\"}}")).await
}

/// The same, the agent's secret document being `agent_secret`.
async fn secrets_world_holding(agent_secret: &str) -> World {
    let world = World::start(&[]);
    put_parameter(&world, "/prod/consul/gossip-key", GOSSIP_1).await;
    create_secret(&world, "prod/consul/agent", agent_secret).await;
    world
}

/// The node's configuration: the two secrets (read every `refresh`) in consul-agent's file,
/// 0640, from a template of our own; `extra` TOML after it.
fn secrets_config(world: &World, refresh: &str, extra: &str) -> std::path::PathBuf {
    let template = world.path("/etc/nodeagent/t/consul.json");
    std::fs::create_dir_all(template.parent().unwrap()).unwrap();
    std::fs::write(
        &template,
        "{\"node_name\": {{ instance.instance_id }}, \"retry_join\": {{ consul.servers }},\n \"encrypt\": {{ secrets.gossip }},\n \"acl\": {\"tokens\": {\"agent\": {{ secrets.agent_token }}}}}\n",
    )
    .unwrap();
    world.config(&format!(
        "[secrets.gossip]\nfrom = \"ssm:/prod/consul/gossip-key\"\nrefresh = \"{refresh}\"\n\
         [secrets.agent_token]\nfrom = \"secretsmanager:prod/consul/agent#token\"\nrefresh = \"{refresh}\"\n\
         [tasks.consul-agent.files.\"/opt/consul/config/consul-agent.json\"]\n\
         template = \"/etc/nodeagent/t/consul.json\"\nmode = \"0640\"\n{extra}"
    ))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `root` holding any of `values`, with its mode.
fn files_holding(root: &Path, values: &[&str]) -> Vec<(String, u32)> {
    support::files_under(root)
        .into_iter()
        .filter(|f| !f.to_string_lossy().ends_with(".log"))
        .filter_map(|f| {
            let path = root.join(&f);
            let text = std::fs::read(&path).ok()?;
            let text = String::from_utf8_lossy(&text);
            values
                .iter()
                .any(|v| text.contains(v))
                .then(|| (format!("/{}", f.display()), mode(&path)))
        })
        .collect()
}

#[tokio::test]
async fn a_boot_renders_ssm_and_secrets_manager_secrets_into_its_0640_file_only() {
    let world =
        secrets_world_holding(&format!("{{\"token\": \"{TOKEN}\", \"other\": \"x\"}}")).await;
    let config = secrets_config(&world, "5m", "");
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", transcript(&out));
    let file = "/opt/consul/config/consul-agent.json";
    let doc: serde_json::Value = serde_json::from_str(&world.read(file)).unwrap();
    assert_eq!(doc["encrypt"], GOSSIP_1);
    assert_eq!(doc["acl"]["tokens"]["agent"], TOKEN);
    assert_eq!(doc["node_name"], world.info.instance_id.as_str());
    assert_eq!(mode(&world.path(file)), 0o640);
    assert_eq!(
        files_holding(world.root.path(), &[GOSSIP_1, TOKEN]),
        vec![(file.to_string(), 0o640)],
        "the secrets are in that one file"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains(GOSSIP_1) && !log.contains(TOKEN), "{log}");
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    let ops = &stats["aws"]["by_operation"];
    assert_eq!(ops["ssm:GetParameters"], 1, "{stats}");
    assert_eq!(ops["secretsmanager:GetSecretValue"], 1, "{stats}");
    assert_eq!(world.running_tasks().await.len(), 3);
}

#[tokio::test]
async fn a_missing_parameter_makes_the_boot_wait_then_fail_naming_it() {
    let world = World::start(&[]);
    create_secret(
        &world,
        "prod/consul/agent",
        &format!("{{\"token\": \"{TOKEN}\"}}"),
    )
    .await;
    let config = secrets_config(&world, "5m", "[consul]\ndiscovery_timeout = \"4s\"\n");
    let started = Instant::now();
    let out = world.run_once(&config);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", transcript(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secret gossip (ssm:/prod/consul/gossip-key): no such parameter")
            && err.contains("create it (a SecureString) or fix secrets.gossip.from"),
        "{err}"
    );
    assert!(took >= Duration::from_secs(4), "waited: {took:?}");
    assert!(!err.contains(TOKEN), "{err}");
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    let reads = stats["aws"]["by_operation"]["ssm:GetParameters"]
        .as_u64()
        .unwrap();
    assert!(reads >= 2, "asked again while waiting: {stats}");
    assert_eq!(
        stats["aws"]["by_operation"]["secretsmanager:GetSecretValue"], 1,
        "what was read is not read again: {stats}"
    );
    assert!(world.running_tasks().await.is_empty(), "nothing started");
    assert!(!world.path("/opt/consul/config/consul-agent.json").exists());
}

/// `ecs:StartTask` calls by family, from the world's record.
async fn starts(world: &World) -> std::collections::BTreeMap<String, usize> {
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    let mut by_family = std::collections::BTreeMap::new();
    for call in stats["aws"]["sequence"].as_array().unwrap() {
        if call["op"] == "ecs:StartTask" {
            let family = call["params"]["taskDefinition"].as_str().unwrap_or("?");
            *by_family
                .entry(family.split(':').next().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    by_family
}

/// How often the node's attributes were put and deleted (the readiness attribute).
async fn attribute_calls(world: &World) -> (u64, u64) {
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    let ops = &stats["aws"]["by_operation"];
    let n = |op: &str| ops[op].as_u64().unwrap_or(0);
    (n("ecs:PutAttributes"), n("ecs:DeleteAttributes"))
}

fn status_json(world: &World, config: &Path) -> serde_json::Value {
    let out = nodeagent(world, &["status", "--json", "--config"], config);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn nodeagent(world: &World, args: &[&str], config: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
    cmd.args(args)
        .arg(config)
        .arg("--root")
        .arg(world.root.path());
    world.wire(&mut cmd);
    cmd.output().unwrap()
}

#[tokio::test]
async fn a_rotated_secret_restarts_only_its_task_once_and_no_value_ever_shows() {
    let world = secrets_world().await;
    let metrics = support::docker::free_port();
    let config = secrets_config(
        &world,
        "1s",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"),
    );
    // Every level of nodeagent's own logs, and of every library's.
    let agent = Agent::start_with(&world, crate::support::NO_DOCKER, &config, "agent", |cmd| {
        cmd.arg("-vv").env("RUST_LOG", "trace");
    });
    wait_for_async(Duration::from_secs(30), "a healthy node", async || {
        status_json(&world, &config)["healthy"] == true
    })
    .await;
    let before = starts(&world).await;
    assert_eq!(before.values().sum::<usize>(), 3, "{before:?}");
    wait_for_async(
        Duration::from_secs(30),
        "the readiness attribute",
        async || attribute_calls(&world).await.0 >= 1,
    )
    .await;
    let attributes = attribute_calls(&world).await;

    put_parameter(&world, "/prod/consul/gossip-key", GOSSIP_2).await;
    let changed = Instant::now();
    let file = "/opt/consul/config/consul-agent.json";
    wait_for_async(
        Duration::from_secs(20),
        "the file re-rendered",
        async || world.read(file).contains(GOSSIP_2),
    )
    .await;
    let rendered = changed.elapsed();
    wait_for_async(
        Duration::from_secs(20),
        "the rotation in status",
        async || {
            let s = status_json(&world, &config);
            let gossip = s["secrets"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == "gossip").cloned())
                .unwrap_or_default();
            gossip["rotated"]["from"] == "v1"
                && gossip["rotated"]["to"] == "v2"
                && s["healthy"] == true
        },
    )
    .await;
    // (refresh = 1s: the change is seen within a refresh or two.)
    println!(
        "rotation: the file re-rendered {rendered:?} after the change in moto, the node healthy again with the rotation in status after {:?}",
        changed.elapsed()
    );
    // Several refreshes later: consul-agent was restarted once, the others never.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = starts(&world).await;
    assert_eq!(
        after["consul-agent"],
        before["consul-agent"] + 1,
        "{after:?}"
    );
    assert_eq!(after["linkerd"], before["linkerd"], "{after:?}");
    assert_eq!(
        after["consul-registrator"], before["consul-registrator"],
        "{after:?}"
    );
    assert_eq!(
        attribute_calls(&world).await,
        attributes,
        "the readiness attribute stays through the restart (put, deleted)"
    );
    let doc: serde_json::Value = serde_json::from_str(&world.read(file)).unwrap();
    assert_eq!(doc["encrypt"], GOSSIP_2);
    assert_eq!(mode(&world.path(file)), 0o640);
    let table = nodeagent(&world, &["status", "--config"], &config);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("secrets    rotated gossip (v1→v2)"),
        "{table}"
    );
    let status = status_json(&world, &config);
    assert_eq!(status["tasks"][0]["name"], "consul-agent");
    assert_eq!(status["tasks"][0]["restarts"], 1, "{status}");
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    assert!(
        stats["aws"]["by_operation"]["ssm:GetParameters"]
            .as_u64()
            .unwrap()
            >= 3,
        "read every second: {stats}"
    );

    // No value anywhere an operator or a log reader looks.
    let show = nodeagent(&world, &["config", "show", "--config"], &config);
    assert!(show.status.success(), "{}", transcript(&show));
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(
        show.contains("secrets.gossip.from = \"ssm:/prod/consul/gossip-key\""),
        "{show}"
    );
    assert!(
        show.contains("# secret gossip: ssm:/prod/consul/gossip-key v2, sha256 "),
        "the version in use, and a checksum prefix: {show}"
    );
    let metrics = support::http_get(metrics, "/metrics").expect("metrics");
    let json = serde_json::to_string(&status).unwrap();
    let log = agent.log();
    assert!(log.contains("secrets: rotated gossip (v1→v2)"), "{log}");
    assert!(
        log.contains("TRACE") && log.contains("aws_smithy"),
        "every level of every crate was logged"
    );
    for (what, text) in [
        ("the log", &log),
        ("config show", &show),
        ("status --json", &json),
        ("status", &table),
        ("/metrics", &metrics),
    ] {
        for secret in [GOSSIP_1, GOSSIP_2, TOKEN] {
            assert!(!text.contains(secret), "{what} holds a secret:\n{text}");
        }
    }
}

/// A rotation whose files cannot be rendered (its template gone) keeps the value in use and
/// says so; the next refresh tries again, and once the template is back the new values are
/// written. Two secrets of one `refresh` rotated at once are read together and restart their
/// task once. (The value used to be taken into use before its files were written: a failed
/// render was never tried again, and the task kept the old secret for good.)
#[tokio::test]
async fn a_rotation_that_cannot_be_rendered_is_tried_again_and_restarts_its_task_once() {
    let world = secrets_world().await;
    let config = secrets_config(&world, "2s", "");
    let _agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "agent");
    wait_for_async(Duration::from_secs(30), "a healthy node", async || {
        status_json(&world, &config)["healthy"] == true
    })
    .await;
    let before = starts(&world).await;

    let template = world.path("/etc/nodeagent/t/consul.json");
    let text = std::fs::read_to_string(&template).unwrap();
    std::fs::remove_file(&template).unwrap();
    let token_2 = "agent-token-2-0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a";
    put_parameter(&world, "/prod/consul/gossip-key", GOSSIP_2).await;
    aws_sdk_secretsmanager::Client::new(&world.sdk().await)
        .put_secret_value()
        .secret_id("prod/consul/agent")
        .secret_string(format!("{{\"token\": \"{token_2}\"}}"))
        .send()
        .await
        .unwrap();
    wait_for_async(
        Duration::from_secs(20),
        "the failed render in status",
        async || {
            let s = status_json(&world, &config);
            s["secrets"].as_array().is_some_and(|a| {
                a.iter().all(|x| {
                    x["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("could not be rendered again"))
                        && x["rotated"].is_null()
                })
            })
        },
    )
    .await;
    let file = "/opt/consul/config/consul-agent.json";
    assert!(world.read(file).contains(GOSSIP_1), "the old file stays");

    std::fs::write(&template, text).unwrap();
    wait_for_async(
        Duration::from_secs(20),
        "the new values written",
        async || {
            let now = world.read(file);
            now.contains(GOSSIP_2) && now.contains(token_2)
        },
    )
    .await;
    wait_for_async(Duration::from_secs(30), "a healthy node", async || {
        status_json(&world, &config)["healthy"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = starts(&world).await;
    assert_eq!(
        after["consul-agent"],
        before["consul-agent"] + 1,
        "restarted once for both secrets: {after:?}"
    );
    assert_eq!(after["linkerd"], before["linkerd"], "{after:?}");
    let s = status_json(&world, &config);
    for secret in s["secrets"].as_array().unwrap() {
        assert!(secret["error"].is_null(), "{s}");
        assert!(!secret["rotated"].is_null(), "{s}");
    }
}

/// `nodeagent config check` of a configuration under a fresh root: its exit code and output.
fn check(config: &str, templates: &[(&str, &str)]) -> (Option<i32>, String) {
    let root = tempfile::tempdir().unwrap();
    for (path, text) in templates {
        let at = root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, text).unwrap();
    }
    let file = root.path().join("nodeagent.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["config", "check", "--config"])
        .arg(&file)
        .arg("--root")
        .arg(root.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn secrets_only_in_narrow_files_and_every_secret_used() {
    let file = "[tasks.linkerd.files.\"/opt/x/s.json\"]\ntemplate = \"/etc/nodeagent/s.json\"\n";
    let gossip = "[secrets.gossip]\nfrom = \"ssm:/g\"\n";
    let uses = [("/etc/nodeagent/s.json", "{\"k\": {{ secrets.gossip }}}")];
    let (code, out) = check(&format!("{gossip}{file}mode = \"0640\"\n"), &uses);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check(&format!("{gossip}{file}mode = \"0644\"\n"), &uses);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("mode 0644 would let others read the secrets it holds (gossip)"),
        "{out}"
    );
    let (code, out) = check(
        &format!("{gossip}[secrets.unused]\nfrom = \"ssm:/u\"\n{file}mode = \"0600\"\n"),
        &uses,
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("secrets.unused is used by no template"),
        "{out}"
    );
    let (code, out) = check(&format!("{file}mode = \"0600\"\n"), &uses);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("uses secrets.gossip, which is not configured"),
        "{out}"
    );
}

#[test]
fn the_consul_1_profile_checks_and_renders_field_by_field() {
    let repo = support::repo();
    let root = tempfile::tempdir().unwrap();
    let templates = root.path().join("usr/share/nodeagent/examples/consul-1");
    std::fs::create_dir_all(&templates).unwrap();
    for f in ["consul-agent.json", "ca.pem", "registrator-start.sh"] {
        std::fs::copy(
            repo.join("packaging/examples/consul-1").join(f),
            templates.join(f),
        )
        .unwrap();
    }
    let profile = repo.join("packaging/examples/consul-1.toml");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nodeagent"))
            .args(args)
            .arg("--config")
            .arg(&profile)
            .arg("--root")
            .arg(root.path())
            .output()
            .unwrap()
    };
    let out = run(&["config", "check"]);
    assert!(out.status.success(), "{}", transcript(&out));
    let facts_path = repo.join("packaging/examples/consul-1-facts.json");
    let facts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&facts_path).unwrap()).unwrap();
    let secret = |n: &str| facts["secrets"][n].as_str().unwrap().to_string();
    let review = tempfile::tempdir().unwrap();
    let out = run(&[
        "render",
        "--facts",
        facts_path.to_str().unwrap(),
        "--out",
        review.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", transcript(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for s in ["gossip", "ca", "agent_token", "registrator_token"] {
        assert!(!printed.contains(&secret(s)), "{printed}");
    }
    let agent = review.path().join("opt/consul/config/consul-agent.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&agent).unwrap()).expect("valid JSON");
    assert_eq!(doc["encrypt"], secret("gossip"));
    assert_eq!(doc["acl"]["tokens"]["agent"], secret("agent_token"));
    assert_eq!(doc["acl"]["enabled"], true);
    assert_eq!(doc["retry_join"], facts["consul_servers"]);
    assert_eq!(doc["advertise_addr"], "10.0.1.23");
    assert_eq!(doc["tls"]["defaults"]["ca_file"], "/etc/consul/ca.pem");
    assert_eq!(doc["auto_encrypt"]["tls"], true);
    assert_eq!(doc["ports"]["grpc_tls"], 8503);
    assert_eq!(doc["leave_on_terminate"], true);
    assert_eq!(doc["server"], false);
    let ca = std::fs::read_to_string(review.path().join("opt/consul/config/ca.pem")).unwrap();
    assert_eq!(ca, format!("{}\n", secret("ca")));
    let start = review.path().join("opt/consul-registrator/bin/start.sh");
    let script = std::fs::read_to_string(&start).unwrap();
    let words: Vec<String> = script
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| shlex::split(l).unwrap())
        .collect();
    assert!(
        words.contains(&format!(
            "CONSUL_HTTP_TOKEN={}",
            secret("registrator_token")
        )),
        "{script}"
    );
    for flag in ["-cleanup", "-resync", "60", "-deregister", "always"] {
        assert!(words.iter().any(|w| w == flag), "{flag}: {script}");
    }
    // Each secret is only in 0640 files.
    for s in ["gossip", "ca", "agent_token", "registrator_token"] {
        let holding = files_holding(review.path(), &[&secret(s)]);
        assert!(!holding.is_empty(), "{s} rendered");
        assert!(holding.iter().all(|(_, m)| *m == 0o640), "{s}: {holding:?}");
    }
    // The profile's task definitions are new revisions of the foundational families.
    for f in ["consul-agent.json", "consul-registrator.json"] {
        let td: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo.join("packaging/task-definitions/consul-1").join(f))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(td["family"], f.trim_end_matches(".json"));
    }
    // The ECS task definition runs Consul as the docker runtime does: the same command, the
    // config where the command and `ca_file` look, not in the image's own config directory.
    let profile: toml::Table = std::fs::read_to_string(&profile).unwrap().parse().unwrap();
    let container = &profile["tasks"]["consul-agent"]["container"];
    let td: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo.join("packaging/task-definitions/consul-1/consul-agent.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let td = &td["containerDefinitions"][0];
    let command: Vec<&str> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(td["command"], serde_json::json!(command));
    assert_eq!(
        command,
        ["agent", "-config-file", "/etc/consul/consul-agent.json"]
    );
    assert!(container["mounts"]
        .as_array()
        .unwrap()
        .contains(&toml::Value::from("/opt/consul/config:/etc/consul:ro")));
    assert!(td["mountPoints"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["containerPath"] != "/consul/config"));
}

/// The Consul 1.x profile booted as the packages ship it (`conf.d/20-consul-1.toml`, its
/// templates under /usr/share/nodeagent/examples), its secrets in moto, on the stand-ins of
/// the images it names (`hashicorp/consul:1.20`: an entrypoint that adds
/// `-config-dir=/consul/config`, chowns that directory and drops to uid 100). The profile
/// once mounted its config read-only at `/consul/config`: the entrypoint's chown of it failed
/// (read-only file system) and consul-agent crash-looped; and `-config-file` named a file of
/// that directory, which Consul then read twice (`retry_join` twice over).
///
/// Then the Secrets Manager secret holding both tokens is rotated (refresh 1 s, consul-agent
/// `reload = "SIGHUP"`): consul-agent gets SIGHUP and keeps its container, registrator (its
/// `start.sh` holds the other token) is restarted once, linkerd untouched.
#[test]
fn the_consul_1_profile_boots_on_its_images_and_reloads_a_rotated_token() {
    use crate::support::{netns, node::Node, wait_for};
    if !netns::enter("the_consul_1_profile_boots_on_its_images_and_reloads_a_rotated_token") {
        return;
    }
    let node = Node::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        put_parameter(&node.world, "/prod/consul/gossip-key", GOSSIP_1).await;
        put_parameter(
            &node.world,
            "/prod/consul/ca-pem",
            "-----BEGIN CERTIFICATE-----\nMIIBstandin\n-----END CERTIFICATE-----",
        )
        .await;
        create_secret(
            &node.world,
            "prod/consul/agent",
            &format!("{{\"token\": \"{TOKEN}\", \"registrator\": \"reg-{TOKEN}\"}}"),
        )
        .await;
    });
    let repo = support::repo();
    for f in ["consul-agent.json", "ca.pem", "registrator-start.sh"] {
        node.write(
            &format!("/usr/share/nodeagent/examples/consul-1/{f}"),
            &std::fs::read_to_string(repo.join("packaging/examples/consul-1").join(f)).unwrap(),
        );
    }
    node.conf_d(
        "20-consul-1.toml",
        &std::fs::read_to_string(repo.join("packaging/examples/consul-1.toml")).unwrap(),
    );
    let mut agent = node.run("agent");
    let started = Instant::now();
    while !node.healthy() {
        if started.elapsed() > Duration::from_secs(60) {
            let ids = node.engine.cli(&["ps", "-aq"]);
            let logs: Vec<String> = ids
                .lines()
                .map(|id| format!("--- {id}\n{}", node.engine.logs(id)))
                .collect();
            panic!(
                "not healthy after 60 s: {:?}\n{}\n--- agent\n{}",
                node.states(),
                logs.join("\n"),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let consul = node.container("consul-agent").unwrap();
    let logs = node.engine.logs(&consul);
    assert!(logs.contains("Consul agent running"), "{logs}");
    // Once: no file of the image's config directory named again on the command line.
    let cmd = node
        .engine
        .cli(&["inspect", "-f", "{{json .Config.Cmd}}", &consul]);
    let cmd: Vec<String> = serde_json::from_str(cmd.trim()).unwrap();
    assert!(
        !cmd.iter().any(|a| a.starts_with("/consul/config/")),
        "the entrypoint reads /consul/config already: {cmd:?}"
    );
    let status = node.status().unwrap();
    assert!(
        status["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["restarts"] == 0),
        "nothing crash-looped: {status}"
    );
    let registrator = node
        .engine
        .logs(&node.container("consul-registrator").unwrap());
    assert!(
        registrator.contains("Listening for Docker events"),
        "{registrator}"
    );
    let log = agent.log();
    for secret in [GOSSIP_1, TOKEN] {
        assert!(!log.contains(secret), "the log holds a secret:\n{log}");
    }

    // The tokens rotate.
    node.conf_d(
        "30-test.toml",
        "[secrets.agent_token]\nrefresh = \"1s\"\n[secrets.registrator_token]\nrefresh = \"1s\"\n\
         [tasks.consul-agent]\nreload = \"SIGHUP\"\n",
    );
    assert!(
        agent.sigterm().success(),
        "SIGTERM leaves the tasks running"
    );
    let agent = node.run("agent-2");
    wait_for(Duration::from_secs(60), "the tasks adopted", || {
        node.healthy_and_adopted()
    });
    let before = node.containers();
    let new_token = "agent-token-2-9e8f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    rt.block_on(async {
        aws_sdk_secretsmanager::Client::new(&node.world.sdk().await)
            .put_secret_value()
            .secret_id("prod/consul/agent")
            .secret_string(format!(
                "{{\"token\": \"{new_token}\", \"registrator\": \"reg-{new_token}\"}}"
            ))
            .send()
            .await
            .unwrap();
    });
    let changed = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "registrator replaced, the node healthy",
        || {
            node.container("consul-registrator")
                .is_some_and(|c| !before.contains(&("consul-registrator".into(), c)))
                && node.healthy()
        },
    );
    println!(
        "rotation (docker): registrator replaced and the node healthy {:?} after the change",
        changed.elapsed()
    );
    let after = node.containers();
    let id = |list: &[(String, String)], task: &str| {
        list.iter()
            .find(|(t, _)| t == task)
            .map(|(_, id)| id.clone())
    };
    assert_eq!(
        id(&after, "consul-agent"),
        id(&before, "consul-agent"),
        "signalled, not restarted"
    );
    assert_eq!(id(&after, "linkerd"), id(&before, "linkerd"), "untouched");
    let logs = node.engine.logs(&consul);
    assert!(logs.contains("Reloading configuration"), "{logs}");
    let doc: serde_json::Value =
        serde_json::from_str(&node.world.read("/opt/consul/config/consul-agent.json")).unwrap();
    assert_eq!(doc["acl"]["tokens"]["agent"], new_token);
    assert!(node
        .world
        .read("/opt/consul-registrator/bin/start.sh")
        .contains(&format!("reg-{new_token}")));
    let status = node.status().unwrap();
    let restarts = |task: &str| {
        status["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == task)
            .unwrap()["restarts"]
            .clone()
    };
    assert_eq!(restarts("consul-agent"), 0, "{status}");
    assert_eq!(restarts("consul-registrator"), 1, "{status}");
    assert_eq!(restarts("linkerd"), 0, "{status}");
    let token = status["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "agent_token")
        .cloned()
        .unwrap();
    assert!(token["rotated"].is_object(), "{status}");
    let log = agent.log();
    assert!(log.contains("consul-agent: sent SIGHUP"), "{log}");
    for secret in [GOSSIP_1, TOKEN, new_token] {
        assert!(!log.contains(secret), "the log holds a secret:\n{log}");
        assert!(!status.to_string().contains(secret), "{status}");
    }
}
