//! A whole node as it boots on an instance: the docker runtime with the DEFAULT task
//! configuration (the real images' names, commands, entrypoints and mounts) run by faithful
//! stand-ins of those images on a private engine, nodeagent under the unit's umask, each test
//! in a network namespace of its own (the stand-ins listen on the real ports). Assertions read
//! `nodeagent status --json`, the engine and the files on disk — not nodeagent's log.

use crate::support;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use support::docker::IMAGE;
use support::node::Node;
use support::notify::Listener;
use support::{netns, wait_for};

const BOOT: Duration = Duration::from_secs(60);

fn mode_and_owner(node: &Node, host_path: &str) -> (u32, u32, u32) {
    let m = std::fs::metadata(node.path(host_path)).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// The first boot of an image, defaults only. Under `UMask=0027` nodeagent used to make the
/// Consul config directory 0750 root:root; the Consul image drops to uid 100 and could not
/// read its config: consul-agent crash-looped and linkerd and registrator never started.
#[test]
fn a_first_boot_meets_every_images_contract() {
    if !netns::enter("a_first_boot_meets_every_images_contract") {
        return;
    }
    let node = Node::start(&[]);
    let mut agent = node.run("agent");
    wait_for(BOOT, "every task healthy (status --json)", || {
        node.healthy()
    });

    // Consul read its configuration as uid 100 through the directories nodeagent made.
    assert_eq!(mode_and_owner(&node, "/opt/consul/config"), (0o755, 0, 0));
    assert_eq!(
        mode_and_owner(&node, "/opt/consul/config/consul-agent.json"),
        (0o644, 0, 0)
    );
    assert_eq!(
        mode_and_owner(&node, "/opt/consul-registrator/bin/start.sh").0,
        0o755
    );
    // Its entrypoint gave it the data directory, where it keeps its node id.
    assert_eq!(mode_and_owner(&node, "/opt/consul/data").1, 100);
    assert_eq!(mode_and_owner(&node, "/opt/consul/data/node-id").1, 100);
    let consul = node.container("consul-agent").unwrap();
    let logs = node.engine.logs(&consul);
    assert!(logs.contains("Consul agent running"), "{logs}");
    let registrator = node
        .engine
        .logs(&node.container("consul-registrator").unwrap());
    assert!(
        registrator.contains("Listening for Docker events"),
        "{registrator}"
    );
    assert_eq!(
        support::http_get(9990, "/admin/ping").map(|a| a.ends_with("pong")),
        Some(true),
        "linkerd read its YAML and serves its admin port"
    );

    // A killed task is replaced; the node is healthy again.
    node.engine.cli(&["kill", &consul]);
    wait_for(BOOT, "consul-agent replaced and healthy", || {
        node.container("consul-agent").is_some_and(|c| c != consul) && node.healthy()
    });
    let s = node.status().unwrap();
    let restarted = s["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "consul-agent")
        .unwrap();
    assert_eq!(restarted["restarts"], 1, "{restarted}");

    // A removed one too.
    let linkerd = node.container("linkerd").unwrap();
    node.engine.cli(&["rm", "-f", &linkerd]);
    wait_for(BOOT, "linkerd replaced and healthy", || {
        node.container("linkerd").is_some_and(|c| c != linkerd) && node.healthy()
    });
    let replaced = node.task("linkerd").unwrap();
    assert_eq!(replaced["restarts"], 1, "{replaced}");

    // A new agent adopts what runs, and removes a container of this node for a task that is
    // not configured (any more); SIGTERM leaves the tasks running.
    let before = node.containers();
    agent.sigkill();
    let stray = node.engine.cli(&[
        "run",
        "-d",
        "--network",
        "host",
        "--label",
        &format!("io.nodeagent.node={}", node.world.info.instance_id),
        "--label",
        "io.nodeagent.task=retired",
        IMAGE,
        "sleep",
        "100000",
    ]);
    assert!(node.container("retired").is_some(), "the stray runs");
    let mut second = node.run("second");
    wait_for(BOOT, "the running tasks adopted", || {
        node.healthy_and_adopted()
    });
    wait_for(BOOT, "the stray removed", || {
        node.engine
            .cli(&["ps", "-aq", "--filter", &format!("id={stray}")])
            .is_empty()
    });
    assert_eq!(node.containers(), before, "the same containers");
    assert!(second.sigterm().success());
    assert_eq!(
        node.containers(),
        before,
        "SIGTERM leaves the tasks running"
    );
}

/// A task that never gets healthy (Consul cannot read a config file made 0600 for root: the
/// image runs it as uid 100). The agent must not be restart-looped by systemd: it becomes
/// ready as a degraded node after `supervision.ready_timeout`, says why in `status`, and
/// marks the instance unhealthy in its group after `lifecycle.unhealthy_after`, once.
#[test]
fn a_task_that_never_gets_healthy_leaves_a_ready_degraded_node_that_says_why() {
    if !netns::enter("a_task_that_never_gets_healthy_leaves_a_ready_degraded_node_that_says_why") {
        return;
    }
    let node = Node::start(&["--asg", "g"]);
    node.conf_d(
        "50-test.toml",
        "[tasks.consul-agent.files.\"/opt/consul/config/consul-agent.json\"]\nmode = \"0600\"\n\
         [supervision]\nready_timeout = \"4s\"\ncrash_loop_restarts = 3\nbackoff_max = \"1s\"\n\
         [lifecycle]\nunhealthy_after = \"3s\"\n",
    );
    let notify = node.path("/notify.sock");
    let listener = Listener::bind(&notify);
    let mut agent = node.run_with("agent", |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify);
    });
    wait_for(Duration::from_secs(30), "READY=1", || {
        listener.ready().is_some()
    });
    // READY at `ready_timeout` (4 s) after supervision began, not before, not much later.
    let messages = listener.messages();
    let supervising = messages
        .iter()
        .find(|(_, m)| m.contains("tasks healthy"))
        .map(|(t, _)| *t)
        .unwrap();
    let ready_at = messages
        .iter()
        .find(|(_, m)| m.lines().any(|l| l == "READY=1"))
        .unwrap()
        .0;
    let waited = ready_at - supervising;
    assert!(
        waited >= Duration::from_millis(3500) && waited < Duration::from_secs(15),
        "READY after supervision.ready_timeout (4 s): {waited:?}"
    );
    let ready = listener.ready().unwrap();
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_default();
    // (How far its restarts got by then depends on the machine's load.)
    assert!(
        status.starts_with("degraded: 0/3 tasks healthy; consul-agent "),
        "READY as a degraded node, naming the failing task first: {ready}"
    );
    let before_ready = listener.texts();
    assert!(
        before_ready
            .iter()
            .any(|m| m.contains("EXTEND_TIMEOUT_USEC=")),
        "the start-up was extended until then"
    );

    // Why: the task, its last exit and what it wrote.
    wait_for(
        Duration::from_secs(60),
        "consul-agent in crash-loop",
        || {
            node.task("consul-agent")
                .is_some_and(|t| t["state"] == "crash-loop")
        },
    );
    let out = node.nodeagent(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("health     DEGRADED"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("consul-agent "))
        .unwrap_or_else(|| panic!("no row for consul-agent: {table}"));
    assert!(
        row.contains(" crash-loop ") && row.contains(" 1 ("),
        "its state and last exit code: {row}"
    );
    assert!(
        table.contains("consul-agent (crash-loop) last wrote:"),
        "{table}"
    );
    assert!(table.contains("permission denied"), "{table}");
    assert!(
        agent.alive(),
        "a degraded node's agent stays up: {}",
        agent.log()
    );
    assert!(
        node.containers().len() <= 1,
        "nothing depending on it started"
    );
    let consul = node.task("consul-agent").unwrap();
    assert_eq!(consul["last_exit"]["code"], 1, "{consul}");
    assert!(
        consul["last_output"]
            .as_str()
            .unwrap()
            .contains("/etc/consul/consul-agent.json"),
        "{consul}"
    );

    // Self-healing works on a degraded node: its group replaces it.
    wait_for(
        Duration::from_secs(30),
        "the instance marked Unhealthy",
        || node.world.instance_health().as_deref() == Some("Unhealthy"),
    );
    // Once: more crashes (each a change self-healing sees) ask nothing more of the group.
    let restarts = |node: &Node| node.task("consul-agent").unwrap()["restarts"].as_u64();
    let marked_at = restarts(&node).unwrap();
    wait_for(Duration::from_secs(30), "two more restarts", || {
        restarts(&node).is_some_and(|r| r >= marked_at + 2)
    });
    let stats = support::block_on(node.world.control("GET", "/stats", serde_json::Value::Null));
    assert_eq!(
        stats["aws"]["by_operation"]["autoscaling:SetInstanceHealth"], 1,
        "once: {}",
        stats["aws"]["by_operation"]
    );
}
