//! Validation: owns the rules a configuration must keep beyond its types — names AWS and
//! systemd accept, paths that are absolute and a task's own, dependencies without cycles,
//! values that cannot smuggle lines into ecs.config — every problem reported, one per line.

use super::trust::under;
use super::types::*;
use super::BUILTIN_PREFIX;

/// ECS's own terminating lifecycle hook (managed instance draining): never nodeagent's to
/// complete.
pub const MANAGED_DRAINING_HOOK: &str = "ecs-managed-draining-termination-hook";
use std::collections::BTreeSet;
use std::time::Duration;

impl Settings {
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
        problems.extend(self.check_trust());
        problems.extend(self.check_secrets());
        if let Err(why) = self.confined(&self.ecs.config_path, &[]) {
            problems.push(format!(
                "ecs.config_path = {:?} {why}",
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
        if let Err(why) = self.confined(&self.status.socket, &[SOCKET_DIR]) {
            problems.push(format!(
                "status.socket = {:?} must be an absolute file path: it {why}",
                self.status.socket
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
        let agent_task = &self.consul.agent_task;
        if !agent_task.is_empty() && !self.enabled_tasks().any(|t| t.name == agent_task) {
            problems.push(format!(
                "consul.agent_task = {agent_task:?} is not an enabled task (\"\" when no task runs the Consul agent)"
            ));
        }
        if lc.lifecycle_hook == MANAGED_DRAINING_HOOK {
            problems.push(format!(
                "lifecycle.lifecycle_hook = {:?} is ECS's own hook (managed instance draining): ECS completes it once the instance's tasks are gone, which nodeagent's drain sees to; name your group's own terminating hook, or \"\"",
                lc.lifecycle_hook
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
                if let Err(why) = check_state_dir(dir).and_then(|()| self.confined(dir, &[])) {
                    problems.push(format!("tasks.{name}.dirs: {dir:?} {why}"));
                }
            }
            if self.runtime == RuntimeKind::Docker {
                problems.extend(check_container(name, &task.container));
                problems.extend(self.check_mounts(name, &task.container));
            }
            if let Some(health) = &task.health {
                problems.extend(check_health(name, health));
            }
            for (path, file) in &task.files {
                let at = format!("tasks.{name}.files.{path:?}");
                if !normal_path(path) || path.ends_with('/') {
                    problems.push(format!(
                        "{at}: the key must be an absolute file path (no `.` or `..`)"
                    ));
                } else if let Err(why) =
                    check_state_dir(path).and_then(|()| self.confined(path, &[]))
                {
                    problems.push(format!("{at}: the file {why}"));
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
                } else if !t.starts_with(BUILTIN_PREFIX) {
                    if let Err(why) = self.confined(t, TEMPLATE_DIRS) {
                        problems.push(format!("{at}.template = {t:?}: the template {why}"));
                    }
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

/// The status socket's home, besides `trust.paths`.
const SOCKET_DIR: &str = "/run/nodeagent";
/// Where templates may be read from, besides `trust.paths`: nodeagent's own configuration and
/// its package's templates.
const TEMPLATE_DIRS: &[&str] = &["/etc/nodeagent", "/usr/share/nodeagent"];
/// Where the Docker socket is: a container may mount it (registrator must).
const DOCKER_SOCKETS: &[&str] = &["/var/run/docker.sock", "/run/docker.sock"];
/// Host paths no container mounts by accident: the whole host, its configuration, its kernel's
/// views, its boot files, root's home, the state of every service. Only `trust.mounts` allows
/// them (or what is below /proc, /sys, /boot, /root, /dev).
const GUARDED: &[&str] = &[
    "/", "/etc", "/proc", "/sys", "/boot", "/root", "/dev", "/var/lib", "/usr", "/var", "/run",
];
const GUARDED_BELOW: &[&str] = &["/proc", "/sys", "/boot", "/root", "/dev"];

impl Settings {
    /// `trust.*`: normal absolute paths; no prefix that is the whole host.
    fn check_trust(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, list) in [("paths", &self.trust.paths), ("mounts", &self.trust.mounts)] {
            for p in list.iter().filter(|p| !normal_path(p)) {
                problems.push(format!("trust.{key}: {p:?} is not a normal absolute path"));
            }
        }
        if self
            .trust
            .paths
            .iter()
            .any(|p| p.trim_end_matches('/').is_empty())
        {
            problems.push(
                "trust.paths: \"/\" would let a configuration write anywhere; name the directories"
                    .into(),
            );
        }
        problems
    }

    /// `Ok` when `path` is a normal absolute path under `trust.paths` (or `also`); else why not.
    fn confined(&self, path: &str, also: &[&str]) -> Result<(), String> {
        if !normal_path(path) {
            return Err("must be a normal absolute path (no `.` or `..`)".into());
        }
        let allowed = self
            .trust
            .paths
            .iter()
            .map(String::as_str)
            .chain(also.iter().copied());
        if allowed.clone().any(|p| under(path, p)) {
            return Ok(());
        }
        let list: Vec<&str> = allowed.collect();
        Err(format!(
            "is outside the paths nodeagent may use ({}): the image owner adds one to trust.paths in /etc/nodeagent",
            list.join(", ")
        ))
    }

    /// A container's bind mounts: the host side within `trust.paths`, the Docker socket, or
    /// `trust.mounts`; what would hand the container the host is refused unless allowed.
    fn check_mounts(&self, task: &str, c: &Container) -> Vec<String> {
        let mut problems = Vec::new();
        for mount in &c.mounts {
            let host = mount.split(':').next().unwrap_or_default();
            if !normal_path(host) {
                continue; // check_container reports its shape
            }
            let allowed = self.trust.mounts.iter().any(|m| under(host, m));
            if allowed || DOCKER_SOCKETS.contains(&host) {
                continue;
            }
            let guarded = GUARDED.iter().any(|g| under(g, host))
                || GUARDED_BELOW.iter().any(|g| under(host, g));
            if guarded {
                problems.push(format!(
                    "tasks.{task}.container.mounts: {mount:?} would give the container the host's {host}; the image owner may allow it in trust.mounts"
                ));
            } else if self.confined(host, &[]).is_err() {
                problems.push(format!(
                    "tasks.{task}.container.mounts: {mount:?}: containers mount only within trust.paths, the Docker socket, or trust.mounts"
                ));
            }
        }
        problems
    }
}

/// An absolute path without empty, `.` or `..` segments.
fn normal_path(path: &str) -> bool {
    path.starts_with('/')
        && (path == "/"
            || path[1..]
                .trim_end_matches('/')
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != ".."))
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

#[cfg(test)]
mod tests {
    use super::super::{from_fragments, Fragment};
    use super::*;

    fn defaults() -> Settings {
        super::super::from_fragments(&[]).expect("defaults are valid")
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
    fn lifecycle_keys_reach_ecs_config() {
        let settings = |text: &str| from_fragments(&[Fragment::file("t", text)]);
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
