//! ECS runtime: owns running the tasks as ECS tasks on this node's container instance, so they
//! show up in ECS as the guide intends.
//!
//! Tasks are started with `startedBy = nodeagent/<instance-id>`; our instances are the tasks on
//! this container instance with that `startedBy`, found with `ListTasks` (desired status
//! RUNNING) and `DescribeTasks`. What is known about an ARN is remembered, so a healthy steady
//! state costs one `ListTasks` per reconcile even with application tasks on the node. A task ECS
//! cannot place (`failures[]`: `RESOURCE:MEMORY`, `RESOURCE:PORTS`, …) is retried with backoff
//! until `ecs.start_timeout`, logging the reason each time.
//!
//! Deaths are seen early through the local Docker engine: the ECS agent labels each container
//! with its task ARN, and a `die` of one of our tasks' containers triggers a `DescribeTasks`.

use super::{Exit, Instance, Runtime, RuntimeEvent};
use crate::docker::{Docker, DockerEvent};
use crate::ecs::{Ecs, EcsTask, StartOutcome};
use crate::retry::Backoff;
use anyhow::{anyhow, bail};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Task statuses that mean "running or on its way": such a task is adopted, not replaced.
const LIVE_STATUSES: &[&str] = &["PROVISIONING", "PENDING", "ACTIVATING", "RUNNING"];
/// The ECS agent's container label naming the task.
const LABEL_TASK_ARN: &str = "com.amazonaws.ecs.task-arn";
/// After a container died, ECS may take a moment to report its task stopped.
const DEATH_CHECKS: u32 = 4;
const DEATH_CHECK_EVERY: Duration = Duration::from_millis(250);

/// The `startedBy` marker of the tasks this node's nodeagent starts.
pub fn started_by(instance_id: &str) -> String {
    format!("nodeagent/{instance_id}")
}

pub struct EcsRuntime {
    state: Arc<Shared>,
    /// For events and output; without it the periodic reconcile alone notices deaths.
    docker: Option<Arc<dyn Docker>>,
}

struct Shared {
    ecs: Arc<dyn Ecs>,
    cluster: String,
    container_instance: String,
    started_by: String,
    start_timeout: Duration,
    /// family → task name.
    tasks: BTreeMap<String, String>,
    /// task ARN → our task's name, or `None` for someone else's task.
    known: Mutex<HashMap<String, Option<String>>>,
}

impl EcsRuntime {
    /// `tasks` are (task name, family) pairs.
    pub fn new(
        ecs: Arc<dyn Ecs>,
        docker: Option<Arc<dyn Docker>>,
        cluster: &str,
        container_instance: &str,
        instance_id: &str,
        tasks: &[(String, String)],
        start_timeout: Duration,
    ) -> Self {
        EcsRuntime {
            state: Arc::new(Shared {
                ecs,
                cluster: cluster.to_string(),
                container_instance: container_instance.to_string(),
                started_by: started_by(instance_id),
                start_timeout,
                tasks: tasks.iter().map(|(n, f)| (f.clone(), n.clone())).collect(),
                known: Mutex::new(HashMap::new()),
            }),
            docker,
        }
    }
}

impl Shared {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Our task's name for an ECS task, `None` when it is not ours or not live.
    fn classify(&self, task: &EcsTask) -> Option<String> {
        let ours = task.started_by.as_deref() == Some(self.started_by.as_str())
            && task.desired_status == "RUNNING"
            && LIVE_STATUSES.contains(&task.last_status.as_str());
        ours.then(|| {
            self.tasks
                .get(&task.family)
                .cloned()
                // A family no longer configured: reported under its own name, then stopped.
                .unwrap_or_else(|| format!("family:{}", task.family))
        })
    }

    /// Whether the task ECS reports for `arn` has stopped (or is stopping).
    async fn stopped(&self, arn: &str) -> anyhow::Result<bool> {
        let tasks = self
            .ecs
            .describe_tasks(&self.cluster, &[arn.to_string()])
            .await?;
        Ok(tasks.first().is_none_or(|t| {
            t.desired_status != "RUNNING" || !LIVE_STATUSES.contains(&t.last_status.as_str())
        }))
    }
}

#[async_trait]
impl Runtime for EcsRuntime {
    async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        let s = &self.state;
        let arns = s
            .ecs
            .list_running_tasks(&s.cluster, &s.container_instance)
            .await?;
        let unknown: Vec<String> = {
            let known = s.known();
            arns.iter()
                .filter(|a| !known.contains_key(*a))
                .cloned()
                .collect()
        };
        let described = if unknown.is_empty() {
            Vec::new()
        } else {
            s.ecs.describe_tasks(&s.cluster, &unknown).await?
        };
        let mut known = s.known();
        for task in &described {
            known.insert(task.arn.clone(), s.classify(task));
        }
        known.retain(|arn, _| arns.contains(arn));
        Ok(arns
            .iter()
            .filter_map(|arn| {
                let task = known.get(arn).cloned().flatten()?;
                Some(Instance {
                    task,
                    id: arn.clone(),
                    running: true,
                    exit: None,
                })
            })
            .collect())
    }

    async fn start(&self, task: &str) -> anyhow::Result<Instance> {
        let s = &self.state;
        let family = s
            .tasks
            .iter()
            .find(|(_, name)| name.as_str() == task)
            .map(|(f, _)| f.clone())
            .ok_or_else(|| anyhow!("task {task} is not configured"))?;
        let deadline = Instant::now() + s.start_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let failures = match s
                .ecs
                .start_task(&s.cluster, &family, &s.container_instance, &s.started_by)
                .await?
            {
                StartOutcome::Started(t) => {
                    s.known().insert(t.arn.clone(), Some(task.to_string()));
                    return Ok(Instance {
                        task: task.to_string(),
                        id: t.arn,
                        running: true,
                        exit: None,
                    });
                }
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
                    "ECS could not place task {task} (family {family}) on {} within {:?}: {}; free the resources on this instance or raise ecs.start_timeout",
                    s.container_instance,
                    s.start_timeout,
                    reasons.join(", ")
                );
            }
            warn!(task, reasons = %reasons.join(", "), retry_in = ?delay, "ECS could not place the task; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn stop(&self, instance: &Instance) -> anyhow::Result<()> {
        if !instance.running {
            return Ok(()); // ECS already stopped it: nothing is left to clean up
        }
        let s = &self.state;
        s.ecs
            .stop_task(&s.cluster, &instance.id, "stopped by nodeagent")
            .await
    }

    async fn wait_stopped(&self, instance: &Instance, limit: Duration) -> anyhow::Result<()> {
        let s = &self.state;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let tasks = s
                .ecs
                .describe_tasks(&s.cluster, std::slice::from_ref(&instance.id))
                .await?;
            let status = tasks
                .first()
                .map_or("STOPPED".to_string(), |t| t.last_status.clone());
            if status == "STOPPED" {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{} is still {status} {limit:?} after StopTask", instance.id);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn output_tail(&self, instance: &Instance, lines: usize) -> anyhow::Result<String> {
        let docker = self
            .docker
            .as_ref()
            .ok_or_else(|| anyhow!("no Docker engine to read {}'s output from", instance.id))?;
        let containers = docker
            .list(&[(LABEL_TASK_ARN.to_string(), instance.id.clone())])
            .await?;
        match containers.first() {
            Some(c) => docker.logs_tail(&c.id, lines).await,
            None => bail!(
                "no container of {} on this node's Docker engine",
                instance.id
            ),
        }
    }

    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>> {
        let docker = self
            .docker
            .clone()
            .ok_or_else(|| anyhow!("no Docker engine: deaths are found by reconciling only"))?;
        docker.ping().await?;
        let state = self.state.clone();
        let inspector = docker.clone();
        let stream = docker.events(&[]).filter_map(move |event| {
            let (state, docker) = (state.clone(), inspector.clone());
            async move {
                let (id, code) = match event {
                    Ok(DockerEvent::Died { id, exit_code }) => (id, exit_code),
                    Ok(_) => return None,
                    Err(e) => return Some(Err(e)),
                };
                let labels = docker.inspect(&id).await.ok().flatten()?.labels;
                let arn = labels.get(LABEL_TASK_ARN)?.clone();
                if !matches!(state.known().get(&arn), Some(Some(_))) {
                    return None; // not one of ours
                }
                for _ in 0..DEATH_CHECKS {
                    match state.stopped(&arn).await {
                        Ok(true) => {
                            return Some(Ok(RuntimeEvent::Exited {
                                id: arn,
                                exit: Exit { code, reason: "container died; ECS task stopped".into() },
                            }))
                        }
                        Ok(false) => tokio::time::sleep(DEATH_CHECK_EVERY).await,
                        Err(e) => {
                            debug!(%arn, error = %format!("{e:#}"), "cannot check the task");
                            return None;
                        }
                    }
                }
                debug!(%arn, "a container died but ECS still reports the task running; the reconcile will look again");
                None
            }
        });
        Ok(stream.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecs::PlacementFailure;
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
                .filter(|t| t.desired_status == "RUNNING")
                .map(|t| t.arn.clone())
                .collect())
        }
        async fn describe_tasks(&self, _: &str, arns: &[String]) -> anyhow::Result<Vec<EcsTask>> {
            self.calls.lock().unwrap().push("DescribeTasks".into());
            Ok(self
                .tasks
                .lock()
                .unwrap()
                .iter()
                .filter(|t| arns.contains(&t.arn))
                .cloned()
                .collect())
        }
        async fn stop_task(&self, _: &str, arn: &str, _: &str) -> anyhow::Result<()> {
            self.calls.lock().unwrap().push("StopTask".into());
            for t in self
                .tasks
                .lock()
                .unwrap()
                .iter_mut()
                .filter(|t| t.arn == arn)
            {
                t.desired_status = "STOPPED".into();
            }
            Ok(())
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
            let task = task(&format!("arn:task/{family}"), family, by, ci);
            self.tasks.lock().unwrap().push(task.clone());
            Ok(StartOutcome::Started(task))
        }
    }

    fn task(arn: &str, family: &str, by: &str, ci: &str) -> EcsTask {
        EcsTask {
            arn: arn.into(),
            family: family.into(),
            started_by: Some(by.into()),
            last_status: "RUNNING".into(),
            desired_status: "RUNNING".into(),
            container_instance_arn: Some(ci.into()),
        }
    }

    fn runtime(ecs: Arc<FakeEcs>) -> EcsRuntime {
        let tasks = [("consul-agent", "consul-agent"), ("linkerd", "linkerd")]
            .map(|(n, f)| (n.to_string(), f.to_string()));
        EcsRuntime::new(ecs, None, "c", "ci", "i-1", &tasks, Duration::from_secs(5))
    }

    #[tokio::test]
    async fn finds_ours_and_describes_each_task_once() {
        let ecs = Arc::new(FakeEcs::default());
        ecs.tasks.lock().unwrap().extend([
            task("arn:ours", "consul-agent", "nodeagent/i-1", "ci"),
            task("arn:app", "hello-world", "ecs-svc/123", "ci"),
            task("arn:old", "retired", "nodeagent/i-1", "ci"),
        ]);
        let rt = runtime(ecs.clone());
        let found = rt.instances().await.unwrap();
        let names: Vec<&str> = found.iter().map(|i| i.task.as_str()).collect();
        assert_eq!(names, ["consul-agent", "family:retired"]);
        rt.instances().await.unwrap();
        assert_eq!(
            *ecs.calls.lock().unwrap(),
            ["ListTasks", "DescribeTasks", "ListTasks"],
            "a steady state costs one call"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn placement_failures_are_retried_then_reported() {
        let ecs = Arc::new(FakeEcs::default());
        *ecs.refuse.lock().unwrap() = 2;
        let started = runtime(ecs.clone()).start("consul-agent").await.unwrap();
        assert_eq!(started.id, "arn:task/consul-agent");

        let ecs = Arc::new(FakeEcs::default());
        *ecs.refuse.lock().unwrap() = u32::MAX;
        let err = runtime(ecs).start("linkerd").await.unwrap_err().to_string();
        assert!(
            err.contains("RESOURCE:MEMORY") && err.contains("linkerd"),
            "{err}"
        );
    }
}
