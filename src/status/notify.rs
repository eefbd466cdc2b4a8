//! Notify: owns what the service manager is told, derived from the [`NodeStatus`] at every
//! change (the board calls [`Notifier::observe`] synchronously, so no phase is skipped): the
//! status line, `READY=1` once, start-timeout extensions until then, and watchdog pings only
//! while the supervision loop answers.
//!
//! Readiness comes when every task is first healthy, or at the latest
//! `supervision.ready_timeout` after supervision began: a node whose task keeps failing is
//! then ready as a *degraded* node (`STATUS=degraded: …` naming the failing tasks). It must
//! not stay "activating": systemd would kill it at `TimeoutStartSec=` over and over (resetting
//! its crash-loop counters, so self-healing never fires) and would skip `ExecStop` — the drain
//! — for a unit that never started. Until then every phase extends the start timeout, so the
//! boot's own waits (bounded by `consul.discovery_timeout`, `ecs.agent_timeout`) and the
//! ready timeout decide, not `TimeoutStartSec=`.

use super::{Board, NodeStatus, Phase};
use crate::supervisor::Liveness;
use crate::systemd::{Notice, ServiceManager};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// Each extension asks for this much more start-up time; one is sent at every change before
/// readiness and at least every third of it.
pub const EXTEND_BY: Duration = Duration::from_secs(30);

/// The status line of a node that is ready but not healthy starts with this.
pub const DEGRADED: &str = "degraded: ";

pub struct Notifier {
    manager: Arc<dyn ServiceManager>,
    state: Mutex<Sent>,
}

struct Sent {
    status: String,
    ready: bool,
    extended: Option<Instant>,
    supervising_since: Option<Instant>,
    ready_timeout: Duration,
}

impl Notifier {
    /// `ready_timeout`: `supervision.ready_timeout` (the boot may still change it, see
    /// [`Notifier::set_ready_timeout`]).
    pub fn new(manager: Arc<dyn ServiceManager>, ready_timeout: Duration) -> Notifier {
        Notifier {
            manager,
            state: Mutex::new(Sent {
                status: String::new(),
                ready: false,
                extended: None,
                supervising_since: None,
                ready_timeout,
            }),
        }
    }

    /// The final `supervision.ready_timeout` (instance layers may set it).
    pub fn set_ready_timeout(&self, ready_timeout: Duration) {
        self.sent().ready_timeout = ready_timeout;
    }

    /// The status changed.
    pub fn observe(&self, status: &NodeStatus) {
        self.notify(status, false);
    }

    /// Until the agent is ready: re-sends the extension in time, also when nothing changes,
    /// and declares a degraded node ready when its ready timeout is over.
    pub async fn keep_extending(self: Arc<Self>, board: Board) {
        loop {
            let wake = {
                let sent = self.sent();
                if sent.ready {
                    return;
                }
                let next = Instant::now() + EXTEND_BY / 3;
                match sent.supervising_since {
                    Some(t) => next.min(t + sent.ready_timeout),
                    None => next,
                }
            };
            tokio::time::sleep_until(wake).await;
            self.notify(&board.snapshot(), true);
        }
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, status: &NodeStatus, tick: bool) {
        let mut sent = self.sent();
        if status.phase == Phase::Stopping {
            return; // said by the caller, with STOPPING=1
        }
        let now = Instant::now();
        if status.phase == Phase::Supervise && sent.supervising_since.is_none() {
            sent.supervising_since = Some(now);
        }
        let mut notices = Vec::new();
        if !sent.ready {
            let timed_out = sent
                .supervising_since
                .is_some_and(|t| now >= t + sent.ready_timeout);
            if status.healthy {
                sent.ready = true;
                notices.push(Notice::Ready);
                info!(status = %status.summary(), "ready: every task is healthy");
            } else if timed_out {
                sent.ready = true;
                notices.push(Notice::Ready);
                warn!(status = %status.summary(), "ready as a degraded node: not every task is healthy {:?} after supervision began ({}); nodeagent keeps retrying them", sent.ready_timeout, status.summary());
            }
        }
        let text = match status.summary() {
            line if sent.ready && !status.healthy && status.phase == Phase::Supervise => {
                format!("{DEGRADED}{line}")
            }
            line => line,
        };
        let changed = text != sent.status;
        let extend_due = sent.extended.is_none_or(|t| now >= t + EXTEND_BY / 3);
        if !sent.ready && (changed || (tick && extend_due)) {
            notices.push(Notice::ExtendTimeout(EXTEND_BY));
            sent.extended = Some(now);
        }
        if changed {
            notices.push(Notice::Status(text.clone()));
            sent.status = text;
        }
        if !notices.is_empty() {
            self.manager.notify(&notices);
        }
    }
}

/// Pings the watchdog every `WATCHDOG_USEC / 2` while the supervision loop answers within
/// that time; a loop stuck in a call gets no pings, and systemd restarts the agent.
pub async fn watchdog(manager: Arc<dyn ServiceManager>, liveness: Liveness) {
    let Some(every) = manager.watchdog_every() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        tick.tick().await;
        if liveness
            .responsive(every.max(Duration::from_millis(2)) / 2)
            .await
        {
            if stuck {
                info!("the supervision loop answers again; watchdog pings resume");
                stuck = false;
            }
            manager.notify(&[Notice::Watchdog]);
        } else if !stuck {
            warn!("the supervision loop does not answer (a hung runtime call?); withholding watchdog pings");
            stuck = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Task;
    use crate::supervisor::State;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<Notice>>>);

    impl ServiceManager for Recorder {
        fn notify(&self, notices: &[Notice]) {
            self.0.lock().unwrap().push(notices.to_vec());
        }
        fn watchdog_every(&self) -> Option<Duration> {
            None
        }
    }

    fn task(state: State) -> Task {
        Task {
            name: "linkerd".into(),
            state,
            ..Task::default()
        }
    }

    fn notifier(ready_timeout: Duration) -> (Arc<Recorder>, Arc<Notifier>, Board) {
        let recorder = Arc::new(Recorder::default());
        let notifier = Arc::new(Notifier::new(recorder.clone(), ready_timeout));
        let observer = notifier.clone();
        let board = Board::new("c", "docker", Some(Arc::new(move |s| observer.observe(s))));
        (recorder, notifier, board)
    }

    fn texts(sent: &[Vec<Notice>]) -> Vec<String> {
        sent.iter()
            .flatten()
            .filter_map(|x| match x {
                Notice::Status(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn every_phase_is_told_and_ready_comes_once_every_task_is_healthy() {
        let (recorder, _notifier, board) = notifier(Duration::from_secs(120));
        for phase in [Phase::Join, Phase::Discover, Phase::Render] {
            board.set_phase(phase);
        }
        board.update(|s| s.tasks = vec![task(State::Starting)]);
        board.set_phase(Phase::Supervise);
        board.update(|s| s.tasks = vec![task(State::CrashLoop)]);
        board.update(|s| s.tasks = vec![task(State::Healthy)]);
        board.update(|s| s.tasks = vec![task(State::Unhealthy)]);
        let sent = recorder.0.lock().unwrap().clone();
        assert_eq!(
            texts(&sent),
            [
                "reading instance metadata",
                "joining ECS cluster c",
                "finding the Consul servers and the ECS agent",
                "rendering config files",
                "0/1 tasks healthy; linkerd starting",
                "0/1 tasks healthy; linkerd crash-loop",
                "1/1 tasks healthy",
                "degraded: 0/1 tasks healthy; linkerd unhealthy",
            ]
        );
        let extends = |i: usize| sent[i].contains(&Notice::ExtendTimeout(EXTEND_BY));
        assert!(
            (0..6).all(extends),
            "before READY every change extends: {sent:?}"
        );
        assert_eq!(sent[6][0], Notice::Ready);
        assert!(!extends(7), "after READY nothing extends");
        assert_eq!(
            sent.iter()
                .flatten()
                .filter(|n| **n == Notice::Ready)
                .count(),
            1
        );
    }

    /// A task that never turns healthy: the unit must not stay "activating" (systemd would
    /// kill and restart the agent at TimeoutStartSec for ever, and skip the drain at
    /// shutdown). READY=1 comes `ready_timeout` after supervision began, STATUS says
    /// degraded and names the task; until then the start timeout is extended.
    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_gets_healthy_is_ready_degraded_after_the_ready_timeout() {
        let (recorder, notifier, board) = notifier(Duration::from_secs(300));
        notifier.set_ready_timeout(Duration::from_secs(120));
        let extender = tokio::spawn(notifier.clone().keep_extending(board.clone()));
        board.set_phase(Phase::Discover);
        tokio::time::sleep(Duration::from_secs(200)).await; // a slow boot: extended throughout
        let boot = recorder.0.lock().unwrap().clone();
        let extensions = boot
            .iter()
            .filter(|n| n.contains(&Notice::ExtendTimeout(EXTEND_BY)))
            .count();
        assert!(
            extensions >= 20,
            "an extension at least every 10 s: {boot:?}"
        );

        board.update(|s| s.tasks = vec![task(State::CrashLoop)]);
        board.set_phase(Phase::Supervise);
        tokio::time::sleep(Duration::from_secs(119)).await;
        assert!(
            !recorder
                .0
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .any(|n| *n == Notice::Ready),
            "not before the ready timeout"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        extender.await.unwrap(); // done once ready
        let sent = recorder.0.lock().unwrap().clone();
        let ready = sent
            .iter()
            .position(|n| n.contains(&Notice::Ready))
            .unwrap();
        assert_eq!(
            texts(&sent[ready..]),
            ["degraded: 0/1 tasks healthy; linkerd crash-loop"]
        );
        assert!(
            sent[ready + 1..].is_empty(),
            "nothing more once ready: {:?}",
            &sent[ready..]
        );
        board.update(|s| s.tasks = vec![task(State::Healthy)]);
        assert_eq!(
            texts(&recorder.0.lock().unwrap()).last().unwrap(),
            "1/1 tasks healthy"
        );
    }
}
