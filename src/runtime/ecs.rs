//! ECS runtime: owns making each enabled task exist exactly once as an ECS task on this node's
//! container instance.
//!
//! Tasks are started with `startedBy = nodeagent/<instance-id>`. Before starting anything the
//! runtime lists the tasks on the container instance and adopts those with our `startedBy` and
//! the task's family that are RUNNING or on their way there, so reruns, ECS agent restarts and
//! nodeagent restarts never create duplicates. Tasks start level by level in dependency order.
//! A task ECS cannot place (`failures[]`: `RESOURCE:MEMORY`, `RESOURCE:PORTS`, …) is retried
//! with backoff until `ecs.start_timeout`, logging the reason each time.

use crate::config::TaskRef;
use crate::ecs::{Ecs, EcsTask, StartOutcome};
use crate::retry::Backoff;
use anyhow::bail;
use futures_util::future::try_join_all;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::{info, warn, Instrument};

/// Task statuses that mean "running or on its way": such a task is adopted, not replaced.
const LIVE_STATUSES: &[&str] = &["PROVISIONING", "PENDING", "ACTIVATING", "RUNNING"];

/// The `startedBy` marker of the tasks this node's nodeagent starts.
pub fn started_by(instance_id: &str) -> String {
    format!("nodeagent/{instance_id}")
}

/// What happened to one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskOutcome {
    pub name: String,
    pub family: String,
    pub arn: String,
    /// True when an existing task was adopted instead of starting one.
    pub adopted: bool,
}

pub struct EcsRuntime<'a> {
    pub ecs: &'a dyn Ecs,
    pub cluster: &'a str,
    pub container_instance: &'a str,
    pub started_by: String,
    pub start_timeout: Duration,
}

impl EcsRuntime<'_> {
    /// Adopts or starts every task of `levels`, one level after the other.
    pub async fn ensure(&self, levels: &[Vec<TaskRef<'_>>]) -> anyhow::Result<Vec<TaskOutcome>> {
        let mut live = self.live_tasks().await?;
        let mut outcomes = Vec::new();
        for level in levels {
            let starts = level.iter().map(|task| {
                let existing = live.remove(task.family).unwrap_or_default();
                let span = tracing::info_span!("task", task = task.name);
                self.ensure_one(task, existing).instrument(span)
            });
            outcomes.extend(try_join_all(starts).await?);
        }
        Ok(outcomes)
    }

    /// Our live tasks on this container instance, by family.
    async fn live_tasks(&self) -> anyhow::Result<BTreeMap<String, Vec<EcsTask>>> {
        let arns = self
            .ecs
            .list_running_tasks(self.cluster, self.container_instance)
            .await?;
        let mut by_family: BTreeMap<String, Vec<EcsTask>> = BTreeMap::new();
        if arns.is_empty() {
            return Ok(by_family);
        }
        for task in self.ecs.describe_tasks(self.cluster, &arns).await? {
            let ours = task.started_by.as_deref() == Some(self.started_by.as_str())
                && task.desired_status == "RUNNING"
                && LIVE_STATUSES.contains(&task.last_status.as_str());
            if ours {
                by_family.entry(task.family.clone()).or_default().push(task);
            }
        }
        Ok(by_family)
    }

    async fn ensure_one(
        &self,
        task: &TaskRef<'_>,
        existing: Vec<EcsTask>,
    ) -> anyhow::Result<TaskOutcome> {
        if let Some(first) = existing.first() {
            if existing.len() > 1 {
                warn!(
                    family = task.family,
                    tasks = ?existing.iter().map(|t| &t.arn).collect::<Vec<_>>(),
                    "more than one task of this family carries our startedBy; adopting the first"
                );
            }
            info!(arn = %first.arn, status = %first.last_status, "adopted running task");
            return Ok(TaskOutcome {
                name: task.name.to_string(),
                family: task.family.to_string(),
                arn: first.arn.clone(),
                adopted: true,
            });
        }
        let started = self.start(task).await?;
        info!(arn = %started.arn, "started task");
        Ok(TaskOutcome {
            name: task.name.to_string(),
            family: task.family.to_string(),
            arn: started.arn,
            adopted: false,
        })
    }

    /// `StartTask`, retrying placement failures with backoff until the start timeout.
    async fn start(&self, task: &TaskRef<'_>) -> anyhow::Result<EcsTask> {
        let deadline = Instant::now() + self.start_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let outcome = self
                .ecs
                .start_task(
                    self.cluster,
                    task.family,
                    self.container_instance,
                    &self.started_by,
                )
                .await?;
            let failures = match outcome {
                StartOutcome::Started(t) => return Ok(t),
                StartOutcome::NotPlaced(f) => f,
            };
            let reasons: Vec<String> = failures
                .iter()
                .map(|f| match &f.detail {
                    Some(d) => format!("{} ({d})", f.reason),
                    None => f.reason.clone(),
                })
                .collect();
            let delay = backoff.next_delay();
            if Instant::now() + delay > deadline {
                bail!(
                    "ECS could not place task {} (family {}) on {} within {:?}: {}; free the resources on this instance or raise ecs.start_timeout",
                    task.name,
                    task.family,
                    self.container_instance,
                    self.start_timeout,
                    reasons.join(", ")
                );
            }
            warn!(reasons = %reasons.join(", "), retry_in = ?delay, "ECS could not place the task; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecs::PlacementFailure;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// An in-memory ECS that records calls; `refuse` placement failures are returned first.
    #[derive(Default)]
    struct FakeEcs {
        tasks: Mutex<Vec<EcsTask>>,
        refuse: Mutex<u32>,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Ecs for FakeEcs {
        async fn list_running_tasks(&self, _: &str, _: &str) -> anyhow::Result<Vec<String>> {
            self.calls.lock().unwrap().push("ListTasks".into());
            Ok(self
                .tasks
                .lock()
                .unwrap()
                .iter()
                .map(|t| t.arn.clone())
                .collect())
        }
        async fn describe_tasks(&self, _: &str, _: &[String]) -> anyhow::Result<Vec<EcsTask>> {
            self.calls.lock().unwrap().push("DescribeTasks".into());
            Ok(self.tasks.lock().unwrap().clone())
        }
        async fn start_task(
            &self,
            _: &str,
            family: &str,
            ci: &str,
            by: &str,
        ) -> anyhow::Result<StartOutcome> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("StartTask {family}"));
            let mut refuse = self.refuse.lock().unwrap();
            if *refuse > 0 {
                *refuse -= 1;
                return Ok(StartOutcome::NotPlaced(vec![PlacementFailure {
                    reason: "RESOURCE:MEMORY".into(),
                    detail: None,
                }]));
            }
            let mut tasks = self.tasks.lock().unwrap();
            let task = EcsTask {
                arn: format!("arn:task/{}", tasks.len()),
                family: family.into(),
                started_by: Some(by.into()),
                last_status: "PENDING".into(),
                desired_status: "RUNNING".into(),
                container_instance_arn: Some(ci.into()),
            };
            tasks.push(task.clone());
            Ok(StartOutcome::Started(task))
        }
    }

    fn levels() -> Vec<Vec<TaskRef<'static>>> {
        let t = |name| TaskRef {
            name,
            family: name,
            depends_on: &[],
        };
        vec![
            vec![t("consul-agent")],
            vec![t("consul-registrator"), t("linkerd")],
        ]
    }

    fn runtime(ecs: &FakeEcs) -> EcsRuntime<'_> {
        EcsRuntime {
            ecs,
            cluster: "c",
            container_instance: "ci",
            started_by: started_by("i-1"),
            start_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn starts_in_order_then_adopts_on_rerun() {
        let ecs = FakeEcs::default();
        let first = runtime(&ecs).ensure(&levels()).await.unwrap();
        assert!(first.iter().all(|o| !o.adopted));
        assert_eq!(
            ecs.calls.lock().unwrap()[..2],
            ["ListTasks", "StartTask consul-agent"]
        );
        let second = runtime(&ecs).ensure(&levels()).await.unwrap();
        assert!(second.iter().all(|o| o.adopted));
        assert_eq!(ecs.tasks.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn foreign_and_stopped_tasks_are_not_adopted() {
        let ecs = FakeEcs::default();
        runtime(&ecs).ensure(&levels()).await.unwrap();
        {
            let mut tasks = ecs.tasks.lock().unwrap();
            tasks[0].last_status = "STOPPED".into();
            tasks[1].started_by = Some("someone-else".into());
        }
        let outcomes = runtime(&ecs).ensure(&levels()).await.unwrap();
        let adopted: Vec<bool> = outcomes.iter().map(|o| o.adopted).collect();
        assert_eq!(adopted, [false, false, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn placement_failures_are_retried_then_reported() {
        let ecs = FakeEcs::default();
        *ecs.refuse.lock().unwrap() = 2;
        runtime(&ecs).ensure(&levels()).await.unwrap();
        assert_eq!(ecs.tasks.lock().unwrap().len(), 3);

        let ecs = FakeEcs::default();
        *ecs.refuse.lock().unwrap() = u32::MAX;
        let err = runtime(&ecs)
            .ensure(&levels())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RESOURCE:MEMORY") && err.contains("consul-agent"),
            "{err}"
        );
    }
}
