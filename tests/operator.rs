//! The operator surface against a running agent on a whole node (the Node harness: the docker
//! runtime, the default configuration on the stand-in images, each test in a network namespace
//! of its own): `nodeagent status` (table, JSON, exit codes 0/1/3), the socket and its lock, the
//! metrics endpoint, the systemd notify protocol on a real datagram socket (order, readiness,
//! watchdog withheld while the supervision loop is stuck), and native journal entries on a test
//! journal socket. A boot waiting on a late ECS agent needs no engine: the ECS runtime alone.

use crate::support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};
use support::agent::Agent;
use support::node::{Node, NODE_IP};
use support::notify::Listener;
use support::{netns, wait_for, World};

const BOOT: Duration = Duration::from_secs(60);
const METRICS: u16 = 9113;

/// `nodeagent status ARGS...` on the node: exit code, stdout, stderr.
fn status(node: &Node, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let out = node.nodeagent(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn task<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no task {name} in {status}"))
}

fn http_get(port: u16, path: &str) -> String {
    support::http_get(port, path).expect("the metrics endpoint listens")
}

#[test]
fn status_shows_a_healthy_node_and_exits_0_then_3_when_the_agent_is_gone() {
    if !netns::enter("status_shows_a_healthy_node_and_exits_0_then_3_when_the_agent_is_gone") {
        return;
    }
    let node = Node::start(&[]);
    node.conf_d(
        "50-metrics.toml",
        &format!("[metrics]\nlisten = \"127.0.0.1:{METRICS}\"\n"),
    );

    let (code, _, err) = status(&node, &[]);
    assert_eq!(code, 3, "no agent yet: {err}");
    assert!(
        err.contains("nodeagent is not running") && err.contains("no socket"),
        "{err}"
    );

    let mut agent = node.run("agent");
    let mut table = String::new();
    wait_for(BOOT, "status to answer 0", || {
        let (code, out, _) = status(&node, &[]);
        table = out;
        code == 0
    });
    let line = format!("node       {} ({NODE_IP}", node.world.info.instance_id);
    assert!(table.contains(&line), "{table}");
    assert!(table.contains("health     healthy"), "{table}");
    assert!(
        table.contains("phase      supervise: 3/3 tasks healthy"),
        "{table}"
    );
    for t in ["consul-agent", "consul-registrator", "linkerd"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{t} ")))
            .unwrap_or_else(|| panic!("no row for {t}: {table}"));
        assert!(row.contains(" healthy "), "{row}");
    }
    assert!(
        table.contains("FILE") && table.contains("/etc/linkerd/linkerd.yaml"),
        "{table}"
    );

    let s = node.status().unwrap();
    assert_eq!(s["version"], 1);
    assert_eq!(s["instance_id"], node.world.info.instance_id.as_str());
    assert_eq!(s["phase"], "supervise");
    assert_eq!(s["healthy"], true);
    assert_eq!(s["runtime"], "docker");
    assert_eq!(s["node"]["local_ipv4"], NODE_IP);
    assert_eq!(s["consul"]["servers"].as_array().unwrap().len(), 2);
    let phases: Vec<&str> = s["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["imds", "join", "discover", "agent", "render"],
        "{s}"
    );
    for name in ["consul-agent", "consul-registrator", "linkerd"] {
        let t = task(&s, name);
        assert_eq!(t["state"], "healthy", "{t}");
        assert_eq!(t["restarts"], 0, "{t}");
        assert!(t["since"].as_str().unwrap().ends_with('Z'), "{t}");
        assert!(t["last_exit"].is_null(), "{t}");
        assert!(t["instance"].as_str().is_some_and(|i| i.len() == 64), "{t}");
    }
    assert_eq!(task(&s, "consul-agent")["health"], "ok");
    assert_eq!(task(&s, "linkerd")["health"], "ok");
    // The checksums are those of the files on disk.
    for f in s["files"].as_array().unwrap() {
        use sha2::Digest;
        let on_disk = std::fs::read(node.path(f["path"].as_str().unwrap())).unwrap();
        assert_eq!(f["sha256"], format!("{:x}", sha2::Sha256::digest(&on_disk)));
    }

    // The same document, as Prometheus metrics.
    let m = http_get(METRICS, "/metrics");
    assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
    assert!(m.contains("nodeagent_healthy 1\n"), "{m}");
    assert!(
        m.contains("nodeagent_task_state{task=\"linkerd\",state=\"healthy\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("nodeagent_task_restarts_total{task=\"consul-agent\"} 0\n"),
        "{m}"
    );
    assert!(
        m.contains("nodeagent_boot_phase_seconds{phase=\"discover\"}"),
        "{m}"
    );
    assert!(
        m.contains("nodeagent_aws_calls_total{operation=\"ec2:DescribeInstances\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("nodeagent_health_check_seconds{task=\"linkerd\"}"),
        "{m}"
    );
    assert!(
        http_get(METRICS, "/v1/status").starts_with("HTTP/1.0 404"),
        "status only on the socket"
    );

    // The socket is 0660, and a second agent on it is refused: it exits, saying why, and the
    // first one goes on as it was.
    let socket = node.path("/run/nodeagent/nodeagent.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o777, 0o660);
    let containers = node.containers();
    let mut second = node.run("second");
    wait_for(Duration::from_secs(20), "the second agent to exit", || {
        !second.alive()
    });
    assert_eq!(second.child.wait().unwrap().code(), Some(1));
    let said = second.log();
    assert!(
        said.contains("nodeagent: error: another nodeagent runs on this node"),
        "its error: {said}"
    );
    let now = node.status().expect("the first agent still answers");
    assert_eq!(now["started_at"], s["started_at"], "the same agent");
    assert_eq!(now["healthy"], true);
    assert_eq!(node.containers(), containers);

    // SIGTERM: the socket goes away with the agent.
    assert!(agent.sigterm().success());
    assert!(!socket.exists());
    let (code, _, err) = status(&node, &[]);
    assert_eq!(code, 3, "{err}");

    // SIGKILL leaves a stale socket: still 3, and the next agent replaces it.
    let mut agent = node.run("third");
    wait_for(BOOT, "the third agent", || status(&node, &[]).0 == 0);
    agent.sigkill();
    assert!(socket.exists(), "a killed agent cannot clean up");
    let (code, _, err) = status(&node, &["--socket", socket.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("connection refused"), "{err}");
    let _fourth = node.run("fourth");
    wait_for(BOOT, "the fourth agent", || status(&node, &[]).0 == 0);
}

/// When each `WATCHDOG=1` arrived.
fn pings(listener: &Listener) -> Vec<Instant> {
    listener
        .messages()
        .into_iter()
        .filter(|(_, m)| m == "WATCHDOG=1\n")
        .map(|(t, _)| t)
        .collect()
}

#[test]
fn systemd_hears_status_then_ready_then_watchdog_which_stops_while_the_loop_is_stuck() {
    if !netns::enter(
        "systemd_hears_status_then_ready_then_watchdog_which_stops_while_the_loop_is_stuck",
    ) {
        return;
    }
    let node = Node::start(&[]);
    // The loop lists the node's containers every 2 s (the reconcile): soon after the engine
    // freezes, it hangs in that call.
    node.conf_d(
        "50-reconcile.toml",
        "[supervision]\nreconcile_interval = \"2s\"\n",
    );
    let notify = node.path("/notify.sock");
    let listener = Listener::bind(&notify);
    let mut agent = node.run_with("agent", |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID");
    });
    wait_for(BOOT, "READY=1", || listener.ready().is_some());
    wait_for(Duration::from_secs(5), "watchdog pings", || {
        pings(&listener).len() >= 3
    });

    let texts = listener.texts();
    let ready = texts.iter().position(|m| m.contains("READY=1")).unwrap();
    let statuses = listener.statuses();
    assert_eq!(statuses[0], "reading instance metadata", "{texts:#?}");
    let order = [
        "reading instance metadata",
        "joining ECS cluster l5d-demo",
        "finding the Consul servers",
        "rendering config files",
        "0/3 tasks healthy",
        "3/3 tasks healthy",
    ];
    let mut at = 0;
    for want in order {
        at += statuses[at..]
            .iter()
            .position(|s| s.contains(want))
            .unwrap_or_else(|| panic!("no STATUS with {want:?} after #{at}: {statuses:#?}"));
    }
    assert!(
        texts[ready].contains("STATUS=3/3 tasks healthy"),
        "READY comes with the healthy status: {texts:#?}"
    );
    assert!(
        texts[..ready]
            .iter()
            .any(|m| m.contains("EXTEND_TIMEOUT_USEC=30000000")),
        "the start-up is extended while waiting: {texts:#?}"
    );
    let supervising = texts
        .iter()
        .position(|m| m.contains("STATUS=0/3 tasks healthy"))
        .unwrap();
    assert!(
        texts[..supervising]
            .iter()
            .all(|m| !m.contains("WATCHDOG=1")),
        "the watchdog follows the supervision loop, which starts with the tasks: {texts:#?}"
    );
    assert_eq!(
        texts.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "READY once"
    );

    // Freeze the engine: the loop's next reconcile hangs in a Docker call (bounded at 10 s),
    // and the pings stop while it hangs — 3 s without one, six intervals, where systemd
    // (WatchdogSec=1) would have restarted the agent.
    let before = node.containers();
    let frozen = support::Frozen::freeze(node.engine.dockerd_pid());
    wait_for(
        Duration::from_secs(15),
        "3 s without a watchdog ping",
        || pings(&listener).last().unwrap().elapsed() >= Duration::from_secs(3),
    );
    // Thawed: the loop turns again, regularly — the latest pings less than 1 s apart over 5 s,
    // across two reconciles (frozen, no run of pings outlasts 2 s).
    drop(frozen);
    let thawed = Instant::now();
    wait_for(Duration::from_secs(30), "regular pings again", || {
        let after: Vec<Instant> = pings(&listener)
            .into_iter()
            .filter(|t| *t >= thawed)
            .collect();
        let regular = after
            .windows(2)
            .rev()
            .take_while(|w| w[1] - w[0] < Duration::from_secs(1))
            .count();
        regular > 0
            && after[after.len() - 1] - after[after.len() - 1 - regular] >= Duration::from_secs(5)
    });
    // The same containers, and supervision goes on: a killed task is replaced.
    wait_for(Duration::from_secs(30), "a healthy node", || node.healthy());
    assert!(agent.alive(), "{}", agent.log());
    assert_eq!(node.containers(), before, "the same containers");
    let linkerd = node.container("linkerd").unwrap();
    node.engine.cli(&["kill", &linkerd]);
    wait_for(Duration::from_secs(30), "linkerd replaced", || {
        node.container("linkerd").is_some_and(|c| c != linkerd) && node.healthy()
    });

    assert!(agent.sigterm().success());
    let last = listener.last_after_stopping();
    assert!(last.starts_with("STOPPING=1\n"), "{last}");
    assert!(
        last.contains("STATUS=stopping; the tasks keep running"),
        "{last}"
    );
}

/// One native journal entry: fields by name.
fn parse_entry(datagram: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let line_end = rest
            .iter()
            .position(|b| *b == b'\n')
            .expect("a field ends with \\n");
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            rest = &rest[line_end + 1..];
        } else {
            // NAME\n, a little-endian u64 length, the value, \n.
            let name = String::from_utf8_lossy(line).into_owned();
            let after = &rest[line_end + 1..];
            let len = u64::from_le_bytes(after[..8].try_into().unwrap()) as usize;
            let value = String::from_utf8_lossy(&after[8..8 + len]).into_owned();
            assert_eq!(after[8 + len], b'\n');
            fields.insert(name, value);
            rest = &after[8 + len + 1..];
        }
    }
    fields
}

#[test]
fn under_systemd_entries_go_to_the_journal_with_fields() {
    if !netns::enter("under_systemd_entries_go_to_the_journal_with_fields") {
        return;
    }
    let node = Node::start(&[]);
    // A private /run holding systemd/journal/socket, mounted over /run for nodeagent alone
    // (a private mount namespace): tracing-journald sends to the real path.
    let run = node.world.root.path().join("fake-run");
    std::fs::create_dir_all(run.join("systemd/journal")).unwrap();
    // Read as entries arrive: a datagram socket's queue is short, and a full one blocks the
    // sender.
    let journal = Listener::bind(&run.join("systemd/journal/socket"));
    let stderr_path = node.world.root.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /run && exec "$@""#)
        .arg(&run)
        .arg(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["run", "--once", "--root"])
        .arg(node.world.root.path())
        .env("DOCKER_HOST", &node.engine.socket)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr);
    node.world.wire(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        std::fs::read_to_string(&stderr_path).unwrap()
    );
    let entries = || -> Vec<BTreeMap<String, String>> {
        journal
            .datagrams()
            .iter()
            .filter(|d| !d.is_empty())
            .map(|d| parse_entry(d))
            .collect()
    };
    // Its last word, sent before it exited; the reading thread may lag.
    wait_for(Duration::from_secs(5), "the last entry read", || {
        entries()
            .iter()
            .any(|e| e.get("MESSAGE").map(String::as_str) == Some("all tasks started"))
    });
    let entries = entries();
    let stderr_text = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !stderr_text.contains("INFO"),
        "events go to the journal, not stderr: {stderr_text}"
    );
    for e in &entries {
        assert_eq!(e["SYSLOG_IDENTIFIER"], "nodeagent", "{e:?}");
        assert!(
            e.contains_key("PRIORITY") && e.contains_key("MESSAGE"),
            "{e:?}"
        );
    }
    let find = |key: &str, value: &str| {
        entries
            .iter()
            .find(|e| e.get(key).map(String::as_str) == Some(value))
            .unwrap_or_else(|| panic!("no entry with {key}={value}: {entries:#?}"))
    };
    let started = entries
        .iter()
        .find(|e| {
            e.get("MESSAGE")
                .is_some_and(|m| m.starts_with("linkerd: started "))
                && e.get("NODEAGENT_TASK").map(String::as_str) == Some("linkerd")
        })
        .unwrap_or_else(|| panic!("no `started` entry for linkerd: {entries:#?}"));
    assert_eq!(
        started["INSTANCE_ID"], node.world.info.instance_id,
        "{started:?}"
    );
    assert_eq!(started["NODEAGENT_PHASE"], "supervise", "{started:?}");
    let found = find("MESSAGE", "found the Consul servers");
    assert_eq!(found["NODEAGENT_PHASE"], "discover", "{found:?}");
    assert_eq!(found["INSTANCE_ID"], node.world.info.instance_id);
    let joined = find("NODEAGENT_PHASE", "join");
    assert!(
        joined["MESSAGE"].contains("joined the ECS cluster"),
        "{joined:?}"
    );
}

/// `nodeagent status --root ROOT ARGS...` of a world's agent: exit code, stdout, stderr.
fn world_status(world: &World, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .arg("status")
        .arg("--root")
        .arg(world.root.path())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn world_status_json(world: &World) -> Option<serde_json::Value> {
    let (code, out, _) = world_status(world, &["--json"]);
    (code == 0 || code == 1).then(|| serde_json::from_str(&out).expect("status --json is JSON"))
}

#[test]
fn a_boot_waiting_on_the_ecs_agent_says_so_extends_and_stops_cleanly_on_sigterm() {
    let world = World::start(&["--agent-ready-after", "60"]);
    let config = world.config("");
    let notify = world.root.path().join("notify.sock");
    let listener = Listener::bind(&notify);
    let mut agent = Agent::start_with(&world, crate::support::NO_DOCKER, &config, "agent", |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify);
    });
    wait_for(Duration::from_secs(20), "the wait to show", || {
        listener
            .texts()
            .iter()
            .any(|m| m.contains("STATUS=waiting for the ECS agent (2 s)"))
    });
    let s = world_status_json(&world).expect("the agent answers while it boots");
    assert_eq!(s["phase"], "discover");
    assert!(
        s["phase_detail"]
            .as_str()
            .unwrap()
            .starts_with("waiting for the ECS agent ("),
        "{s}"
    );
    let (code, table, _) = world_status(&world, &[]);
    assert_eq!(code, 1, "booting is not healthy: {table}");
    let texts = listener.texts();
    let waits: Vec<&String> = texts.iter().filter(|m| m.contains("waiting for")).collect();
    assert!(
        waits
            .iter()
            .all(|m| m.starts_with("EXTEND_TIMEOUT_USEC=30000000\n")),
        "each wait extends the start-up: {waits:#?}"
    );

    assert!(
        agent.sigterm().success(),
        "a stop during the boot is a clean stop"
    );
    let last = listener.last_after_stopping();
    assert!(last.starts_with("STOPPING=1\n"), "{last}");
    assert!(!world.path("/run/nodeagent/nodeagent.sock").exists());
    assert!(
        agent.log().contains("stopping during the boot"),
        "{}",
        agent.log()
    );
}
