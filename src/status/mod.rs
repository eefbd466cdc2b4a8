//! Status: owns what the node reports about itself — one [`NodeStatus`] document, kept current
//! by the boot and the supervisor through a [`Board`], and the ways it is shown: the JSON of
//! `GET /v1/status` (field names are stable, see the README), the table of `nodeagent status`,
//! the one-line summary systemd shows, and the Prometheus text of `GET /metrics`.
//!
//! The agent serves it on a Unix socket ([`server`]); `nodeagent status` fetches it
//! ([`client`]).

pub mod client;
pub mod metrics;
pub mod notify;
pub mod server;
mod table;

use crate::aws::OpCount;
use crate::boot::{BootReport, PhaseTime};
pub use crate::config::trust::Ignored;
use crate::facts::InstanceFacts;
pub use crate::lifecycle::drain::DrainStatus;
pub use crate::lifecycle::rotate::{Rotated, SecretStatus};
pub use crate::phase::Phase;
use crate::render::RenderedFile;
use crate::supervisor::{State, TaskStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Version of the JSON document; bumped only when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything `GET /v1/status` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: u32,
    /// `null` until IMDS was read.
    pub instance_id: Option<String>,
    pub node: Option<Node>,
    pub phase: Phase,
    /// What the phase is waiting on, e.g. "waiting for the ECS agent (12 s)".
    pub phase_detail: Option<String>,
    /// In `supervise` and every task `healthy` (the tasks are listed, `starting`, from the
    /// moment supervision begins).
    pub healthy: bool,
    /// When this agent started (RFC 3339).
    pub started_at: String,
    /// Boot phases done so far, with how long each took.
    pub phases: Vec<PhaseTime>,
    pub cluster: String,
    /// `ecs` or `docker`.
    pub runtime: String,
    pub container_instance_arn: Option<String>,
    /// The readiness attribute; `null` without one (no container instance, or none configured).
    pub readiness: Option<Readiness>,
    /// The drain, once one began (`phase` is then `draining`, then `drained`).
    pub drain: Option<DrainStatus>,
    pub consul: Consul,
    pub tasks: Vec<Task>,
    pub files: Vec<File>,
    /// Calls and errors per AWS operation ("ecs:StartTask") since the agent started.
    pub aws_calls: BTreeMap<String, OpCount>,
    /// Keys a layer set and nodeagent did not take (not the layer's to set, or not a valid
    /// value): `key`, `layer`, `why` — never the value.
    #[serde(default)]
    pub ignored: Vec<Ignored>,
    /// The secrets in use: `name`, `source`, `version`, `read_at`, `refresh_s`, `rotated`
    /// (`from`, `to`, `at`), `error` — never a value.
    #[serde(default)]
    pub secrets: Vec<SecretStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub local_ipv4: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub region: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    /// The attribute's name, e.g. `nodeagent.ready`.
    pub attribute: String,
    /// Whether it is set on the container instance: `null` until nodeagent first set or
    /// removed it.
    pub set: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Consul {
    pub servers: Vec<String>,
    /// When the servers were found (RFC 3339).
    pub found_at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub name: String,
    /// `ecs` or `docker`.
    pub runtime: String,
    pub state: State,
    /// When the task entered its state (RFC 3339).
    pub since: String,
    pub restarts: u64,
    /// Container id or task ARN of the current instance.
    pub instance: Option<String>,
    pub last_exit: Option<Exit>,
    /// The last lines the instance that last ended wrote (`null` until one ended): why a
    /// failing task fails.
    pub last_output: Option<String>,
    /// Last health-check result: "ok" or why it failed; `null` before the first check or for
    /// a task without one.
    pub health: Option<String>,
    pub health_latency_ms: Option<f64>,
    /// The instance was found running, not started by this agent.
    pub adopted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    pub code: Option<i64>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct File {
    pub path: String,
    pub task: String,
    pub sha256: String,
    pub mode: String,
}

/// Told of every change, synchronously (the systemd notifier).
pub type Observer = Arc<dyn Fn(&NodeStatus) + Send + Sync>;

/// The live status: written by the agent's parts, read by the server; its observer hears
/// every change.
#[derive(Clone)]
pub struct Board {
    status: watch::Sender<NodeStatus>,
    observer: Option<Observer>,
}

impl Board {
    pub fn new(cluster: &str, runtime: &str, observer: Option<Observer>) -> Board {
        let status = NodeStatus {
            version: SCHEMA_VERSION,
            phase: Phase::Imds,
            started_at: rfc3339(SystemTime::now()),
            cluster: cluster.into(),
            runtime: runtime.into(),
            ..NodeStatus::default()
        };
        let board = Board {
            status: watch::channel(status).0,
            observer,
        };
        if let Some(observe) = &board.observer {
            observe(&board.snapshot());
        }
        board
    }

    pub fn subscribe(&self) -> watch::Receiver<NodeStatus> {
        self.status.subscribe()
    }

    pub fn snapshot(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// Applies `change`; readers wake, and the observer hears, only if something changed.
    pub fn update(&self, change: impl FnOnce(&mut NodeStatus)) {
        let changed = self.status.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            status.healthy = status.phase == Phase::Supervise
                && status.tasks.iter().all(|t| t.state == State::Healthy);
            *status != before
        });
        if let (true, Some(observe)) = (changed, &self.observer) {
            observe(&self.snapshot());
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.update(|s| {
            s.phase = phase;
            s.phase_detail = None;
        });
    }

    pub fn set_facts(&self, facts: &InstanceFacts) {
        self.update(|s| {
            s.instance_id = Some(facts.instance_id.clone());
            s.node = Some(Node {
                local_ipv4: facts.local_ipv4.clone(),
                availability_zone: facts.availability_zone.clone(),
                instance_type: facts.instance_type.clone(),
                region: facts.region.clone(),
            });
        });
    }

    /// The boot's findings; `found_at` is when the Consul servers were found.
    pub fn set_report(&self, report: &BootReport, imds: &PhaseTime, found_at: SystemTime) {
        self.update(|s| {
            // The boot's phases are timed from its own start, which follows the imds phase.
            let after_imds = report.phases.iter().map(|p| (p, imds.took_ms));
            s.phases = std::iter::once((imds, 0.0))
                .chain(after_imds)
                .map(|(p, offset)| PhaseTime {
                    phase: p.phase,
                    started_ms: p.started_ms + offset,
                    took_ms: p.took_ms,
                })
                .collect();
            s.container_instance_arn = report.container_instance_arn.clone();
            s.consul = Consul {
                servers: report.consul_servers.clone(),
                found_at: Some(rfc3339(found_at)),
            };
            s.files = files(&report.files);
        });
    }

    /// The rendered files as they are now (a rotation rendered them again).
    pub fn set_files(&self, rendered: &[RenderedFile]) {
        self.update(|s| s.files = files(rendered));
    }

    pub fn set_secrets(&self, secrets: Vec<SecretStatus>) {
        self.update(|s| s.secrets = secrets);
    }

    pub fn set_tasks(&self, tasks: &[TaskStatus]) {
        self.update(|s| {
            let runtime = s.runtime.clone();
            s.tasks = tasks
                .iter()
                .map(|t| Task {
                    name: t.name.clone(),
                    runtime: runtime.clone(),
                    state: t.state,
                    since: rfc3339(t.since),
                    restarts: t.restarts,
                    instance: t.instance.clone(),
                    last_exit: t.last_exit.as_ref().map(|e| Exit {
                        code: e.code,
                        reason: e.reason.clone(),
                    }),
                    last_output: t.last_output.clone(),
                    health: t.health.clone(),
                    health_latency_ms: t.health_latency.map(ms),
                    adopted: t.adopted,
                })
                .collect();
        });
    }

    pub fn set_aws_calls(&self, calls: BTreeMap<&'static str, OpCount>) {
        self.update(|s| s.aws_calls = calls.into_iter().map(|(k, v)| (k.into(), v)).collect());
    }
}

impl NodeStatus {
    /// One line for systemd's `STATUS=` and the journal: what the node is doing or how its
    /// tasks are.
    pub fn summary(&self) -> String {
        match self.phase {
            Phase::Imds => "reading instance metadata".into(),
            Phase::Join => format!("joining ECS cluster {}", self.cluster),
            Phase::Render => "rendering config files".into(),
            Phase::Stopping => "stopping; the tasks keep running".into(),
            Phase::Draining | Phase::Drained => {
                let d = self.drain.clone().unwrap_or_default();
                let failed = d.steps.iter().filter(|s| !s.ok).count();
                let mut line = if self.phase == Phase::Draining {
                    format!("draining ({}): {}", d.trigger, d.step)
                } else {
                    format!("drained ({}): the tasks are stopped", d.trigger)
                };
                if failed > 0 {
                    let _ = write!(line, "; {failed} steps failed");
                }
                line
            }
            Phase::Supervise if self.tasks.is_empty() => "no tasks to supervise".into(),
            Phase::Supervise => {
                let healthy = self
                    .tasks
                    .iter()
                    .filter(|t| t.state == State::Healthy)
                    .count();
                let mut line = format!("{healthy}/{} tasks healthy", self.tasks.len());
                for t in self.tasks.iter().filter(|t| t.state != State::Healthy) {
                    let _ = write!(line, "; {} {}", t.name, t.state.as_str());
                    if t.restarts > 0 {
                        let _ = write!(line, " ({} restarts)", t.restarts);
                    }
                }
                line
            }
            Phase::Discover | Phase::Agent => self
                .phase_detail
                .clone()
                .unwrap_or_else(|| "finding the Consul servers and the ECS agent".into()),
        }
    }
}

fn files(rendered: &[RenderedFile]) -> Vec<File> {
    rendered
        .iter()
        .map(|f| File {
            path: f.path.clone(),
            task: f.task.clone(),
            sha256: f.sha256.clone(),
            mode: format!("{:04o}", f.mode),
        })
        .collect()
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A task row as the board shows it (for the status tests).
    pub(crate) fn task(name: &str, state: State, restarts: u64) -> Task {
        Task {
            name: name.into(),
            runtime: "docker".into(),
            state,
            since: rfc3339(SystemTime::now()),
            restarts,
            ..Task::default()
        }
    }

    /// The JSON document is version 1: the typed phase and states serialize as the strings
    /// they always were, fields in their documented order.
    #[test]
    fn the_status_document_keeps_its_shape() {
        let s = NodeStatus {
            version: SCHEMA_VERSION,
            instance_id: Some("i-1".into()),
            phase: Phase::Supervise,
            phases: vec![PhaseTime {
                phase: Phase::Discover,
                started_ms: 1.5,
                took_ms: 2.0,
            }],
            tasks: vec![Task {
                last_exit: Some(Exit {
                    code: Some(3),
                    reason: "died".into(),
                }),
                ..task("linkerd", State::CrashLoop, 7)
            }],
            ..NodeStatus::default()
        };
        let mut json = serde_json::to_value(&s).unwrap();
        json["tasks"][0]["since"] = "T".into();
        assert_eq!(
            serde_json::to_string(&json).unwrap(),
            r#"{"aws_calls":{},"cluster":"","consul":{"found_at":null,"servers":[]},"container_instance_arn":null,"drain":null,"files":[],"healthy":false,"ignored":[],"instance_id":"i-1","node":null,"phase":"supervise","phase_detail":null,"phases":[{"phase":"discover","started_ms":1.5,"took_ms":2.0}],"readiness":null,"runtime":"","secrets":[],"started_at":"","tasks":[{"adopted":false,"health":null,"health_latency_ms":null,"instance":null,"last_exit":{"code":3,"reason":"died"},"last_output":null,"name":"linkerd","restarts":7,"runtime":"docker","since":"T","state":"crash-loop"}],"version":1}"#
        );
        let keys: Vec<String> = serde_json::to_string_pretty(&s)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("  \"") && l.contains("\":"))
            .map(|l| l.trim().split('"').nth(1).unwrap().to_string())
            .collect();
        assert_eq!(
            keys,
            [
                "version",
                "instance_id",
                "node",
                "phase",
                "phase_detail",
                "healthy",
                "started_at",
                "phases",
                "cluster",
                "runtime",
                "container_instance_arn",
                "readiness",
                "drain",
                "consul",
                "tasks",
                "files",
                "aws_calls",
                "ignored",
                "secrets"
            ],
            "the documented order"
        );
        let back: NodeStatus = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s, "the client reads what the server writes");
    }

    #[test]
    fn healthy_means_supervising_with_every_task_healthy() {
        let board = Board::new("c", "docker", None);
        board.update(|s| s.tasks = vec![task("a", State::Healthy, 0)]);
        assert!(!board.snapshot().healthy, "still booting");
        board.set_phase(Phase::Supervise);
        board.update(|s| s.tasks.clear());
        assert!(board.snapshot().healthy, "no task: nothing to wait for");
        board.update(|s| s.tasks = vec![task("a", State::Healthy, 0)]);
        board.set_phase(Phase::Supervise);
        assert!(board.snapshot().healthy);
        board.update(|s| s.tasks.push(task("b", State::CrashLoop, 6)));
        let s = board.snapshot();
        assert!(!s.healthy);
        assert_eq!(s.summary(), "1/2 tasks healthy; b crash-loop (6 restarts)");
    }

    #[test]
    fn the_summary_follows_the_phase() {
        let board = Board::new("prod", "ecs", None);
        assert_eq!(board.snapshot().summary(), "reading instance metadata");
        board.set_phase(Phase::Join);
        assert_eq!(board.snapshot().summary(), "joining ECS cluster prod");
        board.set_phase(Phase::Discover);
        board.update(|s| s.phase_detail = Some("waiting for the ECS agent (12 s)".into()));
        assert_eq!(
            board.snapshot().summary(),
            "waiting for the ECS agent (12 s)"
        );
        board.set_phase(Phase::Supervise);
        assert_eq!(board.snapshot().summary(), "no tasks to supervise");
    }
}
