//! Supervision: owns keeping each foundational task running and healthy, whatever runs it.
//!
//! One loop, driven by the runtime's events (a container died), health-probe results, timers
//! (scheduled restarts, probes) and a periodic reconcile that compares what runs with what
//! should — the backstop for missed events and an engine that was away. Rules:
//! - a task starts only once every task it depends on is healthy;
//! - the first restart after a healthy run is immediate, repeated failures back off
//!   exponentially (jittered) up to a cap, and the backoff resets once the task has been healthy
//!   for `backoff_reset_after`;
//! - `crash_loop_restarts` restarts within `crash_loop_window` make the state `crash-loop` (it
//!   keeps retrying at the cap) and the task's last output is logged;
//! - on start (and at every reconcile) running instances of our tasks are adopted, duplicates
//!   and instances of tasks not in the configuration are stopped;
//! - stopping the supervisor leaves the tasks running.
//!
//! Everything slow — starts, stops, probes, reading output — runs as a job beside the loop, so
//! the loop answers its liveness pings (the systemd watchdog) between any two steps; only the
//! reconcile's listing is made in the loop (bounded by the runtime). Time is tokio's, so the
//! loop runs on a paused clock in its tests.

mod control;
pub mod health;
mod reactions;
mod reconcile;
mod slot;
#[cfg(test)]
mod tests;

use crate::config::Supervision;
use crate::retry::{jitter, spread, FullJitter};
use crate::runtime::{Exit, Instance, Runtime, RuntimeEvent};
use control::{Ask, HoldRequest};
pub use control::{Control, Liveness};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use health::{Probe, Prober};
use serde::Serialize;
use slot::Slot;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

/// While a task is not yet healthy it is probed this often (at most its interval).
const FIRST_PROBES: Duration = Duration::from_millis(250);
/// Reconnection to a runtime whose event stream broke backs off from/to these.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// Until the runtime is first listed, listing is tried again from/to these (full jitter).
const LIST_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// A task's state, in status (`tasks[].state`), logs and metrics as [`State::as_str`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    #[default]
    Starting,
    Healthy,
    Unhealthy,
    Restarting,
    CrashLoop,
    Stopped,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Healthy,
        State::Unhealthy,
        State::Restarting,
        State::CrashLoop,
        State::Stopped,
    ];

    /// The state's name in status, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
            State::Restarting => "restarting",
            State::CrashLoop => "crash-loop",
            State::Stopped => "stopped",
        }
    }
}

/// A task as the supervisor is told about it.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub name: String,
    pub depends_on: Vec<String>,
    pub probe: Option<Probe>,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub restart_when_unhealthy: bool,
    pub restart_with_dependencies: bool,
}

/// A task's state as reported (status, logs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskStatus {
    pub name: String,
    pub state: State,
    pub since: SystemTime,
    pub restarts: u64,
    pub instance: Option<String>,
    pub last_exit: Option<Exit>,
    /// The last lines the instance that last ended wrote (`supervision.log_lines`).
    pub last_output: Option<String>,
    pub health: Option<String>,
    /// How long the last health check took.
    pub health_latency: Option<Duration>,
    /// The current instance was found running, not started by this nodeagent.
    pub adopted: bool,
}

/// When `run` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Once every task has been started or adopted (bootstrap only).
    AllStarted,
    /// When the shutdown future completes.
    Shutdown,
}

/// What a job beside the loop reports back.
enum Job {
    Started(usize, anyhow::Result<Instance>),
    Probed(usize, String, Duration, Result<(), String>),
    /// An instance was stopped (a dead one removed, a duplicate, a stray, a dependent):
    /// `slot` is `None` for a task that is not configured.
    Stopped {
        slot: Option<usize>,
        id: String,
        result: anyhow::Result<()>,
    },
    /// The output of the instance that ended; `log`: write it to the log too (the task just
    /// entered crash-loop).
    Output {
        slot: usize,
        text: anyhow::Result<String>,
        log: bool,
    },
    /// A held task's instance was stopped.
    Held(usize, anyhow::Result<()>),
    /// A signal was sent (or not), its asker answered.
    Signalled(anyhow::Result<()>, oneshot::Sender<anyhow::Result<()>>),
}

pub struct Supervisor {
    runtime: Arc<dyn Runtime>,
    prober: Arc<dyn Prober>,
    policy: Supervision,
    slots: Vec<Slot>,
    status: watch::Sender<Vec<TaskStatus>>,
    /// Exits seen for ids no slot holds yet (a start still in flight).
    unclaimed_exits: HashMap<String, Exit>,
    /// Instances being stopped by a job: not stopped again until it is done (a stop that
    /// hangs must not pile up at every reconcile).
    stopping: BTreeSet<String>,
    /// Under `Until::AllStarted`, a start that failed ends the run with this error.
    fatal: Option<anyhow::Error>,
    /// Whether the runtime's instances were listed once: nothing starts before, so an instance
    /// that already runs (an agent restarted) is adopted, never started a second time.
    listed: bool,
    until: Until,
    /// Liveness questions ([`Liveness`]), answered by the loop itself.
    pings: mpsc::Receiver<oneshot::Sender<()>>,
    ping_sender: mpsc::Sender<oneshot::Sender<()>>,
    holds: mpsc::Receiver<HoldRequest>,
    hold_sender: mpsc::Sender<HoldRequest>,
}

impl Supervisor {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        prober: Arc<dyn Prober>,
        policy: Supervision,
        tasks: Vec<TaskSpec>,
    ) -> Self {
        let (status, _) = watch::channel(Vec::new());
        let (ping_sender, pings) = mpsc::channel(1);
        let (hold_sender, holds) = mpsc::channel(8);
        let supervisor = Supervisor {
            runtime,
            prober,
            policy,
            slots: tasks.into_iter().map(Slot::new).collect(),
            status,
            unclaimed_exits: HashMap::new(),
            stopping: BTreeSet::new(),
            fatal: None,
            listed: false,
            until: Until::Shutdown,
            pings,
            ping_sender,
            holds,
            hold_sender,
        };
        supervisor.publish(); // every task `starting`, before anything ran
        supervisor
    }

    /// Starts nothing, restarts nothing: running instances are adopted and left as they are
    /// (an agent resuming a drain its predecessor began).
    pub fn suspend_all(&mut self) {
        for slot in &mut self.slots {
            slot.suspended = true;
            slot.next_start = None;
        }
    }

    /// A handle to stop tasks for good (a drain).
    pub fn control(&self) -> Control {
        Control(self.hold_sender.clone())
    }

    /// A handle to ask whether the loop is turning.
    pub fn liveness(&self) -> Liveness {
        Liveness(self.ping_sender.clone())
    }

    /// Task states, updated at every change.
    pub fn watch(&self) -> watch::Receiver<Vec<TaskStatus>> {
        self.status.subscribe()
    }

    /// Supervises until `until`; with `Until::Shutdown`, until `shutdown` completes. Tasks are
    /// left running either way.
    pub async fn run(
        &mut self,
        until: Until,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        self.until = until;
        let mut jobs: JoinSet<Job> = JoinSet::new();
        let mut events: Option<BoxStream<'static, anyhow::Result<RuntimeEvent>>> = None;
        let mut reconnect_at = Instant::now();
        let mut reconnect_delay = RECONNECT.0;
        // Subscribe before looking, so nothing that dies in between is missed; then adopt.
        match self.runtime.events().await {
            Ok(stream) => events = Some(stream),
            Err(e) => warn!("runtime events unavailable ({e:#}); will retry"),
        }
        // Until the first listing succeeds it is tried again soon, and nothing starts.
        let mut list_retry = FullJitter::new(LIST_RETRY.0, LIST_RETRY.1);
        let mut next_reconcile = self.reconcile_then(&mut jobs, &mut list_retry).await;
        loop {
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            self.schedule(&mut jobs);
            self.publish();
            if until == Until::AllStarted && self.slots.iter().all(|s| s.instance.is_some()) {
                return Ok(());
            }
            // A start waiting on a dependency is no timer: a dependency turning healthy is a
            // probe's job, which wakes the loop (waking for it would spin the loop).
            let healthy = self.healthy_names();
            let wake = self
                .slots
                .iter()
                .flat_map(|s| {
                    let startable = s.spec.depends_on.iter().all(|d| healthy.contains(d))
                        && self.listed
                        && !s.busy
                        && !s.suspended
                        && s.instance.is_none();
                    [s.next_start.filter(|_| startable), s.next_probe]
                })
                .flatten()
                .chain([next_reconcile])
                .chain(events.is_none().then_some(reconnect_at))
                .min()
                .unwrap_or(next_reconcile);
            tokio::select! {
                _ = &mut shutdown, if until == Until::Shutdown => return Ok(()),
                Some(reply) = self.pings.recv() => {
                    let _ = reply.send(());
                }
                Some((task, ask, done)) = self.holds.recv() => match ask {
                    Ask::Hold | Ask::Suspend => self.hold(&task, ask == Ask::Hold, done, &mut jobs),
                    Ask::Restart(why) => self.restart_now(&task, &why, done, &mut jobs),
                    Ask::Signal(signal) => self.signal(&task, &signal, done, &mut jobs),
                },
                event = next_event(&mut events) => match event {
                    Some(Ok(RuntimeEvent::Exited { id, exit })) => self.on_exited(&id, exit, false, &mut jobs),
                    Some(Err(e)) => {
                        warn!("lost the runtime's event stream ({e:#}); reconnecting");
                        events = None;
                    }
                    None => {
                        warn!("the runtime's event stream ended; reconnecting");
                        events = None;
                    }
                },
                Some(done) = jobs.join_next(), if !jobs.is_empty() => match done {
                    Ok(job) => self.on_job(job, &mut jobs),
                    Err(e) => warn!("a supervision job failed: {e}"),
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            if events.is_none() && now >= reconnect_at {
                match self.runtime.events().await {
                    Ok(stream) => {
                        info!("runtime events reconnected; reconciling");
                        events = Some(stream);
                        reconnect_delay = RECONNECT.0;
                        next_reconcile = self.reconcile_then(&mut jobs, &mut list_retry).await;
                    }
                    Err(e) => {
                        debug!(error = %format!("{e:#}"), "runtime still unavailable");
                        reconnect_at = now + jitter(reconnect_delay);
                        reconnect_delay = (reconnect_delay * 2).min(RECONNECT.1);
                    }
                }
            }
            if now >= next_reconcile {
                next_reconcile = self.reconcile_then(&mut jobs, &mut list_retry).await;
            }
        }
    }

    /// Reconciles; returns when the next reconcile is due: after the interval, or soon while
    /// the runtime was never listed.
    async fn reconcile_then(
        &mut self,
        jobs: &mut JoinSet<Job>,
        list_retry: &mut FullJitter,
    ) -> Instant {
        self.reconcile(jobs).await;
        Instant::now()
            + if self.listed {
                spread(self.policy.reconcile_interval)
            } else {
                list_retry.next_delay()
            }
    }

    /// The tasks that are healthy now.
    fn healthy_names(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.state == State::Healthy)
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// Starts what is due and whose dependencies are healthy; probes what is due.
    fn schedule(&mut self, jobs: &mut JoinSet<Job>) {
        let now = Instant::now();
        let healthy = self.healthy_names();
        let listed = self.listed;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let deps_ready = slot.spec.depends_on.iter().all(|d| healthy.contains(d));
            if slot.instance.is_none()
                && listed
                && !slot.busy
                && !slot.suspended
                && slot.next_start.is_some_and(|t| t <= now)
                && deps_ready
            {
                slot.busy = true;
                slot.next_start = None;
                let runtime = self.runtime.clone();
                let name = slot.spec.name.clone();
                let dead = slot.dead.take();
                let span = info_span!("task", task = %name);
                jobs.spawn(
                    async move {
                        // A live instance (restarted for being unhealthy) may hold ports: it goes
                        // first. A dead one is removed after its replacement started, off the
                        // restart's critical path.
                        let (before, after) = match dead {
                            Some(d) if d.running => (Some(d), None),
                            d => (None, d),
                        };
                        if let Some(old) = &before {
                            remove_old(runtime.as_ref(), old).await;
                        }
                        let started = runtime.start(&name).await;
                        if let Some(old) = &after {
                            remove_old(runtime.as_ref(), old).await;
                        }
                        Job::Started(i, started)
                    }
                    .instrument(span),
                );
            }
            if let (Some(inst), Some(probe)) = (&slot.instance, &slot.spec.probe) {
                if !slot.probing && slot.next_probe.is_some_and(|t| t <= now) {
                    slot.probing = true;
                    slot.next_probe = None;
                    let prober = self.prober.clone();
                    let (probe, timeout) = (probe.clone(), slot.spec.timeout);
                    let (name, id) = (slot.spec.name.clone(), inst.id.clone());
                    let span = info_span!("task", task = %name);
                    jobs.spawn(
                        async move {
                            let t = Instant::now();
                            let result = prober.check(&name, &probe, timeout).await;
                            Job::Probed(i, id, t.elapsed(), result)
                        }
                        .instrument(span),
                    );
                }
            }
        }
    }

    /// Stops `instance` in a job (once: a stop already under way is not asked again).
    fn stop_in_job(&mut self, slot: Option<usize>, instance: Instance, jobs: &mut JoinSet<Job>) {
        if !self.stopping.insert(instance.id.clone()) {
            return;
        }
        let runtime = self.runtime.clone();
        jobs.spawn(async move {
            let result = runtime.stop(&instance).await;
            Job::Stopped {
                slot,
                id: instance.id,
                result,
            }
        });
    }

    fn publish(&self) {
        let status: Vec<TaskStatus> = self.slots.iter().map(Slot::status).collect();
        self.status.send_if_modified(|old| {
            let changed = *old != status;
            *old = status;
            changed
        });
    }
}

async fn remove_old(runtime: &dyn Runtime, old: &Instance) {
    if let Err(e) = runtime.stop(old).await {
        debug!(task = %old.task, id = %old.id, error = %format!("{e:#}"), "could not remove the old instance");
    }
}

async fn next_event(
    events: &mut Option<BoxStream<'static, anyhow::Result<RuntimeEvent>>>,
) -> Option<anyhow::Result<RuntimeEvent>> {
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
