//! Notify: owns what the service manager is told, derived from the [`NodeStatus`] at every
//! change (the board calls [`Notifier::observe`] synchronously, so no phase is skipped): the
//! status line, `READY=1` once (when every task is first healthy), start-timeout extensions
//! while the start-up waits on something outside, and watchdog pings only while the
//! supervision loop answers.

use super::{Board, NodeStatus};
use crate::supervisor::Liveness;
use crate::systemd::{Notice, ServiceManager};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Each extension asks for this much more start-up time; one is sent at every change while
/// waiting and at least every third of it.
pub const EXTEND_BY: Duration = Duration::from_secs(30);
/// Once the tasks run, waiting for them to turn healthy extends the start-up this long at
/// most; after that `TimeoutStartSec=` decides. (The boot's own waits are bounded by their
/// timeouts: `consul.discovery_timeout`, `ecs.agent_timeout`.)
pub const TASKS_EXTEND_AT_MOST: Duration = Duration::from_secs(600);

pub struct Notifier {
    manager: Arc<dyn ServiceManager>,
    state: Mutex<Sent>,
}

#[derive(Default)]
struct Sent {
    status: String,
    ready: bool,
    extended: Option<Instant>,
    supervising_since: Option<Instant>,
}

impl Notifier {
    pub fn new(manager: Arc<dyn ServiceManager>) -> Notifier {
        Notifier {
            manager,
            state: Mutex::default(),
        }
    }

    /// The status changed.
    pub fn observe(&self, status: &NodeStatus) {
        self.notify(status, false);
    }

    /// Until the agent is ready, re-sends the extension in time, also when nothing changes.
    pub async fn keep_extending(self: Arc<Self>, board: Board) {
        loop {
            tokio::time::sleep(EXTEND_BY / 3).await;
            if self.state.lock().unwrap_or_else(|p| p.into_inner()).ready {
                return;
            }
            self.notify(&board.snapshot(), true);
        }
    }

    fn notify(&self, status: &NodeStatus, tick: bool) {
        let mut sent = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if status.phase == "stopping" {
            return; // said by the caller, with STOPPING=1
        }
        if status.phase == "supervise" && sent.supervising_since.is_none() {
            sent.supervising_since = Some(Instant::now());
        }
        let text = status.summary();
        let changed = text != sent.status;
        let mut notices = Vec::new();
        if !sent.ready && status.healthy {
            sent.ready = true;
            notices.push(Notice::Ready);
            info!(status = %text, "ready: every task is healthy");
        } else if !sent.ready
            && waiting_outside(status, sent.supervising_since)
            && (changed || (tick && sent.extended.is_none_or(|t| t.elapsed() >= EXTEND_BY / 3)))
        {
            notices.push(Notice::ExtendTimeout(EXTEND_BY));
            sent.extended = Some(Instant::now());
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

/// Before readiness, the start-up is waiting on something outside nodeagent (IMDS, the Consul
/// servers, the ECS agent, tasks coming up) rather than failing: a task `unhealthy` or in
/// `crash-loop` is failing, and tasks get [`TASKS_EXTEND_AT_MOST`] to come up.
fn waiting_outside(status: &NodeStatus, supervising_since: Option<Instant>) -> bool {
    if status.phase != "supervise" {
        return true;
    }
    let failing = status
        .tasks
        .iter()
        .any(|t| t.state == "crash-loop" || t.state == "unhealthy");
    !failing && supervising_since.is_none_or(|t| t.elapsed() < TASKS_EXTEND_AT_MOST)
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

    fn task(state: &str) -> Task {
        Task {
            name: "linkerd".into(),
            state: state.into(),
            ..Task::default()
        }
    }

    #[test]
    fn every_phase_is_told_ready_once_and_failing_tasks_do_not_extend() {
        let recorder = Arc::new(Recorder::default());
        let notifier = Arc::new(Notifier::new(recorder.clone()));
        let observer = notifier.clone();
        let board = Board::new("c", "docker", Some(Arc::new(move |s| observer.observe(s))));
        for phase in ["join", "discover", "render"] {
            board.set_phase(phase);
        }
        board.update(|s| s.tasks = vec![task("starting")]);
        board.set_phase("supervise");
        board.update(|s| s.tasks = vec![task("crash-loop")]);
        board.update(|s| s.tasks = vec![task("healthy")]);
        board.update(|s| s.tasks = vec![task("unhealthy")]);
        let sent = recorder.0.lock().unwrap().clone();
        let status = |n: &Vec<Notice>| {
            n.iter().find_map(|x| match x {
                Notice::Status(s) => Some(s.clone()),
                _ => None,
            })
        };
        let texts: Vec<String> = sent.iter().filter_map(status).collect();
        assert_eq!(
            texts,
            [
                "reading instance metadata",
                "joining ECS cluster c",
                "finding the Consul servers and the ECS agent",
                "rendering config files",
                "0/1 tasks healthy; linkerd starting",
                "0/1 tasks healthy; linkerd crash-loop",
                "1/1 tasks healthy",
                "0/1 tasks healthy; linkerd unhealthy",
            ]
        );
        let extends = |i: usize| sent[i].contains(&Notice::ExtendTimeout(EXTEND_BY));
        assert!((0..5).all(extends), "waiting: {sent:?}");
        assert!(!extends(5), "crash-loop is failing, not waiting: {sent:?}");
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
}
