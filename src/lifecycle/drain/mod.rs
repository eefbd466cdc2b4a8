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
use crate::aws::{failure_kind, retry_until, FailureKind};
use crate::consul::ConsulAgent;
use crate::ecs::ContainerInstance;
use crate::hostfs::{HostFs, Perms};
use crate::imds::Imds;
use crate::retry::jitter;
use crate::supervisor::Control;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

#[cfg(test)]
mod tests;
mod trigger;

pub use trigger::{resumed_notice, wait_for_trigger, Notice, Trigger};

/// ECS's own terminating hook when managed instance draining is on (capacity providers): ECS
/// completes it once the instance's tasks are gone. nodeagent never completes it; it stops its
/// own tasks once the application tasks are gone, which is what ECS waits for.
pub use crate::config::MANAGED_DRAINING_HOOK;
/// When the instance goes away at a known time (a spot notice), the application tasks get
/// what is left but this: the foundational tasks' stops and Consul's leave need it.
pub const FINAL_STEPS: Duration = Duration::from_secs(30);

/// Where a drain is recorded — its [`DrainStatus`] as JSON, written when it begins and when it
/// ends — so the node stays drained across agent restarts in this boot: an agent that finds a
/// drain under way goes on with it, one that finds it done reports it and runs no step again.
/// A reboot clears it (a spot `stop` then start, a kernel update's `reboot`), so a node that
/// comes back boots again instead of staying drained.
pub const RECORD: &str = "/run/nodeagent/drain";
/// nodeagent's runtime directory (this boot only; the status socket's default home).
const RUNTIME_DIR: &str = "/run/nodeagent";

/// Records a drain as it stands, for an agent that starts while it goes on or after it ended.
pub fn record(fs: &dyn HostFs, drain: &DrainStatus) -> std::io::Result<()> {
    fs.create_dir_all(RUNTIME_DIR, Perms::mode(0o750))?;
    let json = serde_json::to_vec(drain).map_err(std::io::Error::other)?;
    fs.write_atomic(RECORD, &json, Perms::mode(0o644))
        .map(|_| ())
}

/// The drain that began in this boot, if one did; a record that does not parse (an older
/// agent's: the trigger's name) is a drain under way.
pub fn recorded(fs: &dyn HostFs) -> Option<DrainStatus> {
    let bytes = fs.read(RECORD).ok().flatten()?;
    Some(
        serde_json::from_slice(&bytes).unwrap_or_else(|_| DrainStatus {
            trigger: String::from_utf8_lossy(&bytes).trim().to_string(),
            ..DrainStatus::default()
        }),
    )
}

/// The application tasks are checked this often while the drain waits for them.
const TASKS_POLL: Duration = Duration::from_secs(2);

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
    /// Runs the whole sequence; `progress` follows it. With a time the instance goes away (a
    /// spot notice's), every step is budgeted from it, so Consul leaves before the instance is
    /// gone; during an autoscaling termination, the lifecycle hook is kept alive with
    /// heartbeats while the drain takes longer than its heartbeat timeout.
    pub async fn run(&self, notice: Notice, progress: &watch::Sender<Option<DrainStatus>>) {
        let trigger = notice.trigger;
        warn!(trigger = trigger.name(), "draining the node");
        progress.send_replace(Some(DrainStatus {
            trigger: trigger.name().into(),
            started_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ..DrainStatus::default()
        }));
        let gone_at = notice
            .gone_at
            .map(|t| Instant::now() + t.duration_since(SystemTime::now()).unwrap_or_default());
        if let Some(at) = gone_at {
            let left = at.saturating_duration_since(Instant::now());
            warn!(
                "the instance goes away in {left:?}: the application tasks get at most {:?}, the rest is for stopping the foundational tasks and Consul's leave",
                budget(self.tasks_timeout, gone_at, FINAL_STEPS)
            );
        }
        tokio::select! {
            _ = self.sequence(trigger, gone_at, progress) => {}
            _ = self.keep_hook_alive(trigger) => {}
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

    /// Sends `RecordLifecycleActionHeartbeat` every half of the hook's heartbeat timeout while
    /// an autoscaling termination is drained; never returns.
    async fn keep_hook_alive(&self, trigger: Trigger) {
        let hook = match (&self.lifecycle_hook, trigger) {
            (Some(hook), Trigger::Terminated) => hook,
            _ => return std::future::pending().await,
        };
        // Looked up for as long as the drain may wait for the application tasks.
        let until = Instant::now() + self.tasks_timeout;
        let timeout = async {
            let group = retry_until("finding this instance's autoscaling group", until, || {
                self.asg.group_of(&self.instance_id)
            })
            .await?
            .ok_or_else(|| anyhow::anyhow!("{} is in no autoscaling group", self.instance_id))?;
            let timeout = retry_until("reading the lifecycle hook", until, || {
                self.asg.heartbeat_timeout(&group, hook)
            })
            .await?;
            anyhow::Ok(timeout.map(|t| (group, t)))
        };
        let (group, timeout) = match timeout.await {
            Ok(Some(found)) => found,
            Ok(None) => {
                warn!("lifecycle hook {hook} not found: no heartbeats; the drain must end within the hook's timeout");
                return std::future::pending().await;
            }
            Err(e) => {
                warn!("cannot read lifecycle hook {hook} ({e:#}): no heartbeats");
                return std::future::pending().await;
            }
        };
        let every = (timeout / 2).max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            // Retried until the next one is due: the hook must not lapse for one throttle.
            let heartbeat = retry_until("a lifecycle heartbeat", Instant::now() + every, || {
                self.asg.record_heartbeat(&group, hook, &self.instance_id)
            });
            match heartbeat.await {
                Ok(()) => {
                    info!(hook = %hook, "drain: lifecycle hook {group}/{hook} kept waiting (heartbeat timeout {timeout:?})")
                }
                Err(e) => {
                    warn!(hook = %hook, "drain: cannot keep lifecycle hook {hook} waiting ({e:#})")
                }
            }
        }
    }

    /// The steps in order.
    async fn sequence(
        &self,
        trigger: Trigger,
        gone_at: Option<Instant>,
        progress: &watch::Sender<Option<DrainStatus>>,
    ) {
        let bounded = budget(self.step_timeout, gone_at, Duration::ZERO);
        let bounded = || budget(bounded, gone_at, Duration::ZERO);

        // 1. No new application tasks.
        if let Some(w) = &self.readiness {
            self.step(progress, "withdraw readiness attribute", bounded(), async {
                w.withdraw.send_replace(true);
                let mut present = w.present.clone();
                present.wait_for(|p| *p == Some(false)).await?;
                Ok("removed".to_string())
            })
            .await;
        }
        if let Some(ci) = &self.container_instance {
            let limit = bounded();
            self.step(progress, "container instance DRAINING", limit, async {
                retry_until(
                    "setting the container instance DRAINING",
                    Instant::now() + limit,
                    || self.ecs.set_draining(&self.cluster, ci),
                )
                .await?;
                Ok(ci.clone())
            })
            .await;
        }

        // 2. Traffic moves away.
        let reason = format!("nodeagent: draining ({})", trigger.name());
        self.step(progress, "consul maintenance", bounded(), async {
            self.consul.maintenance(true, &reason).await?;
            Ok("node in maintenance".to_string())
        })
        .await;

        // 3. The application tasks go.
        if let Some(ci) = &self.container_instance {
            self.step(
                progress,
                "application tasks stopped",
                budget(self.tasks_timeout, gone_at, FINAL_STEPS),
                async {
                    let mut last = usize::MAX;
                    loop {
                        // A throttled or failed look is looked again: a whole group scaling
                        // in is when AWS throttles, and the step's budget bounds the wait.
                        let tasks = match self.ecs.tasks_not_stopped(&self.cluster, ci).await {
                            Ok(tasks) => tasks,
                            Err(e) if retryable(&e) => {
                                debug!(error = %format!("{e:#}"), "drain: cannot see the application tasks yet; looking again");
                                tokio::time::sleep(jitter(TASKS_POLL)).await;
                                continue;
                            }
                            Err(e) => return Err(e),
                        };
                        let left: Vec<String> = tasks
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
                self.step(progress, "consul leave", bounded(), async {
                    self.control.suspend(task).await?;
                    self.consul.leave().await?;
                    Ok("left the cluster".to_string())
                })
                .await;
            }
            self.step(progress, &format!("stop {task}"), bounded(), async {
                self.control.hold(task).await?;
                Ok("stopped".to_string())
            })
            .await;
        }

        // 5. Let the autoscaling group terminate the instance now.
        if trigger == Trigger::Terminated {
            self.complete_lifecycle_action(progress).await;
        }
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
        if hook == MANAGED_DRAINING_HOOK {
            warn!("lifecycle.lifecycle_hook names ECS's own managed-draining hook: ECS completes it, nodeagent does not");
            return;
        }
        self.step(
            progress,
            "complete lifecycle action",
            self.step_timeout,
            async {
                let until = Instant::now() + self.step_timeout;
                let group = retry_until("finding this instance's autoscaling group", until, || {
                    self.asg.group_of(&self.instance_id)
                })
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("{} is in no autoscaling group", self.instance_id)
                })?;
                retry_until("completing the lifecycle action", until, || {
                    self.asg
                        .complete_lifecycle_action(&group, hook, &self.instance_id)
                })
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

/// Whether an error is worth another try: AWS throttled, failed or lost the answer.
fn retryable(e: &anyhow::Error) -> bool {
    matches!(
        failure_kind(e),
        Some(FailureKind::Throttled | FailureKind::Transient | FailureKind::Lost)
    )
}

/// `wanted`, or less when the instance goes away at `gone_at`: what is left then, less
/// `reserve` for what must come after (at least a second).
pub fn budget(wanted: Duration, gone_at: Option<Instant>, reserve: Duration) -> Duration {
    match gone_at {
        Some(at) => wanted.min(
            at.saturating_duration_since(Instant::now())
                .saturating_sub(reserve)
                .max(Duration::from_secs(1)),
        ),
        None => wanted,
    }
}
