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

    /// The engine's own record of container events from `since` (a [`stamp`] taken before the
    /// action) until now, `filters` as `docker events --filter` takes them: (the container's
    /// `io.nodeagent.task` label, the action, its exit code for a `die`, epoch seconds on the
    /// engine's clock), in order.
    pub fn events(&self, since: &str, filters: &[&str]) -> Vec<Event> {
        let mut args = vec![
            "events".to_string(),
            "--since".to_string(),
            since.to_string(),
            "--until".to_string(),
            stamp(),
            "--filter".to_string(),
            "type=container".to_string(),
        ];
        for f in filters {
            args.extend(["--filter".to_string(), f.to_string()]);
        }
        args.extend([
            "--format".to_string(),
            "{{index .Actor.Attributes \"io.nodeagent.task\"}} {{.Action}} \
             {{index .Actor.Attributes \"exitCode\"}} {{.TimeNano}}"
                .to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli(&args)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                assert_eq!(f.len(), 4, "an event line: {l:?}");
                Event {
                    task: f[0].to_string(),
                    action: f[1].to_string(),
                    exit_code: f[2].parse().ok(),
                    at: f[3].parse::<f64>().unwrap() / 1e9,
                }
            })
            .collect()
    }

    /// Follows what container `id` writes (`docker logs --follow --timestamps`) from its first
    /// line until it ends, into `path` — what a container wrote before it was removed.
    pub fn follow_logs(&self, id: &str, path: &Path) -> Follow {
        let out = std::fs::File::create(path).unwrap();
        let child = Command::new("docker")
            .arg("-H")
            .arg(&self.socket)
            .args(["logs", "--follow", "--timestamps", id])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run the docker CLI");
        Follow {
            child,
            path: path.to_path_buf(),
        }
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

/// A container event from the engine's record ([`Engine::events`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The container's `io.nodeagent.task` label (empty without one).
    pub task: String,
    pub action: String,
    pub exit_code: Option<i64>,
    /// Epoch seconds, on the engine's clock.
    pub at: f64,
}

/// Now, as `docker events --since/--until` take it (epoch seconds and nanoseconds).
pub fn stamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// A container's output followed until it ends ([`Engine::follow_logs`]).
pub struct Follow {
    child: std::process::Child,
    path: PathBuf,
}

impl Follow {
    /// Once the container has ended (within `limit`): every line it wrote with the engine's
    /// time of it, epoch seconds.
    pub fn lines(mut self, limit: std::time::Duration) -> Vec<(f64, String)> {
        super::wait_for(limit, "the followed container to end", || {
            self.child.try_wait().unwrap().is_some()
        });
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (at, line) = l.split_once(' ')?;
                let at = humantime::parse_rfc3339(at).ok()?;
                let at = at.duration_since(std::time::UNIX_EPOCH).unwrap();
                Some((at.as_secs_f64(), line.to_string()))
            })
            .collect()
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
