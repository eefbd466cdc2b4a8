//! Configuration: owns the typed settings nodeagent runs with and the rules that make them valid.
//!
//! The pipeline (as in zincati): fragments (built-in defaults, then each config file) are parsed
//! and checked one by one ([`load`]), merged key by key (later wins), deserialized into
//! [`Settings`] and validated ([`Settings::validate`]). Nothing here touches the network or the
//! host: callers hand in the text of each fragment.

mod load;

pub use load::{
    dotted_key, from_fragments, from_layers, ConfigError, Fragment, Loaded, DEFAULTS, TAG_PREFIX,
};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Where the main configuration file lives on a node.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nodeagent/nodeagent.toml";

/// Prefix of a template reference that names one of the templates compiled into the binary.
pub const BUILTIN_PREFIX: &str = "builtin:";

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
    /// Free-form values made available to templates as `vars.*`.
    pub vars: BTreeMap<String, toml::Value>,
    /// The node's foundational tasks, keyed by name so layers merge per task.
    pub tasks: BTreeMap<String, Task>,
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
    /// `ADDRESS:PORT` to serve `GET /metrics` on, e.g. "127.0.0.1:9113"; empty (the default)
    /// serves nothing.
    pub listen: String,
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
    pub api: String,
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
    pub introspection_url: String,
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
    /// Octal permission bits, e.g. "0644".
    pub mode: String,
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

    /// The permission bits (validated by [`Settings::validate`]).
    pub fn mode_bits(&self) -> u32 {
        parse_mode(&self.mode).unwrap_or(0o644)
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

    /// Checks what types alone cannot; every problem found is reported, one per line.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !valid_cluster_name(&self.cluster) {
            problems.push(format!(
                "cluster = {:?}: an ECS cluster name is 1-255 letters, digits, '-' or '_'",
                self.cluster
            ));
        }
        if self.consul.server_tag.key.is_empty() {
            problems.push(
                "consul.server_tag.key is empty: name the EC2 tag that marks the Consul servers"
                    .into(),
            );
        }
        if self.consul.datacenter.is_empty() {
            problems.push("consul.datacenter is empty".into());
        }
        match reqwest::Url::parse(&self.ecs.introspection_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => problems.push(format!(
                "ecs.introspection_url = {:?} is not an http(s) URL",
                self.ecs.introspection_url
            )),
        }
        if !self.ecs.config_path.starts_with('/') {
            problems.push(format!(
                "ecs.config_path = {:?} must be an absolute path",
                self.ecs.config_path
            ));
        }
        for (key, value) in self.ecs_config_lines() {
            if let Err(why) = check_env_line(&key, &value) {
                problems.push(format!("ecs.config.{key}: {why}"));
            }
        }
        if !self.ecs.join && self.runtime == RuntimeKind::Ecs {
            problems.push(
                "ecs.join = false needs runtime = \"docker\": ECS tasks need a container instance"
                    .into(),
            );
        }
        if !self.status.socket.starts_with('/') || self.status.socket.ends_with('/') {
            problems.push(format!(
                "status.socket = {:?} must be an absolute file path",
                self.status.socket
            ));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!(
                "metrics.listen = {:?}: expected ADDRESS:PORT such as \"127.0.0.1:9113\", or \"\" for no metrics",
                self.metrics.listen
            ));
        }
        let lc = &self.lifecycle;
        let attribute_ok = lc.ready_attribute.len() <= 128
            && lc
                .ready_attribute
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./@".contains(c));
        if !attribute_ok || lc.ready_attribute_at_join && lc.ready_attribute.is_empty() {
            problems.push(format!(
                "lifecycle.ready_attribute = {:?}: an ECS attribute name is 1-128 letters, digits, '-', '_', '.', '/' or '@' (\"\" for none, then without ready_attribute_at_join)",
                lc.ready_attribute
            ));
        }
        match reqwest::Url::parse(&self.consul.api) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => problems.push(format!(
                "consul.api = {:?} is not an http(s) URL",
                self.consul.api
            )),
        }
        let agent_task = &self.consul.agent_task;
        if !agent_task.is_empty() && !self.enabled_tasks().any(|t| t.name == agent_task) {
            problems.push(format!(
                "consul.agent_task = {agent_task:?} is not an enabled task (\"\" when no task runs the Consul agent)"
            ));
        }
        if lc.trigger_poll.is_zero() || lc.drain_step_timeout.is_zero() {
            problems.push("lifecycle: trigger_poll and drain_step_timeout must be > 0".into());
        }
        if lc.reserve_memory && (self.runtime != RuntimeKind::Docker || !self.ecs.join) {
            problems.push("lifecycle.reserve_memory is for the docker runtime on an ECS node (ecs.join = true): ECS already accounts for ECS tasks".into());
        }
        let ours = ["ECS_RESERVED_MEMORY", "ECS_INSTANCE_ATTRIBUTES"];
        for key in ours.iter().filter(|k| self.ecs.config.contains_key(**k)) {
            let set_by_us = (*key == "ECS_RESERVED_MEMORY" && self.reserved_memory_mb().is_some())
                || (*key == "ECS_INSTANCE_ATTRIBUTES" && lc.ready_attribute_at_join);
            if set_by_us {
                problems.push(format!(
                    "ecs.config.{key} is set by lifecycle settings too: keep one"
                ));
            }
        }
        let sup = &self.supervision;
        if sup.backoff_initial.is_zero() || sup.backoff_max < sup.backoff_initial {
            problems.push("supervision: backoff_initial must be > 0 and <= backoff_max".into());
        }
        if sup.ready_timeout.is_zero() || sup.ready_timeout > Duration::from_secs(600) {
            problems.push(
                "supervision.ready_timeout must be > 0 and at most 10m (readiness must not wait forever on a failing task)".into(),
            );
        }
        if sup.reconcile_interval.is_zero() || sup.crash_loop_restarts == 0 {
            problems
                .push("supervision: reconcile_interval and crash_loop_restarts must be > 0".into());
        }
        let names: BTreeSet<&str> = self.enabled_tasks().map(|t| t.name).collect();
        for (name, task) in self.tasks.iter().filter(|(_, t)| t.enabled) {
            if task.family.as_deref() == Some("") {
                problems.push(format!("tasks.{name}.family is empty"));
            }
            for dep in &task.depends_on {
                if !names.contains(dep.as_str()) {
                    problems.push(format!(
                        "tasks.{name}.depends_on names {dep:?}, which is not an enabled task"
                    ));
                }
            }
            for dir in &task.dirs {
                if let Err(why) = check_state_dir(dir) {
                    problems.push(format!("tasks.{name}.dirs: {dir:?} {why}"));
                }
            }
            if self.runtime == RuntimeKind::Docker {
                problems.extend(check_container(name, &task.container));
            }
            if let Some(health) = &task.health {
                problems.extend(check_health(name, health));
            }
            for (path, file) in &task.files {
                let at = format!("tasks.{name}.files.{path:?}");
                let normal = !path.split('/').any(|p| p == "." || p == "..");
                if !path.starts_with('/') || path.ends_with('/') || !normal {
                    problems.push(format!(
                        "{at}: the key must be an absolute file path (no `.` or `..`)"
                    ));
                }
                if parse_mode(&file.mode).is_none() {
                    problems.push(format!(
                        "{at}.mode = {:?}: expected octal permission bits such as \"0644\"",
                        file.mode
                    ));
                }
                if let Some(owner) = &file.owner {
                    if !valid_owner(owner) {
                        problems.push(format!(
                            "{at}.owner = {owner:?}: expected UID:GID such as \"100:1000\", or USER[:GROUP] of the host's /etc/passwd"
                        ));
                    }
                }
                let t = &file.template;
                if !(t.starts_with(BUILTIN_PREFIX) || t.starts_with('/')) {
                    problems.push(format!(
                        "{at}.template = {t:?}: expected \"builtin:NAME\" or an absolute path"
                    ));
                }
            }
        }
        let levels = self.start_levels();
        let placed: usize = levels.iter().map(Vec::len).sum();
        if placed < names.len() {
            let stuck: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !levels.iter().flatten().any(|t| t.name == *n))
                .collect();
            problems.push(format!(
                "tasks depend on each other in a cycle: {}",
                stuck.join(", ")
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// A task directory is the task's own state (`prepare-image` empties it): an absolute,
/// normal path at least two levels deep, not a directory the system or another agent owns.
fn check_state_dir(dir: &str) -> Result<(), String> {
    if !dir.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    let parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err("must not contain `.` or `..`".into());
    }
    let owned = [
        "var/lib",
        "var/log",
        "var/run",
        "usr/lib",
        "usr/local",
        "usr/share",
        "etc/ecs",
        "etc/nodeagent",
        "etc/systemd",
        "var/lib/ecs",
        "var/lib/docker",
        "var/lib/nodeagent",
        "run/nodeagent",
    ];
    let joined = parts.join("/");
    if parts.len() < 2
        || owned
            .iter()
            .any(|o| joined == *o || o.starts_with(&format!("{joined}/")))
    {
        return Err("is not a task's own directory (at least two levels deep, not one the system, ECS, Docker or nodeagent owns): `prepare-image` empties task directories".into());
    }
    if ["var/lib/ecs/", "var/lib/docker/", "var/lib/nodeagent/"]
        .iter()
        .any(|o| joined.starts_with(o) || format!("{joined}/").starts_with(o))
    {
        return Err("is inside a directory ECS, Docker or nodeagent owns".into());
    }
    Ok(())
}

fn check_container(task: &str, c: &Container) -> Vec<String> {
    let mut problems = Vec::new();
    if c.image.is_empty() {
        problems.push(format!(
            "tasks.{task}.container.image is empty: the docker runtime needs an image"
        ));
    }
    for mount in &c.mounts {
        let parts: Vec<&str> = mount.split(':').collect();
        let ok = matches!(parts.as_slice(), [h, c] | [h, c, "ro" | "rw"] if h.starts_with('/') && c.starts_with('/'));
        if !ok {
            problems.push(format!(
                "tasks.{task}.container.mounts: {mount:?} is not \"/host/path:/container/path[:ro]\""
            ));
        }
    }
    if c.memory_mb == Some(0) {
        problems.push(format!("tasks.{task}.container.memory_mb must be > 0"));
    }
    problems
}

fn check_health(task: &str, h: &Health) -> Vec<String> {
    let mut problems = Vec::new();
    if h.http().is_some() && h.tcp().is_some() {
        problems.push(format!(
            "tasks.{task}.health: set one of `http` or `tcp` (the other to \"\")"
        ));
    }
    if h.interval.is_zero() || h.timeout.is_zero() || h.unhealthy_threshold == 0 {
        problems.push(format!(
            "tasks.{task}.health: interval, timeout and unhealthy_threshold must be > 0"
        ));
    }
    problems
}

fn valid_cluster_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// ecs.config is a systemd `EnvironmentFile`: one `KEY=VALUE` per line. A value with a line
/// break would smuggle in other keys, and a trailing backslash would swallow the next line.
fn check_env_line(key: &str, value: &str) -> Result<(), String> {
    let key_ok = key.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && key
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !key_ok {
        return Err("keys are upper-case letters, digits and '_'".into());
    }
    // The value itself is not repeated: ecs.config holds credentials (ECS_ENGINE_AUTH_DATA).
    if value.chars().any(|c| c.is_control()) {
        return Err("the value contains a control character (line break, tab, …)".into());
    }
    if value.ends_with('\\') || value.trim() != value {
        return Err("the value must not end in a backslash or start/end with white space".into());
    }
    Ok(())
}

/// Whether a key's name says its value is a credential (`ECS_ENGINE_AUTH_DATA`,
/// `CONSUL_HTTP_TOKEN`, `DD_API_KEY`, `vars.gossip_encrypt`, …).
pub fn looks_secret(key: &str) -> bool {
    let last = key
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .trim_matches('"')
        .to_uppercase();
    let words = [
        "SECRET",
        "PASSWORD",
        "PASSWD",
        "TOKEN",
        "AUTH",
        "CREDENTIAL",
        "PRIVATE",
        "ENCRYPT",
    ];
    words.iter().any(|w| last.contains(w)) || (last != "KEY" && last.ends_with("KEY"))
}

/// `UID[:GID]` or `USER[:GROUP]` (names as useradd takes them).
fn valid_owner(owner: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && (p.chars().all(|c| c.is_ascii_digit())
                || (p
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))))
    };
    match owner.split_once(':') {
        Some((u, g)) => part(u) && part(g),
        None => part(owner),
    }
}

fn parse_mode(mode: &str) -> Option<u32> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        from_fragments(&[]).expect("defaults are valid")
    }

    #[test]
    fn defaults_reproduce_the_guide() {
        let s = defaults();
        assert_eq!(s.cluster, "l5d-demo");
        assert_eq!(s.consul.server_tag.value, "l5d-demo-consul-server");
        let levels: Vec<Vec<&str>> = s
            .start_levels()
            .iter()
            .map(|l| l.iter().map(|t| t.name).collect())
            .collect();
        assert_eq!(
            levels,
            vec![vec!["consul-agent"], vec!["consul-registrator", "linkerd"]]
        );
        assert_eq!(
            s.ecs_config_lines(),
            vec![("ECS_CLUSTER".into(), "l5d-demo".into())]
        );
    }

    #[test]
    fn cycle_and_bad_values_are_reported() {
        let mut s = defaults();
        s.tasks.get_mut("consul-agent").unwrap().depends_on = vec!["linkerd".into()];
        s.ecs
            .config
            .insert("ECS_X".into(), "a\nECS_CLUSTER=evil".into());
        s.cluster = "bad name".into();
        let problems = s.validate().unwrap_err();
        assert!(problems.iter().any(|p| p.contains("cycle")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("ecs.config.ECS_X")));
        assert!(problems.iter().any(|p| p.contains("cluster")));
    }

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("0755"), Some(0o755));
        assert_eq!(parse_mode("644"), Some(0o644));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("0999"), None);
        assert_eq!(parse_mode(""), None);
    }

    #[test]
    fn lifecycle_keys_reach_ecs_config() {
        let settings = |text: &str| super::from_fragments(&[super::Fragment::file("t", text)]);
        let docker = "runtime = \"docker\"\n[tasks.consul-agent.container]\nmemory_mb = 100\n\
                      [tasks.linkerd.container]\nmemory_mb = 200\n[tasks.consul-registrator.container]\nmemory_mb = 50\n";
        let s = settings(&format!(
            "{docker}[lifecycle]\nreserve_memory = true\nreserved_memory_margin_mb = 64\nready_attribute_at_join = true\n"
        ))
        .unwrap();
        let lines = s.ecs_config_lines();
        assert!(
            lines.contains(&("ECS_RESERVED_MEMORY".into(), "414".into())),
            "{lines:?}"
        );
        assert!(
            lines.contains(&(
                "ECS_INSTANCE_ATTRIBUTES".into(),
                r#"{"nodeagent.ready":"false"}"#.into()
            )),
            "{lines:?}"
        );
        let err = settings("[lifecycle]\nreserve_memory = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reserve_memory is for the docker runtime"),
            "{err}"
        );
        let err = settings(&format!(
            "{docker}[lifecycle]\nreserve_memory = true\n[ecs.config]\nECS_RESERVED_MEMORY = \"1\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("set by lifecycle settings too"), "{err}");
        let err = settings("[lifecycle]\nready_attribute = \"has space\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("an ECS attribute name is"), "{err}");
    }

    #[test]
    fn task_dirs_are_the_tasks_own() {
        for ok in ["/opt/consul/data", "/var/lib/consul", "/srv/linkerd"] {
            assert_eq!(check_state_dir(ok), Ok(()), "{ok}");
        }
        for bad in [
            "/",
            "/opt",
            "/etc",
            "/var/lib",
            "/var/lib/ecs",
            "/var/lib/ecs/data",
            "/var/lib/docker/x",
            "/opt/x/../..",
            "relative/x",
            "/usr/lib",
        ] {
            assert!(check_state_dir(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_looking_keys() {
        for key in [
            "ecs.config.ECS_ENGINE_AUTH_DATA",
            "tasks.x.container.env.CONSUL_HTTP_TOKEN",
            "tasks.x.container.env.DD_API_KEY",
            "vars.gossip_encrypt",
            "vars.db_password",
            "vars.\"private-key\"",
        ] {
            assert!(looks_secret(key), "{key}");
        }
        for key in [
            "consul.server_tag.key",
            "cluster",
            "ecs.config.ECS_ENABLE_CONTAINER_METADATA",
            "vars.keyspace",
        ] {
            assert!(!looks_secret(key), "{key}");
        }
    }
}
