//! One task's place in the supervision loop: its spec, its current and dead instances, and the
//! counters the restart rules read (failures for the backoff, recent restarts for the
//! crash-loop window). Timers are `tokio::time::Instant`s, so the loop runs on a paused clock
//! in tests.

use super::{State, TaskSpec, TaskStatus};
use crate::config::Supervision;
use crate::retry::{exponential, jitter};
use crate::runtime::{Exit, Instance};
use std::collections::VecDeque;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::info;

pub(super) struct Slot {
    pub spec: TaskSpec,
    pub state: State,
    pub since: SystemTime,
    pub instance: Option<Instance>,
    /// The instance that died, removed before (a live one) or after (a dead one) the next
    /// start.
    pub dead: Option<Instance>,
    pub restarts: u64,
    /// When it was restarted, within the crash-loop window.
    pub recent: VecDeque<Instant>,
    /// Failures since it was last healthy long enough: the backoff's step.
    pub failures: u32,
    pub healthy_since: Option<Instant>,
    pub probe_failures: u32,
    pub last_probe: Option<String>,
    pub last_probe_took: Option<Duration>,
    pub last_exit: Option<Exit>,
    pub last_output: Option<String>,
    pub next_start: Option<Instant>,
    pub next_probe: Option<Instant>,
    /// A start is in flight.
    pub busy: bool,
    pub probing: bool,
    /// The current instance was found running, not started by this loop.
    pub adopted: bool,
    /// Stopped on request (a drain) and kept stopped: running instances are not adopted.
    pub held: bool,
    /// Never (re)started: set by a hold, a suspend, or `suspend_all`; running instances are
    /// still adopted (so a drain can stop them in order).
    pub suspended: bool,
    /// Who waits for the held task to be stopped.
    pub held_waiters: Vec<oneshot::Sender<anyhow::Result<()>>>,
}

impl Slot {
    pub fn new(spec: TaskSpec) -> Slot {
        Slot {
            spec,
            state: State::Starting,
            since: SystemTime::now(),
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
        }
    }

    pub fn set_state(&mut self, state: State) {
        if self.state != state {
            let name = &self.spec.name;
            info!(task = %name, from = ?self.state, to = ?state, "{name}: {} -> {}", self.state.as_str(), state.as_str());
            self.state = state;
            self.since = SystemTime::now();
        }
    }

    /// Its instance is gone or going: in `state` until a new one starts at `at`, and not
    /// probed (nor counted healthy) before.
    pub fn restart_at(&mut self, state: State, at: Instant) {
        self.set_state(state);
        self.healthy_since = None;
        self.next_probe = None;
        self.next_start = Some(at);
    }

    /// Whether its restarts within the crash-loop window (older ones are forgotten) reach the
    /// limit.
    pub fn crash_looping(&mut self, policy: &Supervision) -> bool {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now - *t > policy.crash_loop_window)
        {
            self.recent.pop_front();
        }
        self.recent.len() >= policy.crash_loop_restarts as usize
    }

    /// The state of a task that is up (running, or passing its check): `crash-loop` while its
    /// recent restarts are still over the limit, else `up`.
    pub fn up_state(&mut self, policy: &Supervision, up: State) -> State {
        if self.crash_looping(policy) {
            State::CrashLoop
        } else {
            up
        }
    }

    /// Answers everyone waiting for the hold.
    pub fn release_waiters(&mut self, result: &Result<(), String>) {
        for w in self.held_waiters.drain(..) {
            let _ = w.send(result.clone().map_err(|e| anyhow::anyhow!("{e}")));
        }
    }

    pub fn status(&self) -> TaskStatus {
        TaskStatus {
            name: self.spec.name.clone(),
            state: self.state,
            since: self.since,
            restarts: self.restarts,
            instance: self.instance.as_ref().map(|i| i.id.clone()),
            last_exit: self.last_exit.clone(),
            last_output: self.last_output.clone(),
            health: self.last_probe.clone(),
            health_latency: self.last_probe_took,
            adopted: self.adopted,
        }
    }
}

/// The delay before restart number `failures` (1-based) of a failing task: exponential from
/// `backoff_initial`, capped, jittered into [d/2, d].
pub(super) fn backoff(policy: &Supervision, failures: u32) -> Duration {
    let step = failures.saturating_sub(1);
    jitter(exponential(
        policy.backoff_initial,
        policy.backoff_max,
        step,
    ))
}
