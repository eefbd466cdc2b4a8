//! The baked-identity guard: `nodeagent prepare-image` (last step of the AMI build) and the
//! first-boot check in `nodeagent prepare`.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use support::{transcript, World};

/// Every file under `root`, as host paths.
fn files(root: &Path) -> BTreeSet<String> {
    support::files_under(root)
        .iter()
        .map(|rel| format!("/{}", rel.display()))
        .collect()
}

fn write(root: &Path, host_path: &str, text: &str) {
    let path = root.join(host_path.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

const IDENTITY: &[&str] = &[
    "/var/lib/ecs/data/ecs_agent_data.json",
    "/var/lib/ecs/data/agent.db",
    "/opt/consul/data/node-id",
    "/opt/consul/data/raft/peers.json",
    "/opt/consul/config/consul-agent.json",
    "/etc/linkerd/linkerd.yaml",
    "/opt/consul-registrator/bin/start.sh",
    "/var/lib/nodeagent/instance-id",
];

const KEPT: &[&str] = &[
    "/etc/nodeagent/nodeagent.toml",
    "/etc/hosts",
    "/opt/consul/config/extra.json",
    "/etc/linkerd/extra.txt",
    "/var/lib/ecs/ecs.other",
    "/etc/ecs/ecs.config",
];

/// A disk as an instance leaves it: its identity, and things that are not.
fn populated(config: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for path in IDENTITY {
        write(root.path(), path, "{\"EC2InstanceID\":\"i-0ba4ed0\"}\n");
    }
    for path in KEPT {
        write(root.path(), path, "kept\n");
    }
    write(root.path(), "/etc/nodeagent/nodeagent.toml", config);
    write(
        root.path(),
        "/etc/ecs/ecs.config",
        "# site settings\nECS_CLUSTER=prod\nECS_LOGLEVEL=debug\nECS_RESERVED_MEMORY=256\n",
    );
    root
}

fn prepare_image(root: &Path, docker: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["prepare-image", "--root"])
        .arg(root)
        .env("DOCKER_HOST", docker)
        .output()
        .unwrap()
}

const CONFIG: &str = "cluster = \"prod\"\n[ecs]\nintrospection_url = \"http://127.0.0.1:9\"\n";

#[test]
fn prepare_image_removes_exactly_the_instance_identity() {
    let root = populated(CONFIG);
    let out = prepare_image(root.path(), crate::support::NO_DOCKER);
    assert!(out.status.success(), "{}", transcript(&out));
    let left = files(root.path());
    let kept: BTreeSet<String> = KEPT.iter().map(|p| p.to_string()).collect();
    assert_eq!(left, kept, "the identity and nothing else is gone");
    // Directories are emptied, never removed: they may be mount points (StateDirectory=),
    // belong to a package, or to a task's image user.
    for dir in ["var/lib/ecs/data", "var/lib/nodeagent", "opt/consul/data"] {
        assert!(root.path().join(dir).is_dir(), "{dir} stays");
    }
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/ecs/ecs.config")).unwrap(),
        "# site settings\nECS_LOGLEVEL=debug\nECS_RESERVED_MEMORY=256\n",
        "only nodeagent's keys go"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("removed /opt/consul/data/node-id\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("removed /etc/ecs/ecs.config: ECS_CLUSTER"),
        "{stdout}"
    );

    // Again: nothing left to remove.
    let out = prepare_image(root.path(), crate::support::NO_DOCKER);
    assert!(out.status.success(), "{}", transcript(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(0 items)"));
}

#[test]
fn prepare_image_refuses_while_the_ecs_agent_or_containers_run() {
    // An ECS agent that answers.
    let world = World::start(&[]);
    write(
        world.root.path(),
        "/etc/ecs/ecs.config",
        "ECS_CLUSTER=l5d-demo\n",
    );
    let config = format!(
        "cluster = \"prod\"\n[ecs]\nintrospection_url = \"{}\"\n",
        world.info.agent_url
    );
    let root = populated(&config);
    support::wait_for(
        std::time::Duration::from_secs(10),
        "the agent fixture to come up",
        || std::net::TcpStream::connect(world.info.agent_url.trim_start_matches("http://")).is_ok(),
    );
    let out = prepare_image(root.path(), crate::support::NO_DOCKER);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the ECS agent answers at") && stderr.contains("systemctl stop ecs"),
        "{stderr}"
    );
    assert!(
        files(root.path()).contains("/opt/consul/data/node-id"),
        "nothing removed"
    );

    // A running container.
    let engine = support::docker::Engine::start();
    let id = engine.cli(&["run", "-d", support::docker::IMAGE, "sleep", "100000"]);
    let root = populated(CONFIG);
    let out = prepare_image(root.path(), &engine.socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 containers run") && stderr.contains(&id[..12]),
        "{stderr}"
    );
    assert!(
        files(root.path()).contains("/opt/consul/data/node-id"),
        "nothing removed"
    );
}

#[test]
fn first_boot_cleans_the_identity_of_the_instance_the_disk_was_baked_on() {
    let world = World::start(&[]);
    let config = world.config("");
    for path in IDENTITY {
        write(
            world.root.path(),
            path,
            "{\"EC2InstanceID\":\"i-0ba4ed0\"}\n",
        );
    }
    write(
        world.root.path(),
        "/var/lib/nodeagent/instance-id",
        "i-0baked\n",
    );
    let prepare = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
        cmd.args(["prepare", "--config"])
            .arg(&config)
            .arg("--root")
            .arg(world.root.path());
        world.wire(&mut cmd);
        cmd.output().unwrap()
    };
    let out = prepare();
    assert!(out.status.success(), "{}", transcript(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("carries the identity of instance i-0baked"),
        "{stderr}"
    );
    let left = files(world.root.path());
    for path in IDENTITY
        .iter()
        .filter(|p| **p != "/var/lib/nodeagent/instance-id")
    {
        assert!(!left.contains(*path), "{path} removed: {left:?}");
    }
    assert_eq!(
        world.read("/var/lib/nodeagent/instance-id"),
        format!("{}\n", world.info.instance_id)
    );
    assert!(world
        .read("/etc/ecs/ecs.config")
        .contains("ECS_CLUSTER=l5d-demo"));

    // The next boot of the same instance keeps what it has since made.
    write(world.root.path(), "/opt/consul/data/node-id", "mine\n");
    let out = prepare();
    assert!(out.status.success(), "{}", transcript(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("carries the identity"));
    assert_eq!(world.read("/opt/consul/data/node-id"), "mine\n");
}
