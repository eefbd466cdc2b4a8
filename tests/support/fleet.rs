//! Fleets: many nodes scaling out at once against one AWS account's throttling, and what the
//! fleet benchmark (`benches/fleet`) and the fleet test (`tests/fleet.rs`) report about them.
//!
//! - [`BUCKETS`]: AWS's documented token buckets, which the test world's fault layer applies
//!   (`POST /buckets`) and the simulation ([`super::sim`]) models the same way;
//! - [`floor`]: how soon the buckets let every node make the calls it must make;
//! - [`Summary`]: the one line a run prints;
//! - [`Fleet`]: N real `nodeagent run` processes (ECS runtime, health checks off, each under its
//!   own `--root`) against one world of N nodes (`world.py serve --nodes N`), released at once
//!   by a start barrier (each agent's configuration file is a FIFO: started, every agent waits
//!   in that first read until all get theirs), watched through their status sockets; stopped by
//!   PID (SIGTERM: their tasks keep running, as on a node) when dropped.

use super::World;
use futures_util::future::join_all;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A token bucket of the account: a call takes a token from every bucket naming its operation
/// and is throttled when one is empty; `burst` tokens at most, refilled at `rate` a second.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    pub name: &'static str,
    pub ops: &'static [&'static str],
    pub burst: f64,
    pub rate: f64,
}

/// AWS's documented throttling of the calls a booting node makes (per account and region): ECS
/// `StartTask` shares burst 100 / refill 40 a second with `PutAttributes` and
/// `UpdateContainerInstancesState`; `DescribeTasks` 100/20; `ListTasks` (ECS's other reads)
/// 100/20; EC2's non-mutating `Describe*` (`DescribeInstances` with filters, `DescribeTags`)
/// 100/20.
pub const BUCKETS: &[Bucket] = &[
    Bucket {
        name: "ecs-start",
        ops: &[
            "ecs:StartTask",
            "ecs:PutAttributes",
            "ecs:UpdateContainerInstancesState",
        ],
        burst: 100.0,
        rate: 40.0,
    },
    Bucket {
        name: "ecs-describe-tasks",
        ops: &["ecs:DescribeTasks"],
        burst: 100.0,
        rate: 20.0,
    },
    Bucket {
        name: "ecs-list-tasks",
        ops: &["ecs:ListTasks"],
        burst: 100.0,
        rate: 20.0,
    },
    Bucket {
        name: "ec2-describe",
        ops: &["ec2:DescribeInstances", "ec2:DescribeTags"],
        burst: 100.0,
        rate: 20.0,
    },
];

/// The calls a node must make to boot (the Consul servers, the first listing, three starts,
/// the readiness attribute): the floor is what the buckets allow for these.
pub const MUST: &[(&str, u64)] = &[
    ("ec2:DescribeInstances", 1),
    ("ecs:ListTasks", 1),
    ("ecs:StartTask", 3),
    ("ecs:PutAttributes", 1),
];

/// The buckets at `scale` of AWS's numbers (burst and rate alike).
pub fn buckets(scale: f64) -> Vec<Bucket> {
    BUCKETS
        .iter()
        .map(|b| Bucket {
            burst: b.burst * scale,
            rate: b.rate * scale,
            ..*b
        })
        .collect()
}

/// The throttle floor, in seconds: how long the slowest bucket takes to let `nodes` nodes make
/// the calls they must make ([`MUST`]), its burst spent at once and its refill after.
pub fn floor(nodes: usize, scale: f64) -> f64 {
    buckets(scale)
        .iter()
        .map(|b| {
            let needed: u64 = MUST
                .iter()
                .filter(|(op, _)| b.ops.contains(op))
                .map(|(_, n)| n * nodes as u64)
                .sum();
            ((needed as f64 - b.burst) / b.rate).max(0.0)
        })
        .fold(0.0, f64::max)
}

/// What one run found; [`Summary::line`] is the line it prints.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub nodes: usize,
    /// Nodes with their three tasks started or adopted.
    pub converged: usize,
    /// Seconds from the first node's start until the last converged (`None`: not all did).
    pub converged_in: Option<f64>,
    pub floor: f64,
    /// Per node that set its readiness attribute: the AWS calls AWS served it until then
    /// (throttled attempts are counted apart, in `throttled`).
    pub boot_calls: Vec<u64>,
    /// Per node: the attempts AWS throttled until its readiness attribute was set.
    pub boot_throttled: Vec<u64>,
    /// AWS calls per node per minute over the steady window after convergence.
    pub steady_per_min: f64,
    /// Every throttled attempt of the run.
    pub throttled: u64,
    /// Families with more than one running task on a container instance.
    pub duplicates: usize,
    /// Agents that exited or gave up a task.
    pub give_ups: usize,
    /// What the line should also say (buckets scaled down, a simulation).
    pub note: Option<String>,
    /// Every call of the run by operation: (served, throttled).
    pub by_operation: std::collections::BTreeMap<String, (u64, u64)>,
}

/// The `p`-th quantile (0..=1) of `values`, nearest rank; 0 when empty.
pub fn quantile(values: &[u64], p: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n => v[((n - 1) as f64 * p).round() as usize],
    }
}

impl Summary {
    pub fn boot_calls_p50(&self) -> u64 {
        quantile(&self.boot_calls, 0.5)
    }

    /// `fleet: nodes=300 converged=300 in 34.2 s (throttle floor 27.5 s, x1.24) boot
    /// calls/node p50=6 max=8 steady calls/node/min=1.0 throttled=412 duplicates=0 give-ups=0`
    /// (Exactly this shape, whatever happened: checks outside the project parse it. What else
    /// the run should say — the buckets scaled down, a simulation — is [`Summary::note`].)
    pub fn line(&self) -> String {
        let (within, ratio) = match self.converged_in {
            Some(s) => (
                format!("{s:.1}"),
                format!("{:.2}", s / self.floor.max(f64::MIN_POSITIVE)),
            ),
            None => ("never".into(), "-".into()),
        };
        format!(
            "fleet: nodes={} converged={} in {within} s (throttle floor {:.1} s, x{ratio}) boot calls/node p50={} max={} steady calls/node/min={:.1} throttled={} duplicates={} give-ups={}",
            self.nodes,
            self.converged,
            self.floor,
            self.boot_calls_p50(),
            quantile(&self.boot_calls, 1.0),
            self.steady_per_min,
            self.throttled,
            self.duplicates,
            self.give_ups,
        )
    }
}

/// A real fleet: `nodes` nodes, the buckets at `scale` of AWS's numbers.
pub struct Fleet {
    pub world: World,
    pub nodes: Vec<FleetNode>,
    pub scale: f64,
    /// When the start barrier opened, and how long until every agent had its configuration.
    pub t0: SystemTime,
    pub spawned_in: Duration,
}

/// One node's agent and what was seen of it.
pub struct FleetNode {
    pub child: Child,
    pub root: PathBuf,
    /// Seconds after `t0` when its three tasks were started or adopted.
    pub converged_at: Option<f64>,
    /// Seconds after `t0` when its readiness attribute was set, and its calls until then
    /// (served, throttled).
    pub ready_at: Option<f64>,
    pub calls: Option<(u64, u64)>,
    pub exited: bool,
}

/// The log line of a task start that failed for good (the start's deadline, a refusal).
const GAVE_UP: &str = "could not start the task";

impl Fleet {
    /// Starts the world (`--nodes`, tags in the instance metadata as the example launch template
    /// has them), sets the buckets, then every node's `nodeagent run`, and opens the start
    /// barrier once every agent waits at it.
    pub async fn start(nodes: usize, scale: f64) -> Fleet {
        let world = World::start_nodes(nodes, &["--imds-tags"]);
        let groups: Vec<serde_json::Value> = buckets(scale)
            .iter()
            .map(|b| serde_json::json!({"name": b.name, "ops": b.ops, "burst": b.burst, "rate": b.rate}))
            .collect();
        world
            .control("POST", "/buckets", serde_json::json!({ "groups": groups }))
            .await;
        let mut starting = Vec::new();
        for (k, node) in world.info.nodes.iter().enumerate() {
            let root = world.node_root(k);
            std::fs::create_dir_all(&root).unwrap();
            let config = super::config_text(&node.agent_url, "2m", "");
            // The start barrier: the configuration file is a FIFO, the first thing `run` reads;
            // the agent waits in that read until the barrier opens.
            let path = root.join("nodeagent.toml");
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .expect("the start barrier's FIFO");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
            cmd.arg("run")
                .arg("--config")
                .arg(&path)
                .arg("--root")
                .arg(&root)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(root.join("nodeagent.log")).unwrap());
            world.wire(&mut cmd);
            // This node's instance metadata; no Docker engine (deaths by reconcile only).
            cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &node.imds_url)
                .env(
                    "DOCKER_HOST",
                    format!("unix://{}", root.join("no-docker.sock").display()),
                )
                .env_remove("NOTIFY_SOCKET");
            starting.push((cmd.spawn().expect("start nodeagent"), root, config));
        }
        // Every agent reaches the barrier (starting hundreds of processes on a loaded machine
        // takes seconds): its FIFO opens for writing without waiting once the agent has it open
        // for reading. Held open, so the agent waits in its read.
        let mut held: Vec<Option<std::os::fd::OwnedFd>> = starting.iter().map(|_| None).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut failed = None;
        while failed.is_none() && held.iter().any(Option::is_none) {
            for (k, (child, root, _)) in starting.iter_mut().enumerate() {
                if held[k].is_some() || failed.is_some() {
                    continue;
                }
                if let Ok(Some(exit)) = child.try_wait() {
                    failed = Some(format!(
                        "{} exited before the start barrier: {exit}",
                        root.display()
                    ));
                    continue;
                }
                let flags = rustix::fs::OFlags::WRONLY
                    | rustix::fs::OFlags::NONBLOCK
                    | rustix::fs::OFlags::CLOEXEC;
                match rustix::fs::open(
                    root.join("nodeagent.toml"),
                    flags,
                    rustix::fs::Mode::empty(),
                ) {
                    Ok(fd) => held[k] = Some(fd),
                    Err(rustix::io::Errno::NXIO) => {}
                    Err(e) => {
                        failed = Some(format!("the start barrier of {}: {e}", root.display()))
                    }
                }
            }
            if Instant::now() >= deadline {
                failed = Some("the agents did not all reach the start barrier in 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(why) = failed {
            // Every agent started is stopped by its PID before the test fails.
            for (child, _, _) in &mut starting {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("{why}");
        }
        // The barrier opens: every agent gets its configuration, back to back.
        let t0 = SystemTime::now();
        let started = Instant::now();
        for (fd, (_, _, config)) in held.into_iter().zip(&starting) {
            let written = rustix::io::write(fd.expect("held"), config.as_bytes());
            assert_eq!(written.ok(), Some(config.len()), "a whole configuration");
        }
        let spawned_in = started.elapsed();
        let nodes = starting
            .into_iter()
            .map(|(child, root, config)| {
                // The same configuration, now a regular file, for whoever reads it later.
                let file = root.join("nodeagent.toml.new");
                std::fs::write(&file, config).unwrap();
                std::fs::rename(&file, root.join("nodeagent.toml")).unwrap();
                FleetNode {
                    child,
                    root,
                    converged_at: None,
                    ready_at: None,
                    calls: None,
                    exited: false,
                }
            })
            .collect();
        Fleet {
            world,
            nodes,
            scale,
            t0,
            spawned_in,
        }
    }

    /// Asks every node that is not ready yet for its status, every `every`, until every node is
    /// ready (or exited), or `limit` passed.
    pub async fn watch(&mut self, every: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let pending: Vec<usize> = (0..self.nodes.len())
                .filter(|k| self.nodes[*k].ready_at.is_none() && !self.nodes[*k].exited)
                .collect();
            if pending.is_empty() {
                return;
            }
            let asked = join_all(pending.iter().map(|k| {
                let socket = self.nodes[*k].root.join("run/nodeagent/nodeagent.sock");
                async move { nodeagent::status::client::fetch(&socket).await.ok() }
            }))
            .await;
            let now = since(self.t0, SystemTime::now());
            for (k, status) in pending.into_iter().zip(asked) {
                let node = &mut self.nodes[k];
                if node.child.try_wait().ok().flatten().is_some() {
                    node.exited = true;
                    continue;
                }
                let Some(status) = status else { continue };
                let all =
                    status.tasks.len() == 3 && status.tasks.iter().all(|t| t.instance.is_some());
                if all && node.converged_at.is_none() {
                    // When the last task entered its state (started: no health checks), or now.
                    let last = status
                        .tasks
                        .iter()
                        .filter_map(|t| humantime::parse_rfc3339_weak(&t.since).ok())
                        .max();
                    node.converged_at = Some(last.map_or(now, |at| since(self.t0, at)).min(now));
                }
                if all && status.readiness.as_ref().and_then(|r| r.set) == Some(true) {
                    node.ready_at = Some(now);
                    let served = status
                        .aws_calls
                        .values()
                        .map(|c| c.calls - c.throttled)
                        .sum();
                    let throttled = status.aws_calls.values().map(|c| c.throttled).sum();
                    node.calls = Some((served, throttled));
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The summary, after watching: the steady window (`steady` after every node converged and
    /// set its readiness attribute) is waited for here; the world's own count of the calls
    /// made in it.
    pub async fn summary(&mut self, steady: Duration) -> Summary {
        let n = self.nodes.len();
        let converged: Vec<f64> = self.nodes.iter().filter_map(|x| x.converged_at).collect();
        let all_converged = converged.len() == n;
        let settled = self
            .nodes
            .iter()
            .map(|x| x.converged_at.unwrap_or(0.0).max(x.ready_at.unwrap_or(0.0)))
            .fold(0.0, f64::max);
        let measure_steady = all_converged && !steady.is_zero();
        if measure_steady {
            let until = self.t0 + Duration::from_secs_f64(settled) + steady;
            if let Ok(left) = until.duration_since(SystemTime::now()) {
                tokio::time::sleep(left).await;
            }
        }
        let stats = self
            .world
            .control("GET", "/stats", serde_json::Value::Null)
            .await;
        let mut steady_per_min = 0.0;
        if measure_steady {
            let from = epoch(self.t0) + settled;
            let to = from + steady.as_secs_f64();
            let calls = stats["aws"]["sequence"]
                .as_array()
                .map(|seq| {
                    seq.iter()
                        .filter_map(|c| c["at"].as_f64())
                        .filter(|at| *at >= from && *at < to)
                        .count()
                })
                .unwrap_or(0);
            steady_per_min = calls as f64 / n as f64 / (steady.as_secs_f64() / 60.0);
        }
        for node in &mut self.nodes {
            if node.child.try_wait().ok().flatten().is_some() {
                node.exited = true;
            }
        }
        let by_operation = stats["aws"]["by_operation"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(op, n)| {
                let throttled = stats["aws"]["throttled_by_operation"][op]
                    .as_u64()
                    .unwrap_or(0);
                let n = n.as_u64().unwrap_or(0);
                (op.clone(), (n - throttled, throttled))
            })
            .collect();
        let tasks = self
            .world
            .control("GET", "/ecs/tasks", serde_json::Value::Null)
            .await;
        let duplicates = tasks["container_instances"]
            .as_object()
            .map(|cis| {
                cis.values()
                    .flat_map(|families| families.as_object().into_iter().flat_map(|f| f.values()))
                    .filter(|count| count.as_u64().unwrap_or(0) > 1)
                    .count()
            })
            .unwrap_or(0);
        // Each node's log, read once: whether it gave a task up.
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|x| std::fs::read_to_string(x.root.join("nodeagent.log")).unwrap_or_default())
            .collect();
        let gave_up: Vec<bool> = self
            .nodes
            .iter()
            .zip(&logs)
            .map(|(x, log)| x.exited || log.contains(GAVE_UP))
            .collect();
        let give_ups = gave_up.iter().filter(|g| **g).count();
        // Why the first node that gave up did: its log's last lines.
        if let Some(k) = gave_up.iter().position(|g| *g) {
            let lines: Vec<&str> = logs[k].lines().collect();
            eprintln!(
                "fleet: {} gave up (exited: {}); its log ends:\n{}",
                self.nodes[k].root.display(),
                self.nodes[k].exited,
                lines[lines.len().saturating_sub(8)..].join("\n")
            );
        }
        Summary {
            nodes: n,
            converged: converged.len(),
            converged_in: all_converged.then(|| converged.iter().copied().fold(0.0, f64::max)),
            floor: floor(n, self.scale),
            boot_calls: self
                .nodes
                .iter()
                .filter_map(|x| x.calls.map(|c| c.0))
                .collect(),
            boot_throttled: self
                .nodes
                .iter()
                .filter_map(|x| x.calls.map(|c| c.1))
                .collect(),
            steady_per_min,
            throttled: stats["aws"]["throttled"].as_u64().unwrap_or(0),
            duplicates,
            give_ups,
            note: (self.scale < 1.0).then(|| {
                format!(
                    "buckets at {:.0}% of AWS's documented rates: scaled down, as the emulator \
                     (one Python process) cannot serve AWS's own",
                    self.scale * 100.0
                )
            }),
            by_operation,
        }
    }
}

/// Seconds from `t0` to `at` (0 before it).
fn since(t0: SystemTime, at: SystemTime) -> f64 {
    at.duration_since(t0).unwrap_or_default().as_secs_f64()
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Drop for Fleet {
    /// Every agent stopped by its PID: SIGTERM (the tasks keep running, as an agent's stop
    /// leaves them), then waited for; one that does not stop within 10 s is killed.
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(node.child.id() as i32).expect("a pid"),
                rustix::process::Signal::TERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &mut self.nodes {
            while node.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}
