//! How the loop reacts: to a job done (a start, a probe, a stop, a task's output), to an
//! instance that ended, to a request to hold, suspend, restart or signal a task.

use super::slot::backoff;
use super::{Job, State, Supervisor, Until, FIRST_PROBES};
use crate::runtime::{Exit, Instance};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

impl Supervisor {
    pub(super) fn on_job(&mut self, job: Job, jobs: &mut JoinSet<Job>) {
        match job {
            Job::Started(i, Ok(instance)) if self.slots[i].held => {
                // Held while it was starting: what started goes at once.
                self.slots[i].busy = false;
                let runtime = self.runtime.clone();
                jobs.spawn(async move { Job::Held(i, runtime.stop(&instance).await) });
            }
            Job::Started(i, Err(_)) if self.slots[i].held => {
                self.slots[i].busy = false;
                self.slots[i].release_waiters(&Ok(()));
            }
            Job::Signalled(result, done) => {
                let _ = done.send(result);
            }
            Job::Held(i, result) => {
                let slot = &mut self.slots[i];
                let name = &slot.spec.name;
                match &result {
                    Ok(()) => info!(task = %name, "{name}: stopped and held"),
                    Err(e) => warn!(task = %name, "{name}: could not stop the held task: {e:#}"),
                }
                slot.release_waiters(&result.map_err(|e| format!("{e:#}")));
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
                let slot = &mut self.slots[i];
                slot.busy = false;
                let delay = backoff(&self.policy, slot.failures.max(1));
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
            Job::Stopped { slot, id, result } => {
                self.stopping.remove(&id);
                let task = slot.map_or("(not configured)", |i| self.slots[i].spec.name.as_str());
                match result {
                    Ok(()) => debug!(task, %id, "stopped"),
                    Err(e) => warn!(task, %id, "{task}: could not stop {id}: {e:#}"),
                }
            }
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
        let policy = self.policy.clone();
        let slot = &mut self.slots[i];
        let spec = slot.spec.clone();
        match result {
            Ok(()) => {
                slot.probe_failures = 0;
                slot.last_probe = Some("ok".into());
                if slot.healthy_since.is_none() {
                    slot.healthy_since = Some(Instant::now());
                }
                let state = slot.up_state(&policy, State::Healthy);
                slot.set_state(state);
                slot.next_probe = Some(Instant::now() + spec.interval);
            }
            Err(why) => {
                slot.probe_failures += 1;
                slot.last_probe = Some(why.clone());
                let failing = slot.probe_failures >= spec.unhealthy_threshold;
                if slot.state == State::Healthy && failing {
                    slot.set_state(State::Unhealthy);
                    slot.healthy_since = None;
                    warn!(task = %spec.name, check = %why, "{}: unhealthy: {why}", spec.name);
                } else {
                    debug!(task = %spec.name, check = %why, "{}: health check failed", spec.name);
                }
                let every = if matches!(slot.state, State::Healthy | State::Unhealthy) {
                    spec.interval
                } else {
                    spec.interval.min(FIRST_PROBES)
                };
                slot.next_probe = Some(Instant::now() + every);
                if failing && spec.restart_when_unhealthy {
                    if let Some(inst) = slot.instance.clone() {
                        warn!(task = %spec.name, "{}: restarting the unhealthy task", spec.name);
                        let exit = Exit {
                            code: None,
                            reason: format!("unhealthy: {why}"),
                        };
                        self.on_exited(&inst.id, exit, true, jobs);
                    }
                }
            }
        }
    }

    /// Stops `task` (if it runs) and keeps it stopped; `done` hears when it is.
    pub(super) fn hold(
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
            info!(task = %task, "{task}: suspended: it will not be restarted");
            let _ = done.send(Ok(()));
            return;
        }
        slot.held = true;
        slot.next_probe = None;
        slot.healthy_since = None;
        slot.set_state(State::Stopped);
        slot.held_waiters.push(done);
        let dead = slot.dead.take();
        let current = slot.instance.take();
        let starting = slot.busy;
        if let Some(dead) = dead {
            self.stop_in_job(Some(i), dead, jobs);
        }
        match current {
            Some(instance) => {
                info!(task = %task, id = %instance.id, "{task}: stopping, and holding it stopped");
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
            None if starting => {}
            None => self.slots[i].release_waiters(&Ok(())),
        }
    }

    /// Makes `instance` the slot's current one.
    pub(super) fn adopt(&mut self, i: usize, instance: Instance) {
        let policy = self.policy.clone();
        let slot = &mut self.slots[i];
        slot.instance = Some(instance);
        slot.adopted = false;
        slot.probe_failures = 0;
        if slot.spec.probe.is_some() {
            let state = slot.up_state(&policy, State::Starting);
            slot.set_state(state);
            slot.next_probe = Some(Instant::now());
        } else {
            let state = slot.up_state(&policy, State::Healthy);
            slot.set_state(state);
            slot.healthy_since = Some(Instant::now());
        }
    }

    /// The task's instance `id` ended (`still_running`: is being replaced while it runs).
    pub(super) fn on_exited(
        &mut self,
        id: &str,
        exit: Exit,
        still_running: bool,
        jobs: &mut JoinSet<Job>,
    ) {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.instance.as_ref().is_some_and(|x| x.id == id))
        else {
            // Perhaps the instance a start in flight is about to report.
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
            slot.set_state(State::Stopped);
            slot.last_exit = Some(exit);
            slot.next_probe = None;
            slot.dead = Some(dead);
            return;
        }
        let healthy_long = slot
            .healthy_since
            .is_some_and(|t| now - t >= policy.backoff_reset_after);
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
        let crash_loop = slot.crash_looping(&policy);
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
        let name = slot.spec.name.clone();
        let last = exit
            .code
            .map_or(exit.reason.clone(), |c| format!("exit code {c}"));
        if entering {
            warn!(
                task = %name,
                restarts = slot.recent.len(),
                window = ?policy.crash_loop_window,
                code = ?exit.code,
                "{name}: crash-loop: {} restarts within {:?}, last {last}; retrying at most every {:?}",
                slot.recent.len(),
                policy.crash_loop_window,
                policy.backoff_max
            );
        } else {
            let code = exit
                .code
                .map(|c| format!(" with code {c}"))
                .unwrap_or_default();
            warn!(task = %name, code = ?exit.code, reason = %exit.reason, restart_in = ?delay, "{name}: {}{code}; restarting in {delay:?}", exit.reason);
        }
        let state = if crash_loop {
            State::CrashLoop
        } else {
            State::Restarting
        };
        slot.restart_at(state, now + delay);
        slot.last_exit = Some(exit);
        slot.dead = Some(dead);
        self.restart_dependents(&name, jobs);
    }

    /// Dependents that asked for it go down with their dependency and come back after it.
    fn restart_dependents(&mut self, name: &str, jobs: &mut JoinSet<Job>) {
        let now = Instant::now();
        for j in 0..self.slots.len() {
            let dependent = &mut self.slots[j];
            if !(dependent.spec.restart_with_dependencies
                && dependent.spec.depends_on.iter().any(|d| d == name))
            {
                continue;
            }
            if let Some(inst) = dependent.instance.take() {
                info!(task = %dependent.spec.name, dependency = %name, "{}: restarting with its dependency", dependent.spec.name);
                dependent.restart_at(State::Restarting, now);
                self.stop_in_job(Some(j), inst, jobs);
            }
        }
    }

    /// Replaces `task`'s running instance now, outside the failure counters (its files
    /// changed); `done` hears once the replacement is scheduled.
    pub(super) fn restart_now(
        &mut self,
        task: &str,
        why: &str,
        done: oneshot::Sender<anyhow::Result<()>>,
        jobs: &mut JoinSet<Job>,
    ) {
        let Some(i) = self.slots.iter().position(|s| s.spec.name == task) else {
            let _ = done.send(Err(anyhow::anyhow!("no task {task} is supervised")));
            return;
        };
        let slot = &mut self.slots[i];
        if slot.suspended {
            let _ = done.send(Err(anyhow::anyhow!("{task} is held stopped (a drain)")));
            return;
        }
        let Some(mut old) = slot.instance.take() else {
            // Not running: its next start reads the new files.
            let _ = done.send(Ok(()));
            return;
        };
        info!(task = %task, id = %old.id, "{task}: restarting: {why}");
        old.running = true;
        slot.restarts += 1;
        slot.restart_at(State::Restarting, Instant::now());
        slot.last_exit = Some(Exit {
            code: None,
            reason: why.to_string(),
        });
        if let Some(dead) = slot.dead.replace(old) {
            self.stop_in_job(Some(i), dead, jobs);
        }
        self.restart_dependents(task, jobs);
        let _ = done.send(Ok(()));
    }

    /// Sends `signal` to `task`'s running instance, in a job.
    pub(super) fn signal(
        &mut self,
        task: &str,
        signal: &str,
        done: oneshot::Sender<anyhow::Result<()>>,
        jobs: &mut JoinSet<Job>,
    ) {
        let instance = self
            .slots
            .iter()
            .find(|s| s.spec.name == task)
            .and_then(|s| s.instance.clone());
        let Some(instance) = instance else {
            let _ = done.send(Err(anyhow::anyhow!(
                "{task} has no running instance to signal"
            )));
            return;
        };
        info!(task = %task, id = %instance.id, "{task}: sending {signal}");
        let (runtime, signal) = (self.runtime.clone(), signal.to_string());
        jobs.spawn(async move { Job::Signalled(runtime.signal(&instance, &signal).await, done) });
    }
}
