//! Private Docker engines for tests (`tests/world/dockerd.sh`): one per test, under a short /tmp
//! directory (unix socket paths are limited), with the busybox test image imported, stopped by
//! PID on drop. An engine that cannot start fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub const IMAGE: &str = "nodeagent-test/busybox:1";

fn script() -> PathBuf {
    super::repo().join("tests/world/dockerd.sh")
}

/// `dockerd.sh ARGS...`: its one line of output; panics (loudly) when it fails.
pub fn dockerd_sh(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/world/dockerd.sh {args:?}: {e}"));
    assert!(
        out.status.success(),
        "tests/world/dockerd.sh {args:?} failed ({}): these tests need a private Docker engine",
        out.status
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Installs dockerd and busybox once per test binary.
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        dockerd_sh(&["install"], &[]);
    });
}

pub struct Engine {
    pub dir: tempfile::TempDir,
    pub socket: String,
    pub image: String,
}

impl Engine {
    /// A running engine with the image imported.
    pub fn start() -> Engine {
        let mut engine = Engine::stopped();
        engine.up();
        engine
    }

    /// A running engine with the stand-ins of the foundational images
    /// (`tests/world/standins.sh`), under the real images' names.
    pub fn with_standins() -> Engine {
        let engine = Engine::start();
        let out = Command::new("bash")
            .arg(super::repo().join("tests/world/standins.sh"))
            .args(["build", &engine.socket])
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/world/standins.sh");
        assert!(
            out.status.success(),
            "tests/world/standins.sh build failed: the node tests need the stand-in images"
        );
        engine
    }

    /// An engine directory with nothing running in it yet: `socket` is where the engine will
    /// listen once `up()` starts it; `image` is empty until then.
    pub fn stopped() -> Engine {
        install();
        let dir = tempfile::Builder::new()
            .prefix("na-")
            .tempdir_in("/tmp")
            .expect("create an engine directory in /tmp");
        let socket = format!("unix://{}/docker.sock", dir.path().display());
        Engine {
            dir,
            socket,
            image: String::new(),
        }
    }

    /// Starts (again) the engine in this directory and makes sure the image is there.
    pub fn up(&mut self) {
        let socket = dockerd_sh(&["start", self.dir_str()], &[]);
        assert_eq!(socket, self.socket, "the engine listens where expected");
        self.image = dockerd_sh(&["image", &self.socket], &[]);
    }

    /// Stops the engine and everything it runs.
    pub fn down(&self) {
        // Kill what still runs first: a clean dockerd shutdown would wait for each container.
        dockerd_sh(
            &["stop", self.dir_str()],
            &[("NODEAGENT_DOCKERD_KILL_CONTAINERS", "1")],
        );
    }

    /// The Docker boundary connected to this engine.
    pub async fn client(&self) -> nodeagent::docker::BollardDocker {
        nodeagent::docker::BollardDocker::connect_to(&self.socket)
            .await
            .expect("connect to the private engine")
    }

    /// bollard itself, for what the boundary does not offer (kill, raw inspect, commit).
    pub fn raw(&self) -> bollard::Docker {
        let api = bollard::ClientVersion {
            major_version: 1,
            minor_version: 41,
        };
        bollard::Docker::connect_with_unix(&self.socket, 30, &api).expect("raw bollard client")
    }

    /// The engine's dockerd process.
    pub fn dockerd_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.path().join("dockerd.pid"))
            .expect("the engine's dockerd.pid")
            .trim()
            .parse()
            .expect("a pid in dockerd.pid")
    }

    fn dir_str(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What the ECS agent would run for a task: a container labelled with its ARN and cluster.
    /// Returns its id.
    pub fn run_ecs_container(&self, task_arn: &str, cluster: &str) -> String {
        self.cli(&[
            "run",
            "-d",
            "--network",
            "host",
            "--label",
            &format!("com.amazonaws.ecs.task-arn={task_arn}"),
            "--label",
            &format!("com.amazonaws.ecs.cluster={cluster}"),
            IMAGE,
            "sleep",
            "100000",
        ])
    }

    /// What a container wrote, stdout and stderr.
    pub fn logs(&self, id: &str) -> String {
        let out = Command::new("docker")
            .arg("-H")
            .arg(&self.socket)
            .args(["logs", id])
            .output()
            .expect("run the docker CLI");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The docker CLI pointed at this engine.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .arg("-H")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run the docker CLI");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let dir = self.dir_str().to_string();
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.down()));
        if stopped.is_err() {
            eprintln!("warning: could not stop the engine in {dir}");
        }
    }
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
