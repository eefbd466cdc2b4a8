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

pub mod health;

use crate::config::Supervision;
use crate::retry::{exponential, jitter};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use health::Probe;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

/// While a task is not yet healthy it is probed this often (at most its interval).
const FIRST_PROBES: Duration = Duration::from_millis(250);
/// Reconnection to a runtime whose event stream broke backs off from/to these.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// One running (or finished) instance of a task: a container, an ECS task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub task: String,
    pub id: String,
    pub running: bool,
    pub exit: Option<Exit>,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exit {
    pub code: Option<i64>,
    pub reason: String,
}

/// Something the runtime noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The instance stopped (died, was killed, was removed).
    Exited { id: String, exit: Exit },
}

/// What runs the tasks (docker, ECS).
#[async_trait]
pub trait Runtime: Send + Sync {
    /// Every instance of our tasks, running or not, including tasks no longer configured.
    async fn instances(&self) -> anyhow::Result<Vec<Instance>>;
    async fn start(&self, task: &str) -> anyhow::Result<Instance>;
    /// Stops the instance (if running) and removes what is left of it.
    async fn stop(&self, instance: &Instance) -> anyhow::Result<()>;
    /// The last lines the instance wrote.
    async fn output_tail(&self, instance: &Instance, lines: usize) -> anyhow::Result<String>;
    /// Waits (at most `limit`) until a stopped instance has really stopped — for a runtime
    /// whose `stop` only asks (ECS `StopTask`).
    async fn wait_stopped(&self, _instance: &Instance, _limit: Duration) -> anyhow::Result<()> {
        Ok(())
    }
    /// Events from now on; the stream ends or errs when the runtime goes away.
    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
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

struct Slot {
    spec: TaskSpec,
    state: State,
    since: SystemTime,
    instance: Option<Instance>,
    /// The instance that died, removed before the next start.
    dead: Option<Instance>,
    restarts: u64,
    recent: VecDeque<Instant>,
    failures: u32,
    healthy_since: Option<Instant>,
    probe_failures: u32,
    last_probe: Option<String>,
    last_probe_took: Option<Duration>,
    last_exit: Option<Exit>,
    last_output: Option<String>,
    next_start: Option<Instant>,
    next_probe: Option<Instant>,
    busy: bool,
    probing: bool,
    adopted: bool,
    /// Stopped on request (a drain) and kept stopped: running instances are not adopted.
    held: bool,
    /// Never (re)started: set by a hold, a suspend, or `suspend_all`; running instances are
    /// still adopted (so a drain can stop them in order).
    suspended: bool,
    /// Who waits for the held task to be stopped.
    held_waiters: Vec<oneshot::Sender<anyhow::Result<()>>>,
}

enum Job {
    Started(usize, anyhow::Result<Instance>),
    Probed(usize, String, Duration, Result<(), String>),
    Stopped(usize, String),
    /// The output of the instance that ended; `log`: write it to the log too (the task just
    /// entered crash-loop).
    Output {
        slot: usize,
        text: anyhow::Result<String>,
        log: bool,
    },
    /// A held task's instance was stopped.
    Held(usize, anyhow::Result<()>),
}

/// A request to the loop: suspend (no restart from now on; the instance is left as it is) or
/// hold (suspend, and stop the instance), answered when done.
type HoldRequest = (String, bool, oneshot::Sender<anyhow::Result<()>>);

/// Asks the loop to stop a task and keep it stopped (a drain stops the tasks one by one, in
/// reverse start order, around Consul's leave).
#[derive(Clone)]
pub struct Control(mpsc::Sender<HoldRequest>);

impl Control {
    /// Stops `task` and keeps it stopped; returns once it has stopped.
    pub async fn hold(&self, task: &str) -> anyhow::Result<()> {
        self.ask(task, true).await
    }

    /// Restarts `task` no more, whatever happens to it, and leaves it running (before asking
    /// it to exit by itself, as Consul's leave does).
    pub async fn suspend(&self, task: &str) -> anyhow::Result<()> {
        self.ask(task, false).await
    }

    async fn ask(&self, task: &str, stop: bool) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((task.to_string(), stop, tx))
            .await
            .map_err(|_| anyhow::anyhow!("the supervision loop has ended"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the supervision loop has ended"))?
    }
}

pub struct Supervisor {
    runtime: Arc<dyn Runtime>,
    policy: Supervision,
    slots: Vec<Slot>,
    http: reqwest::Client,
    status: watch::Sender<Vec<TaskStatus>>,
    /// Exits seen for ids no slot holds yet (a start still in flight).
    unclaimed_exits: HashMap<String, Exit>,
    /// Under `Until::AllStarted`, a start that failed ends the run with this error.
    fatal: Option<anyhow::Error>,
    until: Until,
    /// Liveness questions ([`Liveness`]), answered by the loop itself.
    pings: mpsc::Receiver<oneshot::Sender<()>>,
    ping_sender: mpsc::Sender<oneshot::Sender<()>>,
    holds: mpsc::Receiver<HoldRequest>,
    hold_sender: mpsc::Sender<HoldRequest>,
}

/// Asks the supervision loop whether it is turning: the loop answers between two of its steps,
/// so a loop stuck in a call (a hung engine) does not answer. Feeds the systemd watchdog.
#[derive(Clone)]
pub struct Liveness(mpsc::Sender<oneshot::Sender<()>>);

impl Liveness {
    /// Whether the loop answered within `within`.
    pub async fn responsive(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let asked = async { self.0.send(tx).await.is_ok() && rx.await.is_ok() };
        tokio::time::timeout(within, asked).await.unwrap_or(false)
    }
}

impl Supervisor {
    pub fn new(runtime: Arc<dyn Runtime>, policy: Supervision, tasks: Vec<TaskSpec>) -> Self {
        let now = SystemTime::now();
        let slots = tasks
            .into_iter()
            .map(|spec| Slot {
                spec,
                state: State::Starting,
                since: now,
                instance: None,
                dead: None,
                restarts: 0,
                recent: VecDeque::new(),
                failures: 0,
                healthy_since: None,
                probe_failures: 0,
                last_probe: None,
                last_probe_took: None,
                last_exit: None,
                last_output: None,
                next_start: Some(Instant::now()),
                next_probe: None,
                busy: false,
                probing: false,
                adopted: false,
                held: false,
                suspended: false,
                held_waiters: Vec::new(),
            })
            .collect();
        let (status, _) = watch::channel(Vec::new());
        let (ping_sender, pings) = mpsc::channel(1);
        let (hold_sender, holds) = mpsc::channel(8);
        let supervisor = Supervisor {
            runtime,
            policy,
            slots,
            http: health::client(),
            status,
            unclaimed_exits: HashMap::new(),
            fatal: None,
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
            Err(e) => {
                warn!("runtime events unavailable ({e:#}); will retry")
            }
        }
        self.reconcile(&mut jobs).await;
        let mut next_reconcile = Instant::now() + jitter(self.policy.reconcile_interval);
        loop {
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            self.schedule(&mut jobs);
            self.publish();
            if until == Until::AllStarted && self.slots.iter().all(|s| s.instance.is_some()) {
                return Ok(());
            }
            let wake = self
                .slots
                .iter()
                .flat_map(|s| [s.next_start, s.next_probe])
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
                Some((task, stop, done)) = self.holds.recv() => self.hold(&task, stop, done, &mut jobs),
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
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if events.is_none() && now >= reconnect_at {
                match self.runtime.events().await {
                    Ok(stream) => {
                        info!("runtime events reconnected; reconciling");
                        events = Some(stream);
                        reconnect_delay = RECONNECT.0;
                        self.reconcile(&mut jobs).await;
                        next_reconcile = Instant::now() + jitter(self.policy.reconcile_interval);
                    }
                    Err(e) => {
                        debug!(error = %format!("{e:#}"), "runtime still unavailable");
                        reconnect_at = now + jitter(reconnect_delay);
                        reconnect_delay = (reconnect_delay * 2).min(RECONNECT.1);
                    }
                }
            }
            if now >= next_reconcile {
                self.reconcile(&mut jobs).await;
                next_reconcile = Instant::now() + jitter(self.policy.reconcile_interval);
            }
        }
    }

    /// Starts what is due and whose dependencies are healthy; probes what is due.
    fn schedule(&mut self, jobs: &mut JoinSet<Job>) {
        let now = Instant::now();
        let healthy: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.state == State::Healthy)
            .map(|s| s.spec.name.clone())
            .collect();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let deps_ready = slot.spec.depends_on.iter().all(|d| healthy.contains(d));
            if slot.instance.is_none()
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
                    let http = self.http.clone();
                    let probe = probe.clone();
                    let timeout = slot.spec.timeout;
                    let id = inst.id.clone();
                    let span = info_span!("task", task = %slot.spec.name);
                    jobs.spawn(
                        async move {
                            let t = Instant::now();
                            let result = health::check(&http, &probe, timeout).await;
                            Job::Probed(i, id, t.elapsed(), result)
                        }
                        .instrument(span),
                    );
                }
            }
        }
    }

    fn on_job(&mut self, job: Job, jobs: &mut JoinSet<Job>) {
        match job {
            Job::Started(i, Ok(instance)) if self.slots[i].held => {
                // Held while it was starting: what started goes at once.
                self.slots[i].busy = false;
                let runtime = self.runtime.clone();
                jobs.spawn(async move { Job::Held(i, runtime.stop(&instance).await) });
            }
            Job::Started(i, Err(_)) if self.slots[i].held => {
                self.slots[i].busy = false;
                for w in self.slots[i].held_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Job::Held(i, result) => {
                let slot = &mut self.slots[i];
                match &result {
                    Ok(()) => info!(task = %slot.spec.name, "{}: stopped and held", slot.spec.name),
                    Err(e) => {
                        warn!(task = %slot.spec.name, "{}: could not stop the held task: {e:#}", slot.spec.name)
                    }
                }
                let error = result.err().map(|e| format!("{e:#}"));
                for w in slot.held_waiters.drain(..) {
                    let _ = w.send(match &error {
                        None => Ok(()),
                        Some(e) => Err(anyhow::anyhow!("{e}")),
                    });
                }
            }
            Job::Started(i, Ok(instance)) => {
                let slot = &mut self.slots[i];
                slot.busy = false;
                info!(task = %slot.spec.name, id = %instance.id, "{}: started {}", slot.spec.name, instance.id);
                let id = instance.id.clone();
                self.adopt(i, instance);
                if let Some(exit) = self.unclaimed_exits.remove(&id) {
                    self.on_exited(&id, exit, false, jobs);
                }
                if !self.slots.iter().any(|s| s.busy) {
                    self.unclaimed_exits.clear(); // nothing in flight can claim them any more
                }
            }
            Job::Started(i, Err(e)) if self.until == Until::AllStarted => {
                self.fatal = Some(e.context(format!("starting task {}", self.slots[i].spec.name)));
            }
            Job::Started(i, Err(e)) => {
                let policy = self.policy.clone();
                let slot = &mut self.slots[i];
                slot.busy = false;
                let delay = backoff(&policy, slot.failures.max(1));
                slot.failures += 1;
                slot.next_start = Some(Instant::now() + delay);
                warn!(task = %slot.spec.name, retry_in = ?delay, "{}: could not start the task ({e:#}); retrying in {delay:?}", slot.spec.name);
            }
            Job::Probed(i, id, took, result) => {
                let slot = &mut self.slots[i];
                slot.probing = false;
                if slot.instance.as_ref().map(|x| &x.id) != Some(&id) {
                    return; // a probe of an instance that has since been replaced
                }
                slot.last_probe_took = Some(took);
                self.on_probe(i, result, jobs);
            }
            Job::Stopped(i, id) => debug!(task = %self.slots[i].spec.name, %id, "done"),
            Job::Output { slot, text, log } => {
                let slot = &mut self.slots[slot];
                let name = &slot.spec.name;
                match text {
                    Ok(tail) => {
                        if log {
                            warn!(task = %name, "{name}: last output of the crash-looping task:\n{tail}");
                        }
                        slot.last_output = Some(tail);
                    }
                    Err(e) if log => {
                        warn!(task = %name, "{name}: cannot read the crash-looping task's output: {e:#}")
                    }
                    Err(e) => {
                        debug!(task = %name, "cannot read the output of the instance that ended: {e:#}")
                    }
                }
            }
        }
    }

    fn on_probe(&mut self, i: usize, result: Result<(), String>, jobs: &mut JoinSet<Job>) {
        let slot = &mut self.slots[i];
        let spec = slot.spec.clone();
        match result {
            Ok(()) => {
                slot.probe_failures = 0;
                slot.last_probe = Some("ok".into());
                if slot.healthy_since.is_none() {
                    slot.healthy_since = Some(Instant::now());
                }
                let state = up_state(slot, &self.policy, State::Healthy);
                set_state(slot, state);
                slot.next_probe = Some(Instant::now() + spec.interval);
            }
            Err(why) => {
                slot.probe_failures += 1;
                slot.last_probe = Some(why.clone());
                let failing = slot.probe_failures >= spec.unhealthy_threshold;
                if slot.state == State::Healthy && failing {
                    set_state(slot, State::Unhealthy);
                    slot.healthy_since = None;
                    warn!(task = %spec.name, check = %why, "{}: unhealthy: {why}", spec.name);
                } else {
                    debug!(task = %spec.name, check = %why, "{}: health check failed", spec.name);
                }
                let every = if slot.state == State::Healthy || slot.state == State::Unhealthy {
                    spec.interval
                } else {
                    spec.interval.min(FIRST_PROBES)
                };
                slot.next_probe = Some(Instant::now() + every);
                if failing && spec.restart_when_unhealthy {
                    if let Some(inst) = slot.instance.clone() {
                        warn!(task = %spec.name, "{}: restarting the unhealthy task", spec.name);
                        let id = inst.id.clone();
                        self.on_exited(
                            &id,
                            Exit {
                                code: None,
                                reason: format!("unhealthy: {why}"),
                            },
                            true,
                            jobs,
                        );
                    }
                }
            }
        }
    }

    /// Stops `task` (if it runs) and keeps it stopped; `done` hears when it is.
    fn hold(
        &mut self,
        task: &str,
        stop: bool,
        done: oneshot::Sender<anyhow::Result<()>>,
        jobs: &mut JoinSet<Job>,
    ) {
        let Some(i) = self.slots.iter().position(|s| s.spec.name == task) else {
            let _ = done.send(Err(anyhow::anyhow!("no task {task} is supervised")));
            return;
        };
        let grace = self.policy.stop_grace;
        let slot = &mut self.slots[i];
        slot.suspended = true;
        slot.next_start = None;
        if !stop {
            info!(task = %task, "{}: suspended: it will not be restarted", task);
            let _ = done.send(Ok(()));
            return;
        }
        slot.held = true;
        slot.next_probe = None;
        slot.healthy_since = None;
        set_state(slot, State::Stopped);
        slot.held_waiters.push(done);
        if let Some(dead) = slot.dead.take() {
            let runtime = self.runtime.clone();
            jobs.spawn(async move {
                let _ = runtime.stop(&dead).await;
                Job::Stopped(i, dead.id)
            });
        }
        match slot.instance.take() {
            Some(instance) => {
                info!(task = %task, id = %instance.id, "{}: stopping, and holding it stopped", task);
                let runtime = self.runtime.clone();
                // ECS stops a task in its own time (its stop timeout, 30 s by default).
                let limit = grace * 2 + Duration::from_secs(30);
                jobs.spawn(async move {
                    let stopped = match runtime.stop(&instance).await {
                        Ok(()) => runtime.wait_stopped(&instance, limit).await,
                        Err(e) => Err(e),
                    };
                    Job::Held(i, stopped)
                });
            }
            // A start in flight is stopped when it lands (`on_job`).
            None if slot.busy => {}
            None => {
                for w in slot.held_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
        }
    }

    /// Makes `instance` the slot's current one.
    fn adopt(&mut self, i: usize, instance: Instance) {
        let slot = &mut self.slots[i];
        slot.instance = Some(instance);
        slot.adopted = false;
        slot.probe_failures = 0;
        if slot.spec.probe.is_some() {
            let state = up_state(slot, &self.policy, State::Starting);
            set_state(slot, state);
            slot.next_probe = Some(Instant::now());
        } else {
            let state = up_state(slot, &self.policy, State::Healthy);
            set_state(slot, state);
            slot.healthy_since = Some(Instant::now());
        }
    }

    /// The task's instance `id` ended (`still_running`: is being replaced while it runs).
    fn on_exited(&mut self, id: &str, exit: Exit, still_running: bool, jobs: &mut JoinSet<Job>) {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.instance.as_ref().is_some_and(|x| x.id == id))
        else {
            if self.slots.iter().any(|s| s.busy) {
                self.unclaimed_exits.insert(id.to_string(), exit);
            }
            return;
        };
        let policy = self.policy.clone();
        let now = Instant::now();
        let slot = &mut self.slots[i];
        let mut dead = slot.instance.take().expect("matched above");
        dead.running = still_running;
        if slot.suspended {
            // Suspended (a drain): it ended as asked; it is removed when it is held.
            info!(task = %slot.spec.name, code = ?exit.code, "{}: exited, and stays stopped", slot.spec.name);
            set_state(slot, State::Stopped);
            slot.last_exit = Some(exit);
            slot.next_probe = None;
            slot.dead = Some(dead);
            return;
        }
        let healthy_long = slot
            .healthy_since
            .is_some_and(|t| t.elapsed() >= policy.backoff_reset_after);
        if healthy_long {
            slot.failures = 0;
        }
        let delay = if slot.failures == 0 {
            Duration::ZERO
        } else {
            backoff(&policy, slot.failures)
        };
        slot.failures += 1;
        slot.restarts += 1;
        slot.recent.push_back(now);
        let crash_loop = crash_looping(slot, &policy);
        let entering = crash_loop && slot.state != State::CrashLoop;
        // What it wrote last, for `nodeagent status` (and the log when it starts looping);
        // read now, before the dead instance is removed.
        let runtime = self.runtime.clone();
        let (lines, tail_of) = (policy.log_lines, dead.clone());
        jobs.spawn(async move {
            Job::Output {
                slot: i,
                text: runtime.output_tail(&tail_of, lines).await,
                log: entering,
            }
        });
        if entering {
            warn!(
                task = %slot.spec.name,
                restarts = slot.recent.len(),
                window = ?policy.crash_loop_window,
                code = ?exit.code,
                "{}: crash-loop: {} restarts within {:?}, last {}; retrying at most every {:?}",
                slot.spec.name,
                slot.recent.len(),
                policy.crash_loop_window,
                exit.code.map_or(exit.reason.clone(), |c| format!("exit code {c}")),
                policy.backoff_max
            );
        } else {
            let code = exit
                .code
                .map(|c| format!(" with code {c}"))
                .unwrap_or_default();
            warn!(task = %slot.spec.name, code = ?exit.code, reason = %exit.reason, restart_in = ?delay, "{}: {}{code}; restarting in {delay:?}", slot.spec.name, exit.reason);
        }
        set_state(
            slot,
            if crash_loop {
                State::CrashLoop
            } else {
                State::Restarting
            },
        );
        slot.last_exit = Some(exit);
        slot.healthy_since = None;
        slot.next_probe = None;
        slot.next_start = Some(now + delay);
        slot.dead = Some(dead);
        let name = slot.spec.name.clone();
        // Dependents that asked for it go down with their dependency and come back after it.
        for j in 0..self.slots.len() {
            let dependent = &mut self.slots[j];
            if dependent.spec.restart_with_dependencies && dependent.spec.depends_on.contains(&name)
            {
                if let Some(inst) = dependent.instance.take() {
                    info!(task = %dependent.spec.name, dependency = %name, "{}: restarting with its dependency", dependent.spec.name);
                    set_state(dependent, State::Restarting);
                    dependent.healthy_since = None;
                    dependent.next_probe = None;
                    dependent.next_start = Some(now);
                    let runtime = self.runtime.clone();
                    jobs.spawn(async move {
                        let _ = runtime.stop(&inst).await;
                        Job::Stopped(j, inst.id)
                    });
                }
            }
        }
    }

    /// Compares what the runtime has with what should run: adopts, reaps, notices the dead.
    async fn reconcile(&mut self, jobs: &mut JoinSet<Job>) {
        let instances = match self.runtime.instances().await {
            Ok(list) => list,
            Err(e) => {
                warn!("cannot list the tasks' instances ({e:#}); will retry");
                return;
            }
        };
        let mut seen: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for inst in instances {
            seen.entry(inst.task.clone()).or_default().push(inst);
        }
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.state == State::CrashLoop
                && slot.instance.is_some()
                && slot.healthy_since.is_some()
            {
                // Out of the crash loop once its restarts have aged out of the window.
                let state = up_state(slot, &self.policy, State::Healthy);
                set_state(slot, state);
            }
            let name = self.slots[i].spec.name.clone();
            let mine = seen.remove(&name).unwrap_or_default();
            if self.slots[i].busy {
                continue; // a start is in flight: what it creates is not a stranger
            }
            let current = self.slots[i].instance.as_ref().map(|x| x.id.clone());
            // The current instance vanished or stopped without an event.
            if let Some(id) = &current {
                match mine.iter().find(|x| &x.id == id) {
                    Some(x) if x.running => {}
                    Some(x) => {
                        let exit = x.exit.clone().unwrap_or(Exit {
                            code: None,
                            reason: "exited".into(),
                        });
                        self.on_exited(id, exit, false, jobs);
                    }
                    None => self.on_exited(
                        id,
                        Exit {
                            code: None,
                            reason: "gone".into(),
                        },
                        false,
                        jobs,
                    ),
                }
            }
            for inst in mine {
                let is_current = Some(&inst.id) == current.as_ref();
                let slot = &mut self.slots[i];
                if is_current || slot.dead.as_ref().is_some_and(|d| d.id == inst.id) {
                    continue;
                }
                if inst.running && slot.instance.is_none() && slot.dead.is_none() && !slot.held {
                    info!(task = %name, id = %inst.id, "{}: adopted running instance", name);
                    self.adopt(i, inst);
                    self.slots[i].adopted = true;
                } else {
                    if inst.running {
                        warn!(task = %name, id = %inst.id, "{}: stopping a duplicate instance", name);
                    }
                    let runtime = self.runtime.clone();
                    jobs.spawn(async move {
                        let _ = runtime.stop(&inst).await;
                        Job::Stopped(i, inst.id)
                    });
                }
            }
        }
        for (task, strays) in seen {
            for inst in strays {
                warn!(task = %task, id = %inst.id, "{}: stopping and removing an instance of a task that is not in the configuration", task);
                let runtime = self.runtime.clone();
                let _ = runtime.stop(&inst).await;
            }
        }
    }

    fn publish(&self) {
        let status = self
            .slots
            .iter()
            .map(|s| TaskStatus {
                name: s.spec.name.clone(),
                state: s.state,
                since: s.since,
                restarts: s.restarts,
                instance: s.instance.as_ref().map(|i| i.id.clone()),
                last_exit: s.last_exit.clone(),
                last_output: s.last_output.clone(),
                health: s.last_probe.clone(),
                health_latency: s.last_probe_took,
                adopted: s.adopted,
            })
            .collect();
        self.status.send_if_modified(|old| {
            let changed = *old != status;
            *old = status;
            changed
        });
    }
}

/// The state of a task that is up (running, or passing its check): `crash-loop` while its
/// recent restarts are still over the limit, else `up`.
fn up_state(slot: &mut Slot, policy: &Supervision, up: State) -> State {
    if crash_looping(slot, policy) {
        State::CrashLoop
    } else {
        up
    }
}

/// Whether the slot's restarts within the crash-loop window (older ones are forgotten) reach
/// the limit.
fn crash_looping(slot: &mut Slot, policy: &Supervision) -> bool {
    let now = Instant::now();
    while slot
        .recent
        .front()
        .is_some_and(|t| now - *t > policy.crash_loop_window)
    {
        slot.recent.pop_front();
    }
    slot.recent.len() >= policy.crash_loop_restarts as usize
}

fn set_state(slot: &mut Slot, state: State) {
    if slot.state != state {
        info!(task = %slot.spec.name, from = ?slot.state, to = ?state, "{}: {} -> {}", slot.spec.name, slot.state.as_str(), state.as_str());
        slot.state = state;
        slot.since = SystemTime::now();
    }
}

/// The delay before restart number `failures` (1-based) of a failing task: exponential from
/// `backoff_initial`, capped, jittered into [d/2, d].
fn backoff(policy: &Supervision, failures: u32) -> Duration {
    let step = failures.saturating_sub(1);
    jitter(exponential(
        policy.backoff_initial,
        policy.backoff_max,
        step,
    ))
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
