//! Types: owns what the settings are — every section, key and type, with its meaning. The
//! values are typed (durations, URLs, socket addresses, permission bits), so a setting that
//! parses is one later code uses as it is, never re-parsed or defaulted again; what types alone
//! cannot say is checked in [`super::validate`].

use super::values::{HttpUrl, Mode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

/// The validated settings. Every struct carries `#[serde(default)]` so that a single fragment
/// (which may set only a few keys) can be type-checked on its own; the real defaults come from
/// `defaults.toml`, merged underneath every fragment.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// ECS cluster this node joins.
    pub cluster: String,
    /// How the foundational tasks run: as ECS tasks, or as containers through the Docker API.
    pub runtime: RuntimeKind,
    pub consul: Consul,
    pub ecs: Ecs,
    pub supervision: Supervision,
    pub status: Status,
    pub metrics: Metrics,
    pub lifecycle: Lifecycle,
    /// What the image owner allows: the only section no layer but the files may set.
    pub trust: Trust,
    /// Free-form values made available to templates as `vars.*`.
    pub vars: BTreeMap<String, toml::Value>,
    /// The node's foundational tasks, keyed by name so layers merge per task.
    pub tasks: BTreeMap<String, Task>,
    /// Secrets fetched from SSM Parameter Store or Secrets Manager, by the name templates see
    /// them under (`secrets.<name>`).
    pub secrets: BTreeMap<String, Secret>,
}

/// Where a secret comes from, and how often it is read again.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Secret {
    /// `ssm:/NAME` (Parameter Store, a SecureString decrypted) or `secretsmanager:NAME_OR_ARN`
    /// with an optional `#KEY` (a field of a JSON secret).
    pub from: String,
    /// Read again this often (rotation); `0s`: read once, at boot.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for Secret {
    fn default() -> Self {
        Secret {
            from: String::new(),
            refresh: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// ECS tasks started with `StartTask` on this node's container instance.
    #[default]
    Ecs,
    /// Containers run directly through the local Docker engine (`DOCKER_HOST`), no ECS involved.
    Docker,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Ecs => "ecs",
            RuntimeKind::Docker => "docker",
        }
    }
}

/// The image owner's limits on the other layers and on paths ([`super::trust`]): set only in
/// /etc/nodeagent (root's files).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Trust {
    /// Keys user-data may not set: dotted prefixes, `*` for any one segment
    /// (`tasks.*.container`).
    pub locked: Vec<String>,
    /// Where configured paths may be — rendered files, task directories, templates,
    /// ecs.config — and what containers may mount: these directories (or files) and below.
    pub paths: Vec<String>,
    /// Host paths containers may mount besides `paths` and the Docker socket.
    pub mounts: Vec<String>,
}

/// How tasks are kept running.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Supervision {
    /// First delay of the restart backoff (after the first, immediate, restart).
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Cap of the restart backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A task healthy this long has its backoff reset.
    #[serde(with = "humantime_serde")]
    pub backoff_reset_after: Duration,
    /// This many restarts within `crash_loop_window` put a task in `crash-loop`.
    pub crash_loop_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub crash_loop_window: Duration,
    /// Full comparison of what runs with what should, as a backstop for missed events.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// How long a stopped container gets between SIGTERM and SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Lines of a crash-looping task's output written to the log.
    pub log_lines: usize,
    /// `READY=1` once every task is first healthy, or at the latest this long after
    /// supervision began — then as a degraded node, so systemd does not restart-loop an agent
    /// whose task keeps failing (it keeps retrying, self-heals and drains).
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
}

/// The status API (`nodeagent status`, `GET /v1/status`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Status {
    /// Unix socket the agent serves its status on (mode 0660, group `nodeagent`). Under `--root`
    /// when given. Never a TCP port: the status names the node's internals.
    pub socket: String,
}

/// The node's life in its cluster: the readiness attribute, reserved memory.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Lifecycle {
    /// Container-instance attribute set to "true" (`PutAttributes`) once every task is healthy
    /// and removed when the node stays degraded for `degraded_grace`; services opt in with the
    /// placement constraint `attribute:<name> == true`. Empty: no attribute.
    pub ready_attribute: String,
    /// Also register the attribute as "false" from the first registration
    /// (`ECS_INSTANCE_ATTRIBUTES` in ecs.config).
    pub ready_attribute_at_join: bool,
    /// How long a degraded node keeps its readiness attribute.
    #[serde(with = "humantime_serde")]
    pub degraded_grace: Duration,
    /// Docker runtime on an ECS node: reserve the supervised containers' memory from ECS
    /// (`ECS_RESERVED_MEMORY` = their `memory_mb` + `reserved_memory_margin_mb`).
    pub reserve_memory: bool,
    pub reserved_memory_margin_mb: u64,
    /// IMDS is polled this often for a reason to drain (autoscaling termination, spot
    /// interruption, rebalance recommendation).
    #[serde(with = "humantime_serde")]
    pub trigger_poll: Duration,
    /// Drain on a rebalance recommendation too (an early warning, not a notice).
    pub drain_on_rebalance: bool,
    /// How long a drain waits for the application tasks to stop.
    #[serde(with = "humantime_serde")]
    pub drain_tasks_timeout: Duration,
    /// Every other drain step is bounded by this.
    #[serde(with = "humantime_serde")]
    pub drain_step_timeout: Duration,
    /// The autoscaling group's terminating lifecycle hook, completed after a drain it caused;
    /// empty: none.
    pub lifecycle_hook: String,
    /// A task in crash-loop this long marks the instance Unhealthy in its autoscaling group
    /// (`SetInstanceHealth`); 0 (the default): never.
    #[serde(with = "humantime_serde")]
    pub unhealthy_after: Duration,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// `ADDRESS:PORT` to serve `GET /metrics` on, e.g. "127.0.0.1:9113"; `""` (the default,
    /// `None`) serves nothing.
    #[serde(with = "listen_address")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Consul {
    /// EC2 tag that marks the Consul servers (`DescribeInstances` filter).
    pub server_tag: Tag,
    pub datacenter: String,
    /// How long to keep looking for a tagged, running server before giving up.
    #[serde(with = "humantime_serde")]
    pub discovery_timeout: Duration,
    /// The local Consul agent's HTTP API (maintenance and leave during a drain).
    pub api: HttpUrl,
    /// The task that runs the Consul agent: a drain calls `leave` before stopping it. Empty:
    /// none.
    pub agent_task: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Ecs {
    /// Join the ECS cluster: write ecs.config and wait for the ECS agent. `false` on hosts
    /// without ECS (laptops); needs `runtime = "docker"`.
    pub join: bool,
    /// The ECS container agent's introspection API.
    pub introspection_url: HttpUrl,
    /// The ECS agent's environment file.
    pub config_path: String,
    /// Extra `KEY=VALUE` lines nodeagent manages in ecs.config (besides `ECS_CLUSTER`).
    pub config: BTreeMap<String, String>,
    /// How long to wait for the ECS agent to report its container instance.
    #[serde(with = "humantime_serde")]
    pub agent_timeout: Duration,
    /// How long to keep retrying a task that ECS cannot place (`failures[]` in StartTask).
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Task {
    /// ECS task-definition family; defaults to the task's name.
    pub family: Option<String>,
    /// Tasks that must be started before this one.
    pub depends_on: Vec<String>,
    /// `false` drops a task (for instance one of the defaults).
    pub enabled: bool,
    /// Directories created before the task starts (mode 0755).
    pub dirs: Vec<String>,
    /// Files rendered for the task, keyed by their absolute host path.
    pub files: BTreeMap<String, File>,
    /// The container, for the docker runtime.
    pub container: Container,
    /// How to tell the task is healthy; without a check, running is healthy.
    pub health: Option<Health>,
    /// Restart this task when a task it depends on restarts.
    pub restart_with_dependencies: bool,
    /// How the task takes a changed file (a rotated secret): `None` restarts it; `"SIGHUP"`
    /// (or `SIGUSR1`, `SIGUSR2`) sends it that signal instead (docker runtime).
    pub reload: Option<String>,
}

impl Default for Task {
    fn default() -> Self {
        Task {
            family: None,
            depends_on: Vec::new(),
            enabled: true,
            dirs: Vec::new(),
            files: BTreeMap::new(),
            container: Container::default(),
            health: None,
            restart_with_dependencies: false,
            reload: None,
        }
    }
}

/// A task's container for the docker runtime (what its ECS task definition says for ECS).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Container {
    pub image: String,
    /// Arguments (the image's default command when empty).
    pub command: Vec<String>,
    /// Replaces the image's entrypoint when set (`[]` clears it).
    pub entrypoint: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Bind mounts "HOST:CONTAINER[:ro]"; HOST is a host path (placed under --root).
    pub mounts: Vec<String>,
    pub memory_mb: Option<u64>,
}

/// A health check: one of `http` (2xx expected) or `tcp` (connect), both templates. Set the
/// other to `""` to switch a default check from one kind to the other, both to `""` for none.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Health {
    pub http: Option<String>,
    pub tcp: Option<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures that make a healthy task `unhealthy`.
    pub unhealthy_threshold: u32,
    /// Restart the task once it is unhealthy (default: only report it).
    pub restart_when_unhealthy: bool,
}

impl Health {
    /// The HTTP check URL template; `""` (set to switch a default to `tcp`) is none.
    pub fn http(&self) -> Option<&str> {
        self.http.as_deref().filter(|s| !s.is_empty())
    }
    /// The TCP check address template; `""` is none.
    pub fn tcp(&self) -> Option<&str> {
        self.tcp.as_deref().filter(|s| !s.is_empty())
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            http: None,
            tcp: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            unhealthy_threshold: 3,
            restart_when_unhealthy: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct File {
    /// `builtin:NAME` or the absolute path of a minijinja template.
    pub template: String,
    /// Permission bits, written in octal: "0644".
    pub mode: Mode,
    /// Who owns the file: `UID:GID` ("100:1000"), or a user (and `:GROUP`) of the host's
    /// /etc/passwd; default root. For images that run as a non-root user.
    pub owner: Option<String>,
    /// How values are escaped; defaults from the file's extension (.json, .yaml/.yml, .sh).
    pub format: Option<Format>,
}

/// The syntax of a rendered file, which decides how every interpolated value is escaped.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Values become JSON literals (strings quoted and escaped).
    Json,
    /// Values become YAML double-quoted scalars / flow collections.
    Yaml,
    /// Values become single-quoted shell words.
    Shell,
    /// Values are inserted verbatim: only for formats with no quoting rules.
    Text,
}

impl Format {
    /// The format a file's extension implies, if any.
    pub fn from_path(path: &str) -> Option<Format> {
        let ext = path.rsplit_once('.').map(|(_, e)| e)?;
        match ext {
            "json" => Some(Format::Json),
            "yaml" | "yml" => Some(Format::Yaml),
            "sh" => Some(Format::Shell),
            _ => None,
        }
    }
}

impl File {
    /// The file's format: the explicit `format`, else the extension's, else plain text.
    pub fn format(&self, path: &str) -> Format {
        self.format
            .or_else(|| Format::from_path(path))
            .unwrap_or(Format::Text)
    }
}

/// One enabled task, as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef<'a> {
    pub name: &'a str,
    pub family: &'a str,
    pub depends_on: &'a [String],
}

impl Settings {
    /// Enabled tasks, in dependency order, grouped into levels: every task of a level depends
    /// only on tasks of earlier levels, so a level's tasks may start together.
    pub fn start_levels(&self) -> Vec<Vec<TaskRef<'_>>> {
        let mut placed: BTreeSet<&str> = BTreeSet::new();
        let mut levels = Vec::new();
        let enabled: Vec<TaskRef<'_>> = self.enabled_tasks().collect();
        while placed.len() < enabled.len() {
            let level: Vec<TaskRef<'_>> = enabled
                .iter()
                .filter(|t| !placed.contains(t.name))
                .filter(|t| t.depends_on.iter().all(|d| placed.contains(d.as_str())))
                .cloned()
                .collect();
            if level.is_empty() {
                break; // a cycle; validate() reports it
            }
            placed.extend(level.iter().map(|t| t.name));
            levels.push(level);
        }
        levels
    }

    pub fn enabled_tasks(&self) -> impl Iterator<Item = TaskRef<'_>> {
        self.tasks
            .iter()
            .filter(|(_, t)| t.enabled)
            .map(|(name, t)| TaskRef {
                name,
                family: t.family.as_deref().unwrap_or(name),
                depends_on: &t.depends_on,
            })
    }

    /// The managed ecs.config lines: `ECS_CLUSTER` first, then `[ecs.config]` in key order.
    pub fn ecs_config_lines(&self) -> Vec<(String, String)> {
        let mut lines = vec![("ECS_CLUSTER".to_string(), self.cluster.clone())];
        let lc = &self.lifecycle;
        if lc.ready_attribute_at_join && !lc.ready_attribute.is_empty() {
            let attributes = serde_json::json!({ lc.ready_attribute.as_str(): "false" });
            lines.push(("ECS_INSTANCE_ATTRIBUTES".into(), attributes.to_string()));
        }
        if let Some(mb) = self.reserved_memory_mb() {
            lines.push(("ECS_RESERVED_MEMORY".into(), mb.to_string()));
        }
        lines.extend(
            self.ecs
                .config
                .iter()
                .filter(|(k, _)| !lines.iter().any(|(ours, _)| ours == *k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>(),
        );
        lines
    }

    /// `ECS_RESERVED_MEMORY` in MiB when `lifecycle.reserve_memory` asks for it: the memory
    /// limits of the supervised containers plus the margin.
    pub fn reserved_memory_mb(&self) -> Option<u64> {
        let wanted =
            self.lifecycle.reserve_memory && self.runtime == RuntimeKind::Docker && self.ecs.join;
        wanted.then(|| {
            let tasks: u64 = self
                .enabled_tasks()
                .filter_map(|t| self.tasks[t.name].container.memory_mb)
                .sum();
            tasks + self.lifecycle.reserved_memory_margin_mb
        })
    }
}

/// `metrics.listen`: `""` is none, else `ADDRESS:PORT`.
mod listen_address {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::SocketAddr;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "metrics.listen = {text:?}: expected ADDRESS:PORT such as \"127.0.0.1:9113\", or \"\" for no metrics"
            ))
        })
    }

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.map(|a| a.to_string()).unwrap_or_default())
    }
}
