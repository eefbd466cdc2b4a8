//! The integration-test harness: one test world (moto + fixtures, `tests/world/world.py`) per
//! test, a temporary `--root` per test, and the real `nodeagent` binary driven against them.
//! Every process started here is stopped by its PID when the test ends. A missing world (no
//! venv, setup failure) fails the test loudly: nothing here skips.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod agent;
pub mod docker;
pub mod faults;
pub mod fleet;
pub mod netns;
pub mod node;
pub mod notify;
pub mod sim;

use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// What the world reports once it is up.
#[derive(Debug, Clone, Deserialize)]
pub struct WorldInfo {
    pub moto_url: String,
    pub imds_url: String,
    pub agent_url: String,
    pub control_url: String,
    pub consul_url: String,
    pub region: String,
    pub cluster: String,
    pub instance_id: String,
    pub local_ipv4: String,
    pub server_ips: Vec<String>,
    pub stopped_server_ips: Vec<String>,
    /// Every node of the world (`--nodes`; one by default, the fields above).
    #[serde(default)]
    pub nodes: Vec<NodeInfo>,
    pub pid: u32,
}

/// One node of a world: its instance, its IMDS and its ECS agent fixture.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    pub instance_id: String,
    pub local_ipv4: String,
    pub imds_url: String,
    pub agent_url: String,
}

pub struct World {
    child: Child,
    pub info: WorldInfo,
    pub root: tempfile::TempDir,
}

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The world's Python: `tests/world/setup.sh` makes (or finds) the venv, once per test binary.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("tests/world/setup.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/world/setup.sh");
        assert!(
            out.status.success(),
            "tests/world/setup.sh failed: the test world (moto venv) is required"
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("setup.sh prints the venv python")
                .trim(),
        )
    })
}

impl World {
    /// Starts a world whose ECS agent fixture reads this test's ecs.config.
    pub fn start(args: &[&str]) -> World {
        let root = tempfile::tempdir().unwrap();
        let ecs_config = root.path().join("etc/ecs/ecs.config");
        World::start_in(root, &ecs_config, args)
    }

    /// Starts a world of `nodes` nodes (`--nodes`): node K's ECS agent fixture reads
    /// `ROOT/node-K/etc/ecs/ecs.config`, the ecs.config of a nodeagent run with `--root
    /// ROOT/node-K` ([`World::node_root`]).
    pub fn start_nodes(nodes: usize, args: &[&str]) -> World {
        let root = tempfile::tempdir().unwrap();
        let ecs_config = root.path().join("node-{node}/etc/ecs/ecs.config");
        let n = nodes.to_string();
        let args: Vec<&str> = ["--nodes", n.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        World::start_in(root, &ecs_config, &args)
    }

    /// Node K's root (`--root`) in a world of [`World::start_nodes`].
    pub fn node_root(&self, k: usize) -> PathBuf {
        self.root.path().join(format!("node-{k}"))
    }

    fn start_in(root: tempfile::TempDir, ecs_config: &Path, args: &[&str]) -> World {
        let mut child = Command::new(python())
            .arg(repo().join("tests/world/world.py"))
            .arg("serve")
            .arg("--ecs-config")
            .arg(ecs_config)
            .args(args)
            .stdout(Stdio::piped())
            // The world's log stays with the test's root, out of the test output.
            .stderr(std::fs::File::create(root.path().join("world.log")).unwrap())
            .spawn()
            .expect("start tests/world/world.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim().is_empty() {
            let _ = child.kill();
            let log = std::fs::read_to_string(root.path().join("world.log")).unwrap_or_default();
            panic!(
                "the test world exited before it was up: {:?}\n{log}",
                child.wait()
            );
        }
        let info: WorldInfo = serde_json::from_str(&line).expect("world JSON line");
        World { child, info, root }
    }

    /// Writes a config file pointing at this world's ECS agent, plus `extra` TOML.
    pub fn config(&self, extra: &str) -> PathBuf {
        let path = self.root.path().join("nodeagent.toml");
        std::fs::write(&path, config_text(&self.info.agent_url, "30s", extra)).unwrap();
        path
    }

    /// `nodeagent run --config CONFIG --root ROOT --once`, wired to this world.
    pub fn nodeagent(&self, config: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
        cmd.args(["run", "--once", "--config"])
            .arg(config)
            .arg("--root")
            .arg(self.root.path());
        self.wire(&mut cmd);
        cmd
    }

    /// The environment that points the AWS SDK and the IMDS client at this world; the umask
    /// of nodeagent.service (`UMask=0027`), so a mode nodeagent forgets to set shows.
    pub fn wire(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask(2) is async-signal-safe and touches nothing but the child's mask.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o027));
                Ok(())
            });
        }
        cmd.env("AWS_ENDPOINT_URL", &self.info.moto_url)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &self.info.imds_url)
            .env("AWS_REGION", &self.info.region)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env_remove("AWS_PROFILE")
            .env_remove("RUST_LOG");
    }

    pub fn run_once(&self, config: &Path) -> Output {
        self.nodeagent(config).output().unwrap()
    }

    /// A host path under this test's root.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.path().join(host_path.trim_start_matches('/'))
    }

    pub fn read(&self, host_path: &str) -> String {
        std::fs::read_to_string(self.path(host_path))
            .unwrap_or_else(|e| panic!("read {host_path}: {e}"))
    }

    pub async fn sdk(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.info.moto_url)
            .region(aws_config::Region::new(self.info.region.clone()))
            .credentials_provider(aws_sdk_ecs::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await
    }

    /// This node's container instance ARN, as the ECS agent fixture registered it.
    pub async fn container_instance(&self) -> Option<String> {
        let ecs = aws_sdk_ecs::Client::new(&self.sdk().await);
        let out = ecs
            .list_container_instances()
            .cluster(&self.info.cluster)
            .send()
            .await
            .unwrap();
        let arns = out.container_instance_arns();
        assert!(arns.len() <= 1, "at most one registered container instance");
        arns.first().cloned()
    }

    /// The RUNNING tasks on this node's container instance: (family, startedBy, ARN), sorted.
    pub async fn running_tasks(&self) -> Vec<(String, String, String)> {
        let ecs = aws_sdk_ecs::Client::new(&self.sdk().await);
        let Some(ci) = self.container_instance().await else {
            return Vec::new(); // not registered yet
        };
        let arns = ecs
            .list_tasks()
            .cluster(&self.info.cluster)
            .container_instance(&ci)
            .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
            .send()
            .await
            .unwrap()
            .task_arns()
            .to_vec();
        if arns.is_empty() {
            return Vec::new();
        }
        let described = ecs
            .describe_tasks()
            .cluster(&self.info.cluster)
            .set_tasks(Some(arns))
            .send()
            .await
            .unwrap();
        let mut tasks: Vec<(String, String, String)> = described
            .tasks()
            .iter()
            .filter(|t| t.last_status() == Some("RUNNING"))
            .map(|t| {
                let family = t
                    .task_definition_arn()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string();
                (
                    family,
                    t.started_by().unwrap_or_default().to_string(),
                    t.task_arn().unwrap().to_string(),
                )
            })
            .collect();
        tasks.sort();
        tasks
    }

    /// `StopTask` in the emulated ECS, as ECS does when a task's essential container exits.
    pub async fn stop_ecs_task(&self, arn: &str) {
        aws_sdk_ecs::Client::new(&self.sdk().await)
            .stop_task()
            .cluster(&self.info.cluster)
            .task(arn)
            .send()
            .await
            .unwrap();
    }

    /// The autoscaling health of this node's instance (`Healthy`, `Unhealthy`), from a
    /// synchronous test.
    pub fn instance_health(&self) -> Option<String> {
        block_on(async {
            let asg = aws_sdk_autoscaling::Client::new(&self.sdk().await);
            let out = asg
                .describe_auto_scaling_instances()
                .instance_ids(&self.info.instance_id)
                .send()
                .await
                .ok()?;
            out.auto_scaling_instances()
                .first()?
                .health_status()
                .map(str::to_string)
        })
    }

    /// A call to the world's control API.
    pub async fn control(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let url = format!("{}{path}", self.info.control_url);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let req = match method {
            "GET" => http.get(url),
            _ => http.post(url).json(&body),
        };
        let resp = req.send().await.unwrap().error_for_status().unwrap();
        resp.json().await.unwrap_or(serde_json::Value::Null)
    }

    /// Runs a Consul server instance in moto (tagged as the default discovery looks for):
    /// its private IP.
    pub fn run_consul_server(&self) -> String {
        block_on(self.run_consul_server_async())
    }

    /// [`World::run_consul_server`] in an async test.
    pub async fn run_consul_server_async(&self) -> String {
        let ec2 = aws_sdk_ec2::Client::new(&self.sdk().await);
        let node = ec2
            .describe_instances()
            .instance_ids(&self.info.instance_id)
            .send()
            .await
            .unwrap();
        let image = node.reservations()[0].instances()[0]
            .image_id()
            .unwrap()
            .to_string();
        let tag = aws_sdk_ec2::types::Tag::builder()
            .key("Name")
            .value("l5d-demo-consul-server")
            .build();
        let run = ec2
            .run_instances()
            .image_id(image)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                    .tags(tag)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        run.instances()[0].private_ip_address().unwrap().to_string()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Stopped by its PID, whatever the test's outcome.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Docker socket that is not there: an ECS node's agent with no engine to watch (task deaths
/// are seen by the reconcile only), or a host with no engine.
pub const NO_DOCKER: &str = "unix:///nonexistent/docker.sock";

/// A node's configuration in the test world: its ECS agent fixture at `agent_url`, waited for
/// `agent_timeout`; `extra` TOML. No Consul or linkerd answers in the test world: their default
/// health checks are off.
pub fn config_text(agent_url: &str, agent_timeout: &str, extra: &str) -> String {
    format!(
        "[ecs]\nintrospection_url = \"{agent_url}\"\nagent_timeout = \"{agent_timeout}\"\n{extra}\n\
         [tasks.consul-agent.health]\nhttp = \"\"\n[tasks.linkerd.health]\nhttp = \"\"\n"
    )
}

/// Runs a future to completion from a synchronous test.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// stdout + stderr of a finished nodeagent, for assertion messages.
pub fn transcript(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The one way tests wait: polls `cond` every 50 ms for up to `limit`; panics naming `what`
/// when it never holds.
pub fn wait_for(limit: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        eventually(limit, cond),
        "timed out after {limit:?} waiting for {what}"
    );
}

/// Polls `cond` every 50 ms for up to `limit`; whether it held (for a caller that explains a
/// timeout itself).
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// [`wait_for`] in an async test: `cond` is awaited every 100 ms for up to `limit`.
pub async fn wait_for_async(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process stopped with SIGSTOP, continued (SIGCONT) when dropped whatever happens, so it can
/// be stopped later.
pub struct Frozen(i32);

impl Frozen {
    pub fn freeze(pid: i32) -> Frozen {
        assert!(std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Every file under `root`, as paths relative to it, sorted.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                found.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// `GET path` over HTTP/1.0 on 127.0.0.1:`port`: the whole answer; `None` when nothing
/// listens.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    Some(answer)
}
