//! The table `nodeagent status` prints: the node, its health and phase, the boot, the
//! cluster and readiness, the drain, a row per task and per file, and why a failing task fails.

use super::NodeStatus;
use crate::supervisor::State;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

impl NodeStatus {
    /// The compact table `nodeagent status` prints; ages are relative to `now`.
    pub fn table(&self, now: SystemTime) -> String {
        let mut out = String::new();
        let dash = || "-".to_string();
        let node = match (&self.instance_id, &self.node) {
            (Some(id), Some(n)) => format!(
                "{id} ({}, {}, {})",
                n.local_ipv4, n.availability_zone, n.instance_type
            ),
            _ => "(instance metadata not read yet)".into(),
        };
        let _ = writeln!(out, "node       {node}");
        let _ = writeln!(
            out,
            "health     {}",
            if self.healthy { "healthy" } else { "DEGRADED" }
        );
        let _ = writeln!(out, "phase      {}: {}", self.phase, self.summary());
        if !self.phases.is_empty() {
            let total = self
                .phases
                .iter()
                .map(|p| p.started_ms + p.took_ms)
                .fold(0.0, f64::max);
            let each: Vec<String> = self
                .phases
                .iter()
                .map(|p| format!("{} {}", p.phase, human_ms(p.took_ms)))
                .collect();
            let _ = writeln!(out, "boot       {} ({})", human_ms(total), each.join(", "));
        }
        let _ = writeln!(
            out,
            "cluster    {} (runtime {})",
            self.cluster, self.runtime
        );
        if let Some(arn) = &self.container_instance_arn {
            let _ = writeln!(out, "instance   {arn}");
        }
        if let Some(r) = &self.readiness {
            let state = match r.set {
                Some(true) => format!("{}=true: takes application tasks", r.attribute),
                Some(false) => format!("{} removed: takes no new application tasks", r.attribute),
                None => format!("{} not set yet", r.attribute),
            };
            let _ = writeln!(out, "ready      {state}");
        }
        if let Some(found) = &self.consul.found_at {
            let _ = writeln!(
                out,
                "consul     {} (found {} ago)",
                self.consul.servers.join(", "),
                age(found, now)
            );
        }
        if !self.secrets.is_empty() {
            let _ = writeln!(out, "secrets    {}", self.secrets_line(now));
        }
        for i in &self.ignored {
            let _ = writeln!(out, "ignored    {} ({}): {}", i.key, i.layer, i.why);
        }
        if let Some(d) = &self.drain {
            let _ = writeln!(out, "drain      {} since {}", d.trigger, d.started_at);
            for step in &d.steps {
                let mark = if step.ok { "ok" } else { "FAILED" };
                let _ = writeln!(
                    out,
                    "           {mark:<6} {} ({}): {}",
                    step.step,
                    human_ms(step.took_ms as f64),
                    step.detail
                );
            }
            if !d.done {
                let _ = writeln!(out, "           ...    {}", d.step);
            }
        }
        if !self.tasks.is_empty() {
            let rows: Vec<[String; 6]> = self
                .tasks
                .iter()
                .map(|t| {
                    [
                        t.name.clone(),
                        t.state.as_str().to_string(),
                        age(&t.since, now),
                        t.restarts.to_string(),
                        t.last_exit.as_ref().map_or_else(dash, |e| match e.code {
                            Some(c) => format!("{c} ({})", e.reason),
                            None => e.reason.clone(),
                        }),
                        match (&t.health, t.health_latency_ms) {
                            (Some(h), Some(ms)) => format!("{h} ({})", human_ms(ms)),
                            (Some(h), None) => h.clone(),
                            (None, _) => dash(),
                        },
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&columns(
                &["TASK", "STATE", "FOR", "RESTARTS", "LAST EXIT", "HEALTH"],
                &rows,
            ));
            // Why a failing task fails: what it wrote before it last ended.
            for t in self.tasks.iter().filter(|t| t.state != State::Healthy) {
                let Some(output) = t.last_output.as_deref().map(str::trim_end) else {
                    continue;
                };
                let _ = writeln!(out, "\n{} ({}) last wrote:", t.name, t.state.as_str());
                for line in output.lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
        }
        if !self.files.is_empty() {
            let rows: Vec<[String; 3]> = self
                .files
                .iter()
                .map(|f| {
                    [
                        f.path.clone(),
                        f.task.clone(),
                        f.sha256[..12.min(f.sha256.len())].to_string(),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&columns(&["FILE", "TASK", "SHA256"], &rows));
        }
        out
    }
}

/// Left-aligned columns, two spaces apart.
fn columns<const N: usize>(head: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = head.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

impl NodeStatus {
    /// `rotated gossip (v3→v4) 12 s ago`, else each secret's version; failed refreshes named.
    pub fn secrets_line(&self, now: SystemTime) -> String {
        let latest = self
            .secrets
            .iter()
            .filter_map(|s| s.rotated.as_ref().map(|r| (s, r)))
            .max_by(|a, b| a.1.at.cmp(&b.1.at));
        let mut line = match latest {
            Some((s, r)) => format!(
                "rotated {} ({}→{}) {} ago",
                s.name,
                r.from,
                r.to,
                age(&r.at, now)
            ),
            None => {
                let each: Vec<String> = self
                    .secrets
                    .iter()
                    .map(|s| format!("{} {}", s.name, s.version))
                    .collect();
                each.join(", ")
            }
        };
        for s in self.secrets.iter().filter(|s| s.error.is_some()) {
            let _ = write!(line, "; {} not refreshed", s.name);
        }
        line
    }
}

/// "3m12s" since an RFC 3339 time.
fn age(at: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(at) else {
        return at.to_string();
    };
    let secs = now.duration_since(t).unwrap_or_default().as_secs();
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

fn human_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else {
        format!("{ms:.0}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;
    use crate::status::tests::task;
    use crate::status::{rfc3339, Exit, File, Rotated, SecretStatus};

    #[test]
    fn the_table_has_a_row_per_task_and_file() {
        let mut s = NodeStatus {
            phase: Phase::Supervise,
            tasks: vec![
                task("consul-agent", State::Healthy, 0),
                task("linkerd", State::CrashLoop, 7),
            ],
            files: vec![File {
                path: "/etc/linkerd/linkerd.yaml".into(),
                task: "linkerd".into(),
                sha256: "0123456789abcdef".into(),
                mode: "0644".into(),
            }],
            ..NodeStatus::default()
        };
        s.tasks[1].last_exit = Some(Exit {
            code: Some(3),
            reason: "exited".into(),
        });
        s.tasks[1].last_output = Some("==> Error reading '/etc/linkerd/linkerd.yaml'\n".into());
        s.tasks[0].last_output = Some("an old death of a task now healthy\n".into());
        let table = s.table(SystemTime::now());
        assert!(
            table.contains("\nlinkerd (crash-loop) last wrote:\n  ==> Error reading '/etc/linkerd/linkerd.yaml'\n"),
            "{table}"
        );
        assert!(!table.contains("an old death"), "{table}");
        assert!(
            table.contains("TASK          STATE       FOR  RESTARTS  LAST EXIT   HEALTH"),
            "{table}"
        );
        assert!(
            table.contains("linkerd       crash-loop  0s   7         3 (exited)  -"),
            "{table}"
        );
        assert!(
            table.contains("/etc/linkerd/linkerd.yaml  linkerd  0123456789ab"),
            "{table}"
        );
    }

    #[test]
    fn the_secrets_line_names_the_last_rotation_or_each_version() {
        let now = SystemTime::now();
        let secret = |name: &str, version: &str| SecretStatus {
            name: name.into(),
            source: format!("ssm:/{name}"),
            version: version.into(),
            ..Default::default()
        };
        let mut s = NodeStatus {
            secrets: vec![secret("agent_token", "5f0c9b1e"), secret("gossip", "v4")],
            ..NodeStatus::default()
        };
        assert_eq!(s.secrets_line(now), "agent_token 5f0c9b1e, gossip v4");
        s.secrets[1].rotated = Some(Rotated {
            from: "v3".into(),
            to: "v4".into(),
            at: rfc3339(now - Duration::from_secs(12)),
        });
        s.secrets[0].error = Some("throttled".into());
        let line = s.secrets_line(now);
        assert_eq!(
            line,
            "rotated gossip (v3→v4) 12s ago; agent_token not refreshed"
        );
        assert!(s.table(now).contains(&format!("secrets    {line}\n")));
    }
}
