//! The drain: owns taking the node out of service in order, when the instance is going away
//! (autoscaling scale-in, a spot interruption, a rebalance recommendation, system shutdown) or
//! when asked (`nodeagent drain`). Each step is bounded and logged; a step that fails or times
//! out is reported and the drain goes on — the instance is leaving either way:
//!
//! 1. withdraw the readiness attribute; set the container instance `DRAINING`;
//! 2. put the node's Consul services in maintenance, so traffic moves away;
//! 3. wait until the application tasks on this instance are `STOPPED` (or `tasks_timeout`);
//! 4. stop the foundational tasks in reverse start order, `consul leave` (agent API) just
//!    before the Consul agent's task stops;
//! 5. after an autoscaling termination, `CompleteLifecycleAction` so the instance terminates
//!    without waiting for the hook's timeout.

use crate::asg::AutoScaling;
use crate::consul::ConsulAgent;
use crate::ecs::ContainerInstance;
use crate::hostfs::{HostFs, Perms};
use crate::imds::Imds;
use crate::retry::jitter;
use crate::supervisor::Control;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Where a drain is recorded (its trigger), written when it begins: the node stays drained
/// across agent restarts in this boot. A reboot clears it (a spot `stop` then start, a kernel
/// update's `reboot`), so a node that comes back boots again instead of staying drained.
pub const RECORD: &str = "/run/nodeagent/drain";
/// nodeagent's runtime directory (this boot only; the status socket's default home).
const RUNTIME_DIR: &str = "/run/nodeagent";

/// Records that a drain began, for an agent that starts while it goes on.
pub fn record(fs: &dyn HostFs, trigger: Trigger) -> std::io::Result<()> {
    fs.create_dir_all(RUNTIME_DIR, Perms::mode(0o750))?;
    fs.write_atomic(RECORD, trigger.name().as_bytes(), Perms::mode(0o644))
        .map(|_| ())
}

/// Whether a drain began in this boot.
pub fn recorded(fs: &dyn HostFs) -> bool {
    fs.read(RECORD).ok().flatten().is_some()
}

/// The application tasks are checked this often while the drain waits for them.
const TASKS_POLL: Duration = Duration::from_secs(2);

/// Why the node drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `nodeagent drain` (the unit's ExecStop at system shutdown, or by hand).
    Requested,
    /// The autoscaling group is terminating the instance (`target-lifecycle-state`).
    Terminated,
    /// A spot interruption notice.
    SpotInterruption,
    /// A rebalance recommendation (`lifecycle.drain_on_rebalance`).
    Rebalance,
    /// A drain an earlier agent on this node began (it stopped, or was restarted, meanwhile).
    Resumed,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Requested => "requested",
            Trigger::Terminated => "autoscaling-terminated",
            Trigger::SpotInterruption => "spot-interruption",
            Trigger::Rebalance => "rebalance-recommendation",
            Trigger::Resumed => "resumed",
        }
    }
}

/// `POST /v1/drain`: drain now; `tasks_timeout` overrides `lifecycle.drain_tasks_timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainRequest {
    pub tasks_timeout: Option<Duration>,
}

/// A drain as reported (status, `nodeagent drain`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    pub trigger: String,
    /// RFC 3339.
    pub started_at: String,
    /// The step under way, or the last one.
    pub step: String,
    pub steps: Vec<StepResult>,
    pub done: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub step: String,
    pub ok: bool,
    pub detail: String,
    pub took_ms: u64,
}

/// The readiness gate's side of a drain: `withdraw` tells it to remove the attribute for good,
/// `present` says when it has.
pub struct Withdraw {
    pub withdraw: watch::Sender<bool>,
    pub present: watch::Receiver<Option<bool>>,
}

pub struct Drain {
    pub cluster: String,
    /// `None` on a node that did not join ECS (docker runtime only).
    pub container_instance: Option<String>,
    pub instance_id: String,
    /// ECS `startedBy` of nodeagent's own tasks, which are not application tasks.
    pub started_by: String,
    pub ecs: Arc<dyn ContainerInstance>,
    pub consul: Arc<dyn ConsulAgent>,
    pub asg: Arc<dyn AutoScaling>,
    pub control: Control,
    pub readiness: Option<Withdraw>,
    /// The tasks, in the order they are stopped (the reverse of their start order).
    pub stop_order: Vec<String>,
    /// The task running the Consul agent: `leave` is called just before it stops.
    pub consul_task: Option<String>,
    pub lifecycle_hook: Option<String>,
    pub tasks_timeout: Duration,
    pub step_timeout: Duration,
}

impl Drain {
    /// Runs the whole sequence; `progress` follows it.
    pub async fn run(&self, trigger: Trigger, progress: &watch::Sender<Option<DrainStatus>>) {
        warn!(trigger = trigger.name(), "draining the node");
        progress.send_replace(Some(DrainStatus {
            trigger: trigger.name().into(),
            started_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ..DrainStatus::default()
        }));
        let bounded = self.step_timeout;

        // 1. No new application tasks.
        if let Some(w) = &self.readiness {
            self.step(progress, "withdraw readiness attribute", bounded, async {
                w.withdraw.send_replace(true);
                let mut present = w.present.clone();
                present.wait_for(|p| *p == Some(false)).await?;
                Ok("removed".to_string())
            })
            .await;
        }
        if let Some(ci) = &self.container_instance {
            self.step(progress, "container instance DRAINING", bounded, async {
                self.ecs.set_draining(&self.cluster, ci).await?;
                Ok(ci.clone())
            })
            .await;
        }

        // 2. Traffic moves away.
        let reason = format!("nodeagent: draining ({})", trigger.name());
        self.step(progress, "consul maintenance", bounded, async {
            self.consul.maintenance(true, &reason).await?;
            Ok("node in maintenance".to_string())
        })
        .await;

        // 3. The application tasks go.
        if let Some(ci) = &self.container_instance {
            self.step(
                progress,
                "application tasks stopped",
                self.tasks_timeout,
                async {
                    let mut last = usize::MAX;
                    loop {
                        let left: Vec<String> = self
                            .ecs
                            .tasks_not_stopped(&self.cluster, ci)
                            .await?
                            .into_iter()
                            .filter(|t| t.started_by.as_deref() != Some(self.started_by.as_str()))
                            .map(|t| format!("{} ({})", t.arn, t.last_status))
                            .collect();
                        if left.is_empty() {
                            return Ok("none left".to_string());
                        }
                        if left.len() != last {
                            info!(
                                tasks = left.len(),
                                "drain: waiting for application tasks to stop: {}",
                                left.join(", ")
                            );
                            last = left.len();
                        }
                        tokio::time::sleep(jitter(TASKS_POLL)).await;
                    }
                },
            )
            .await;
        }

        // 4. The foundational tasks, in reverse start order, Consul's leave before its agent.
        for task in &self.stop_order {
            if self.consul_task.as_ref() == Some(task) {
                // The agent exits once it has left: it must not be restarted in between.
                self.step(progress, "consul leave", bounded, async {
                    self.control.suspend(task).await?;
                    self.consul.leave().await?;
                    Ok("left the cluster".to_string())
                })
                .await;
            }
            self.step(progress, &format!("stop {task}"), bounded, async {
                self.control.hold(task).await?;
                Ok("stopped".to_string())
            })
            .await;
        }

        // 5. Let the autoscaling group terminate the instance now.
        if trigger == Trigger::Terminated {
            self.complete_lifecycle_action(progress).await;
        }
        progress.send_modify(|p| {
            if let Some(p) = p {
                p.done = true;
            }
        });
        warn!(
            trigger = trigger.name(),
            "drained: the node's tasks are stopped and stay stopped"
        );
    }

    /// After a drain for another reason, the group may still scale the instance in: then its
    /// lifecycle hook is completed at once (the tasks are already stopped).
    pub async fn complete_when_terminated(
        &self,
        imds: Arc<dyn Imds>,
        every: Duration,
        progress: &watch::Sender<Option<DrainStatus>>,
    ) {
        if self.lifecycle_hook.is_none() {
            return;
        }
        loop {
            tokio::time::sleep(jitter(every)).await;
            if let Ok(Some(state)) = imds.target_lifecycle_state().await {
                if state.trim() == "Terminated" {
                    info!("the autoscaling group terminates the drained instance");
                    self.complete_lifecycle_action(progress).await;
                    return;
                }
            }
        }
    }

    async fn complete_lifecycle_action(&self, progress: &watch::Sender<Option<DrainStatus>>) {
        let Some(hook) = &self.lifecycle_hook else {
            return;
        };
        self.step(
            progress,
            "complete lifecycle action",
            self.step_timeout,
            async {
                let group = self.asg.group_of(&self.instance_id).await?.ok_or_else(|| {
                    anyhow::anyhow!("{} is in no autoscaling group", self.instance_id)
                })?;
                self.asg
                    .complete_lifecycle_action(&group, hook, &self.instance_id)
                    .await?;
                Ok(format!("{group}/{hook} CONTINUE"))
            },
        )
        .await;
    }

    async fn step(
        &self,
        progress: &watch::Sender<Option<DrainStatus>>,
        name: &str,
        limit: Duration,
        work: impl Future<Output = anyhow::Result<String>>,
    ) {
        progress.send_modify(|p| {
            if let Some(p) = p {
                p.step = name.to_string();
            }
        });
        let started = Instant::now();
        let (ok, detail) = match tokio::time::timeout(limit, work).await {
            Ok(Ok(detail)) => {
                info!(
                    step = name,
                    took_ms = started.elapsed().as_millis() as u64,
                    "drain: {detail}"
                );
                (true, detail)
            }
            Ok(Err(e)) => {
                let detail = format!("{e:#}");
                warn!(step = name, "drain step {name} failed ({detail}); going on");
                (false, detail)
            }
            Err(_) => {
                let detail = format!("timed out after {limit:?}");
                warn!(step = name, "drain step {detail}; going on");
                (false, detail)
            }
        };
        progress.send_modify(|p| {
            if let Some(p) = p {
                p.steps.push(StepResult {
                    step: name.to_string(),
                    ok,
                    detail,
                    took_ms: started.elapsed().as_millis() as u64,
                });
            }
        });
    }
}

/// Polls IMDS every `every` (jittered) for a reason to drain: the autoscaling group
/// terminating the instance, a spot interruption notice, and (when `rebalance`) a rebalance
/// recommendation. Returns the first one seen.
pub async fn wait_for_trigger(imds: Arc<dyn Imds>, every: Duration, rebalance: bool) -> Trigger {
    loop {
        tokio::time::sleep(jitter(every)).await;
        match imds.target_lifecycle_state().await {
            Ok(Some(state)) if state.trim() == "Terminated" => return Trigger::Terminated,
            Ok(_) => {}
            Err(e) => debug!(error = %e, "cannot read the autoscaling lifecycle state"),
        }
        match imds.spot_instance_action().await {
            Ok(Some(notice)) => {
                warn!(notice = %notice.trim(), "spot interruption notice");
                return Trigger::SpotInterruption;
            }
            Ok(None) => {}
            Err(e) => debug!(error = %e, "cannot read the spot instance action"),
        }
        if rebalance {
            match imds.rebalance_recommendation().await {
                Ok(Some(_)) => return Trigger::Rebalance,
                Ok(None) => {}
                Err(e) => debug!(error = %e, "cannot read the rebalance recommendation"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::ImdsError;
    use async_trait::async_trait;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Meta-data items the test sets while the poller runs.
    #[derive(Default)]
    struct Items(Mutex<BTreeMap<String, String>>);

    #[async_trait]
    impl Imds for Items {
        async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
            let item = path.trim_start_matches("/latest/meta-data/");
            Ok(self.0.lock().unwrap().get(item).cloned())
        }
        fn endpoint(&self) -> &str {
            "test"
        }
    }

    impl Items {
        fn set(&self, item: &str, value: &str) {
            self.0.lock().unwrap().insert(item.into(), value.into());
        }
    }

    async fn first_trigger(items: Arc<Items>, rebalance: bool) -> Option<Trigger> {
        let poll = wait_for_trigger(items, Duration::from_secs(5), rebalance);
        tokio::time::timeout(Duration::from_secs(60), poll)
            .await
            .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn each_notice_is_a_trigger_and_rebalance_only_when_asked() {
        let items = Arc::new(Items::default());
        items.set("autoscaling/target-lifecycle-state", "InService");
        assert_eq!(
            first_trigger(items.clone(), true).await,
            None,
            "in service: no drain"
        );

        items.set(
            "events/recommendations/rebalance",
            r#"{"noticeTime": "2026-11-23T18:00:00Z"}"#,
        );
        assert_eq!(first_trigger(items.clone(), false).await, None, "not asked");
        assert_eq!(
            first_trigger(items.clone(), true).await,
            Some(Trigger::Rebalance)
        );

        items.set("spot/instance-action", r#"{"action": "terminate"}"#);
        assert_eq!(
            first_trigger(items.clone(), false).await,
            Some(Trigger::SpotInterruption)
        );

        items.set("autoscaling/target-lifecycle-state", "Terminated");
        assert_eq!(
            first_trigger(items.clone(), false).await,
            Some(Trigger::Terminated),
            "the group's decision comes first"
        );
    }
}
