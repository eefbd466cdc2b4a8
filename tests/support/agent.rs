//! A long-running nodeagent for tests and benchmarks, its log in a file.

use super::World;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running `nodeagent run` (no --once), its log in a file; SIGKILLed on drop.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start_with_docker(
        world: &World,
        docker: &str,
        config: &std::path::Path,
        name: &str,
    ) -> Agent {
        Agent::start_with(world, docker, config, name, |_| {})
    }

    /// Like `start_with_docker`, with `customize` applied to the command before it starts
    /// (environment, a wrapper).
    pub fn start_with(
        world: &World,
        docker: &str,
        config: &std::path::Path,
        name: &str,
        customize: impl FnOnce(&mut Command),
    ) -> Agent {
        let config = config.to_str().unwrap();
        Agent::spawn(world, docker, &["run", "--config", config], name, customize)
    }

    /// `nodeagent ARGS... --root ROOT` wired to `world`, `docker` its engine, its log in
    /// `ROOT/NAME.log`.
    pub fn spawn(
        world: &World,
        docker: &str,
        args: &[&str],
        name: &str,
        customize: impl FnOnce(&mut Command),
    ) -> Agent {
        let log = world.root.path().join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
        cmd.args(args)
            .arg("--root")
            .arg(world.root.path())
            .env("DOCKER_HOST", docker)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        world.wire(&mut cmd);
        customize(&mut cmd);
        Agent {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {}", self.child.id());
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.sigkill();
    }
}
