//! ECS runtime: owns running the tasks as ECS tasks on this node's container instance, so they
//! show up in ECS as the guide intends — against an ECS that is eventually consistent, throttles
//! and sometimes loses an answer.
//!
//! Tasks are started with `startedBy = nodeagent/<instance-id>`; our instances are the tasks on
//! this container instance with that `startedBy`, found with `ListTasks` (desired status
//! RUNNING) and the local ECS agent's `GET /v1/tasks` (which knows a task as soon as it is
//! handed to this instance, its `StartTask` answer perhaps lost with a killed agent), then
//! `DescribeTasks`; a task of one of our families the local agent runs and ECS cannot describe
//! yet counts as ours, starting. What is known about an ARN is remembered, so a healthy steady
//! state costs one `ListTasks` per reconcile even with application tasks on the node.
//!
//! Never "gone" from absence: `ListTasks` may not list a task for a while after `StartTask`.
//! A task of ours that it leaves out is looked up in the local ECS agent's introspection API
//! (`GET /v1/tasks`: local and immediate), then with `DescribeTasks` by ARN; one that ECS does
//! not know yet either, started less than [`SETTLING`] ago, is still ours and starting. Every
//! ARN `StartTask` answers is recorded on the host before anything else ([`record`]), so an
//! agent restarted at any moment knows what it started. A `StartTask` whose answer was lost,
//! or that ECS refuses for the ports (`RESOURCE:PORTS`: a copy already holds them), first
//! looks for a running copy of ours (local agent, then `ListTasks` by `startedBy` and family)
//! and adopts it instead of starting another. Throttled and failed calls are retried with
//! jitter until `ecs.start_timeout`; placement failures too.
//!
//! Deaths are seen early through the local Docker engine: the ECS agent labels each container
//! with its task ARN, and a `die` of one of our tasks' containers triggers a `DescribeTasks`.

mod record;
#[cfg(test)]
mod tests;

pub use record::PATH as RECORD_PATH;

use super::{Exit, Instance, Runtime, RuntimeEvent};
use crate::agent::EcsAgent;
use crate::aws::{failure_kind, retry_until, FailureKind, RETRY_BASE, RETRY_CAP};
use crate::docker::{Docker, DockerEvent};
use crate::ecs::{Ecs, EcsTask, StartOutcome};
use crate::hostfs::HostFs;
use crate::retry::FullJitter;
use anyhow::{anyhow, bail};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use record::Record;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Task statuses that mean "running or on its way": such a task is adopted, not replaced.
const LIVE_STATUSES: &[&str] = &["PROVISIONING", "PENDING", "ACTIVATING", "RUNNING"];
/// The ECS agent's container label naming the task.
const LABEL_TASK_ARN: &str = "com.amazonaws.ecs.task-arn";
/// After a container died, ECS may take a moment to report its task stopped.
const DEATH_CHECKS: u32 = 4;
const DEATH_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a task we started may be unknown to `ListTasks` and `DescribeTasks` (eventual
/// consistency) and still be ours, starting.
pub const SETTLING: Duration = Duration::from_secs(120);
/// After a `StartTask` whose answer was lost, ECS is given this long before it is asked
/// whether the task exists.
const LOST_SETTLE: Duration = Duration::from_secs(2);

/// The `startedBy` marker of the tasks this node's nodeagent starts.
pub fn started_by(instance_id: &str) -> String {
    format!("nodeagent/{instance_id}")
}

pub struct EcsRuntime {
    state: Arc<Shared>,
    /// For events and output; without it the periodic reconcile alone notices deaths.
    docker: Option<Arc<dyn Docker>>,
}

/// What the runtime talks to and is about.
pub struct Context {
    pub ecs: Arc<dyn Ecs>,
    /// The local ECS agent (its `/v1/tasks`).
    pub agent: Option<Arc<dyn EcsAgent>>,
    pub docker: Option<Arc<dyn Docker>>,
    /// Where the started tasks are recorded; `None`: in memory only.
    pub fs: Option<Arc<dyn HostFs>>,
    pub cluster: String,
    pub container_instance: String,
    pub instance_id: String,
    /// (task name, family) pairs.
    pub tasks: Vec<(String, String)>,
    pub start_timeout: Duration,
}

struct Shared {
    ecs: Arc<dyn Ecs>,
    agent: Option<Arc<dyn EcsAgent>>,
    cluster: String,
    container_instance: String,
    started_by: String,
    start_timeout: Duration,
    /// family → (task name, the revision when the configuration pins one: `family:3`).
    tasks: BTreeMap<String, (String, Option<u32>)>,
    /// task ARN → our task's name, or `None` for someone else's task.
    known: Mutex<HashMap<String, Option<String>>>,
    /// What this node started, and when.
    record: Mutex<Record>,
}

impl EcsRuntime {
    pub fn new(cx: Context) -> Self {
        let record = Record::load(cx.fs);
        let known = record
            .entries()
            .iter()
            .map(|(arn, s)| (arn.clone(), Some(s.task.clone())))
            .collect();
        EcsRuntime {
            state: Arc::new(Shared {
                ecs: cx.ecs,
                agent: cx.agent,
                started_by: started_by(&cx.instance_id),
                cluster: cx.cluster,
                container_instance: cx.container_instance,
                start_timeout: cx.start_timeout,
                tasks: cx
                    .tasks
                    .iter()
                    .map(|(name, family)| match family.split_once(':') {
                        Some((f, rev)) => (f.to_string(), (name.clone(), rev.parse().ok())),
                        None => (family.clone(), (name.clone(), None)),
                    })
                    .collect(),
                known: Mutex::new(known),
                record: Mutex::new(record),
            }),
            docker: cx.docker,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Our task's name for an ECS task, `None` when it is not ours or not live. A task that
    /// says it is ours (`startedBy`) is taken only if it runs a configured family (at the
    /// configured revision, when one is pinned) and carries no overrides — nodeagent makes
    /// none; anything else claiming our name is named so and stopped by the supervisor.
    fn classify(&self, task: &EcsTask) -> Option<String> {
        let claims = task.started_by.as_deref() == Some(self.started_by.as_str()) && live(task);
        if !claims {
            return None;
        }
        let Some((name, pinned)) = self.tasks.get(&task.family) else {
            // A family no longer configured: reported under its own name, then stopped.
            return Some(format!("family:{}", task.family));
        };
        let why = if task.overridden {
            Some("started with overrides nodeagent never makes".to_string())
        } else if pinned.is_some() && task.revision != *pinned {
            Some(format!(
                "revision {:?} of {}, not the configured {:?}",
                task.revision, task.family, pinned
            ))
        } else {
            None
        };
        Some(match why {
            None => name.clone(),
            Some(why) => {
                warn!(task = %name, arn = %task.arn, "{name}: task {} claims to be this node's but is not ({why}): not adopted", task.arn);
                format!("{name} (not ours: {why})")
            }
        })
    }

    /// Whether the task ECS reports for `arn` has stopped (or is stopping).
    async fn stopped(&self, arn: &str) -> anyhow::Result<bool> {
        let tasks = self
            .ecs
            .describe_tasks(&self.cluster, &[arn.to_string()])
            .await?;
        Ok(tasks.first().is_none_or(|t| !live(t)))
    }

    /// The tasks the local agent runs (not stopped), ARN to family, if it answers.
    async fn local(&self) -> Option<BTreeMap<String, String>> {
        let agent = self.agent.as_ref()?;
        match agent.tasks().await {
            Ok(tasks) => Some(
                tasks
                    .into_iter()
                    .filter(|t| t.live())
                    .map(|t| (t.arn, t.family))
                    .collect(),
            ),
            Err(e) => {
                debug!("the local ECS agent does not tell its tasks: {e:#}");
                None
            }
        }
    }

    /// Of ours that neither `ListTasks` nor the local agent shows, those that are still live:
    /// live in `DescribeTasks`, or started less than [`SETTLING`] ago and unknown to ECS yet.
    async fn still_live(&self, rest: Vec<String>) -> anyhow::Result<BTreeSet<String>> {
        let mut live_now = BTreeSet::new();
        let described = self.ecs.describe_tasks(&self.cluster, &rest).await?;
        let record = lock(&self.record);
        for arn in rest {
            match described.iter().find(|t| t.arn == arn) {
                Some(t) if live(t) => {
                    live_now.insert(arn);
                }
                Some(_) => {} // stopped
                None => {
                    // ECS does not know it yet: ours if we started it moments ago.
                    let settling = record
                        .entries()
                        .get(&arn)
                        .is_some_and(|s| Record::age(s) < SETTLING);
                    if settling {
                        debug!(%arn, "not listed nor described yet: still starting");
                        live_now.insert(arn);
                    }
                }
            }
        }
        Ok(live_now)
    }

    /// A live task of ours of `family` that runs already, if ECS or the local agent shows one
    /// (a `StartTask` whose answer was lost, a copy holding the ports).
    async fn find_running(&self, family: &str) -> anyhow::Result<Option<EcsTask>> {
        let mut candidates: BTreeSet<String> = self
            .local()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, f)| f == family)
            .map(|(arn, _)| arn)
            .collect();
        candidates.extend(
            self.ecs
                .running_tasks_of(
                    &self.cluster,
                    &self.container_instance,
                    family,
                    &self.started_by,
                )
                .await?,
        );
        if candidates.is_empty() {
            return Ok(None);
        }
        let arns: Vec<String> = candidates.into_iter().collect();
        let tasks = self.ecs.describe_tasks(&self.cluster, &arns).await?;
        Ok(tasks.into_iter().find(|t| {
            t.family == family
                && t.started_by.as_deref() == Some(self.started_by.as_str())
                && live(t)
        }))
    }

    /// [`Self::find_running`] until it answers or `deadline` (the start's): a start never goes
    /// on to another `StartTask` without having looked — throttled now, it would start a
    /// second copy.
    async fn look_for(
        &self,
        task: &str,
        family: &str,
        deadline: Instant,
    ) -> anyhow::Result<Option<EcsTask>> {
        retry_until(
            &format!("{task}: looking for a copy of family {family} that runs already"),
            deadline,
            || self.find_running(family),
        )
        .await
    }

    /// Records a task of ours: on the host first, then in memory.
    fn remember(&self, arn: &str, task: &str) {
        if let Err(e) = lock(&self.record).add(arn, task) {
            warn!(%arn, "cannot record the started task ({e}): a restarted agent would find it by listing only");
        }
        lock(&self.known).insert(arn.to_string(), Some(task.to_string()));
    }
}

fn live(t: &EcsTask) -> bool {
    t.desired_status == "RUNNING" && LIVE_STATUSES.contains(&t.last_status.as_str())
}

fn instance(task: &str, arn: &str) -> Instance {
    Instance {
        task: task.to_string(),
        id: arn.to_string(),
        running: true,
        exit: None,
    }
}

#[async_trait]
impl Runtime for EcsRuntime {
    async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        let s = &self.state;
        let listed = s
            .ecs
            .list_running_tasks(&s.cluster, &s.container_instance)
            .await?;
        // The local agent knows a task as soon as ECS hands it over, `ListTasks` perhaps much
        // later: a task a killed agent started (its StartTask answer lost with it) is seen
        // here, so it is adopted, not started again.
        let local = s.local().await.unwrap_or_default();
        let seen: BTreeSet<&String> = listed.iter().chain(local.keys()).collect();
        let (unknown, missing): (Vec<String>, Vec<String>) = {
            let known = lock(&s.known);
            let unknown = seen
                .iter()
                .filter(|a| !known.contains_key(**a))
                .map(|a| a.to_string())
                .collect();
            let missing = known
                .iter()
                .filter(|(arn, task)| task.is_some() && !seen.contains(arn))
                .map(|(arn, _)| arn.clone())
                .collect();
            (unknown, missing)
        };
        let described = if unknown.is_empty() {
            Vec::new()
        } else {
            s.ecs.describe_tasks(&s.cluster, &unknown).await?
        };
        let still = if missing.is_empty() {
            BTreeSet::new()
        } else {
            s.still_live(missing).await?
        };
        // What the local agent runs and ECS cannot describe yet: one of our families is taken
        // for ours, starting (not started again), until ECS says whose it is.
        let undescribed: Vec<Instance> = local
            .iter()
            .filter(|(arn, _)| unknown.contains(arn) && !described.iter().any(|t| &t.arn == *arn))
            .filter_map(|(arn, family)| {
                let (task, _) = s.tasks.get(family)?;
                debug!(%arn, "{task}: the local agent runs it, ECS does not describe it yet");
                Some(instance(task, arn))
            })
            .collect();
        let mut known = lock(&s.known);
        for task in &described {
            known.insert(task.arn.clone(), s.classify(task));
        }
        known.retain(|arn, _| seen.contains(arn) || still.contains(arn));
        let _ = lock(&s.record).retain(|arn| known.contains_key(arn));
        Ok(known
            .iter()
            .filter_map(|(arn, task)| Some(instance(task.as_ref()?, arn)))
            .chain(undescribed)
            .collect())
    }

    async fn start(&self, task: &str) -> anyhow::Result<Instance> {
        let s = &self.state;
        let (family, pinned) = s
            .tasks
            .iter()
            .find(|(_, (name, _))| name.as_str() == task)
            .map(|(f, (_, rev))| (f.clone(), *rev))
            .ok_or_else(|| anyhow!("task {task} is not configured"))?;
        // StartTask takes `family` (the latest ACTIVE revision) or `family:revision`.
        let definition = match pinned {
            Some(rev) => format!("{family}:{rev}"),
            None => family.clone(),
        };
        let deadline = Instant::now() + s.start_timeout;
        let mut backoff = FullJitter::new(RETRY_BASE, RETRY_CAP);
        loop {
            let started = s
                .ecs
                .start_task(
                    &s.cluster,
                    &definition,
                    &s.container_instance,
                    &s.started_by,
                )
                .await;
            let why = match started {
                Ok(StartOutcome::Started(t)) => {
                    s.remember(&t.arn, task);
                    return Ok(instance(task, &t.arn));
                }
                Ok(StartOutcome::NotPlaced(failures)) => {
                    let reasons: Vec<String> = failures
                        .iter()
                        .map(|f| match &f.detail {
                            Some(d) => format!("{} ({d})", f.reason),
                            None => f.reason.clone(),
                        })
                        .collect();
                    // Ports taken: perhaps by a copy of ours that runs already.
                    if failures
                        .iter()
                        .any(|f| f.reason.starts_with("RESOURCE:PORTS"))
                    {
                        if let Some(t) = s.look_for(task, &family, deadline).await? {
                            info!(task, arn = %t.arn, "{task}: ECS refused a start for its ports: a copy of ours runs already; adopted it");
                            s.remember(&t.arn, task);
                            return Ok(instance(task, &t.arn));
                        }
                    }
                    format!("ECS could not place it: {}", reasons.join(", "))
                }
                Err(e) => match failure_kind(&e) {
                    Some(FailureKind::Lost) => {
                        // It may have started: look before starting another.
                        warn!(task, "{task}: the answer to StartTask was lost ({e:#}); looking for the task before starting another");
                        tokio::time::sleep(LOST_SETTLE).await;
                        if let Some(t) = s.look_for(task, &family, deadline).await? {
                            info!(task, arn = %t.arn, "{task}: found the task the lost StartTask started");
                            s.remember(&t.arn, task);
                            return Ok(instance(task, &t.arn));
                        }
                        format!("{e:#}")
                    }
                    Some(FailureKind::Throttled | FailureKind::Transient) => format!("{e:#}"),
                    Some(FailureKind::Refused) | None => return Err(e),
                },
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay > deadline {
                bail!(
                    "task {task} (family {family}) not started on {} within {:?} (ecs.start_timeout): {why}; free the resources on this instance, check ECS, or raise ecs.start_timeout",
                    s.container_instance,
                    s.start_timeout,
                );
            }
            warn!(task, retry_in = ?delay, "{task}: not started ({why}); retrying in {delay:?}");
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
        let deadline = Instant::now() + limit;
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
            if Instant::now() >= deadline {
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
                if !matches!(lock(&state.known).get(&arn), Some(Some(_))) {
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
