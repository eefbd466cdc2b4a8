//! A whole node with the docker runtime and the DEFAULT task configuration — the real images'
//! names, commands, entrypoints and mounts, unchanged — run by faithful stand-ins of those
//! images (`tests/world/standins.sh`: Consul drops to uid 100 and reads its config file,
//! registrator needs the Docker socket, linkerd reads its YAML). The test's configuration file
//! only points nodeagent at the test world; a test adds what it is about in `conf.d`.
//!
//! Call [`super::netns::enter`] first: the stand-ins listen on the real ports (8500, 9990) of
//! the node's address, which is 127.0.0.1 in the test's own network namespace.

use super::agent::Agent;
use super::docker::Engine;
use super::World;
use std::path::PathBuf;
use std::process::Command;

/// The node's address: the loopback of the test's network namespace.
pub const NODE_IP: &str = "127.0.0.1";

pub struct Node {
    pub world: World,
    pub engine: Engine,
}

impl Node {
    /// A world (extra `world_args`) whose instance metadata gives the node [`NODE_IP`], a
    /// private engine with the stand-in images, and the node's configuration file at its
    /// default place under the test's root.
    pub fn start(world_args: &[&str]) -> Node {
        let mut args = vec!["--imds-set", "local-ipv4=127.0.0.1"];
        args.extend_from_slice(world_args);
        let world = World::start(&args);
        let engine = Engine::with_standins();
        // The node's Docker socket (mounted into registrator and consul) is the engine's.
        let sock = world.path("/var/run/docker.sock");
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(engine.socket.trim_start_matches("unix://"), &sock).unwrap();
        let node = Node { world, engine };
        node.write(
            "/etc/nodeagent/nodeagent.toml",
            &format!(
                "# The test world's endpoints; everything else is the built-in default.\n\
                 runtime = \"docker\"\n[ecs]\nintrospection_url = \"{}\"\nagent_timeout = \"30s\"\n",
                node.world.info.agent_url
            ),
        );
        node
    }

    /// Writes a host file of the node (under the test's root).
    pub fn write(&self, host_path: &str, text: &str) {
        let path = self.world.path(host_path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A configuration fragment: `/etc/nodeagent/conf.d/NAME`.
    pub fn conf_d(&self, name: &str, text: &str) {
        self.write(&format!("/etc/nodeagent/conf.d/{name}"), text);
    }

    /// `nodeagent run --root ROOT` (the default configuration path under it), as the unit
    /// runs it: umask 0027, the engine as `DOCKER_HOST`.
    pub fn run(&self, name: &str) -> Agent {
        self.run_with(name, |_| {})
    }

    pub fn run_with(&self, name: &str, customize: impl FnOnce(&mut Command)) -> Agent {
        Agent::spawn(&self.world, &self.engine.socket, &["run"], name, customize)
    }

    /// `nodeagent ARGS... --root ROOT`, finished.
    pub fn nodeagent(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
        cmd.args(args).arg("--root").arg(self.world.root.path());
        self.world.wire(&mut cmd);
        cmd.env("DOCKER_HOST", &self.engine.socket);
        cmd.output().unwrap()
    }

    /// `nodeagent status --json`: `None` when no agent answers (exit 3 or 4).
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.nodeagent(&["status", "--json"]);
        matches!(out.status.code(), Some(0 | 1))
            .then(|| serde_json::from_slice(&out.stdout).expect("status --json is JSON"))
    }

    /// One task of `nodeagent status --json`.
    pub fn task(&self, name: &str) -> Option<serde_json::Value> {
        self.status()?["tasks"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
    }

    /// Every task's state, by name.
    pub fn states(&self) -> Vec<(String, String)> {
        let Some(s) = self.status() else {
            return Vec::new();
        };
        s["tasks"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        (
                            t["name"].as_str().unwrap_or_default().to_string(),
                            t["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The node is healthy (`status --json`: every task healthy).
    pub fn healthy(&self) -> bool {
        self.status().is_some_and(|s| s["healthy"] == true)
    }

    /// Healthy, every task one an earlier agent started (adopted by this one).
    pub fn healthy_and_adopted(&self) -> bool {
        self.status().is_some_and(|s| {
            s["healthy"] == true
                && s["tasks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|t| t["adopted"] == true)
        })
    }

    /// The running containers of this node's tasks: (task, container id), sorted.
    pub fn containers(&self) -> Vec<(String, String)> {
        let out = self.engine.cli(&[
            "ps",
            "--no-trunc",
            "--filter",
            &format!("label=io.nodeagent.node={}", self.world.info.instance_id),
            "--format",
            "{{.Label \"io.nodeagent.task\"}} {{.ID}}",
        ]);
        let mut found: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, id)| (t.to_string(), id.to_string()))
            .collect();
        found.sort();
        found
    }

    /// The container of `task`, if one runs.
    pub fn container(&self, task: &str) -> Option<String> {
        self.containers()
            .into_iter()
            .find(|(t, _)| t == task)
            .map(|(_, id)| id)
    }

    /// A host path of the node.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.world.path(host_path)
    }
}
