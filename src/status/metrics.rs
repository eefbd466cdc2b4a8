//! Metrics: owns the Prometheus text exposition (format 0.0.4) of a [`NodeStatus`]. Served at
//! `GET /metrics` on the status socket, and on `metrics.listen` when set.

use super::NodeStatus;
use crate::supervisor::State;
use std::fmt::Write as _;

pub fn render(status: &NodeStatus) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    family(
        "nodeagent_healthy",
        "gauge",
        "1 when supervising and every task is healthy.",
        vec![(String::new(), u8::from(status.healthy).to_string())],
    );
    family(
        "nodeagent_task_state",
        "gauge",
        // One series per state, 1 for the current one, so a dashboard can sum over states.
        "1 for the state each task is in.",
        status
            .tasks
            .iter()
            .flat_map(|t| {
                State::ALL.iter().map(move |s| {
                    (
                        labels(&[("task", &t.name), ("state", s.as_str())]),
                        u8::from(t.state == *s).to_string(),
                    )
                })
            })
            .collect(),
    );
    family(
        "nodeagent_task_restarts_total",
        "counter",
        "Restarts of each task since the agent started.",
        status
            .tasks
            .iter()
            .map(|t| (labels(&[("task", &t.name)]), t.restarts.to_string()))
            .collect(),
    );
    family(
        "nodeagent_health_check_seconds",
        "gauge",
        "How long each task's last health check took.",
        status
            .tasks
            .iter()
            .filter_map(|t| {
                let ms = t.health_latency_ms?;
                Some((labels(&[("task", &t.name)]), (ms / 1e3).to_string()))
            })
            .collect(),
    );
    family(
        "nodeagent_boot_phase_seconds",
        "gauge",
        "How long each boot phase took.",
        status
            .phases
            .iter()
            .map(|p| {
                (
                    labels(&[("phase", p.phase.as_str())]),
                    (p.took_ms / 1e3).to_string(),
                )
            })
            .collect(),
    );
    family(
        "nodeagent_aws_calls_total",
        "counter",
        "AWS API calls by operation.",
        status
            .aws_calls
            .iter()
            .map(|(op, c)| (labels(&[("operation", op)]), c.calls.to_string()))
            .collect(),
    );
    family(
        "nodeagent_aws_errors_total",
        "counter",
        "AWS API calls that failed, by operation.",
        status
            .aws_calls
            .iter()
            .map(|(op, c)| (labels(&[("operation", op)]), c.errors.to_string()))
            .collect(),
    );
    family(
        "nodeagent_aws_throttled_total",
        "counter",
        "AWS API calls that AWS throttled, by operation.",
        status
            .aws_calls
            .iter()
            .map(|(op, c)| (labels(&[("operation", op)]), c.throttled.to_string()))
            .collect(),
    );
    family(
        "nodeagent_secret_refresh_failing",
        "gauge",
        "1 while a secret's last refresh failed (the value in use stays), by secret name.",
        status
            .secrets
            .iter()
            .map(|s| {
                let failing = u8::from(s.error.is_some());
                (labels(&[("secret", &s.name)]), failing.to_string())
            })
            .collect(),
    );
    out
}

/// `{a="x",b="y"}` with label values escaped as the format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::OpCount;
    use crate::status::Task;

    #[test]
    fn series_per_task_state_and_operation() {
        let mut s = NodeStatus {
            tasks: vec![Task {
                name: "linkerd".into(),
                state: State::CrashLoop,
                restarts: 6,
                health_latency_ms: Some(2.5),
                ..Task::default()
            }],
            ..NodeStatus::default()
        };
        s.aws_calls.insert(
            "ecs:ListTasks".into(),
            OpCount {
                calls: 3,
                errors: 1,
                throttled: 1,
            },
        );
        let text = render(&s);
        assert!(text.contains("nodeagent_task_state{task=\"linkerd\",state=\"crash-loop\"} 1\n"));
        assert!(text.contains("nodeagent_task_state{task=\"linkerd\",state=\"healthy\"} 0\n"));
        assert!(text.contains("nodeagent_task_restarts_total{task=\"linkerd\"} 6\n"));
        assert!(text.contains("nodeagent_health_check_seconds{task=\"linkerd\"} 0.0025\n"));
        assert!(text.contains("nodeagent_aws_errors_total{operation=\"ecs:ListTasks\"} 1\n"));
        assert!(text.contains("nodeagent_aws_throttled_total{operation=\"ecs:ListTasks\"} 1\n"));
        assert!(text.contains("nodeagent_healthy 0\n"));
        assert_eq!(labels(&[("t", "a\"b\\")]), "{t=\"a\\\"b\\\\\"}");
    }
}
