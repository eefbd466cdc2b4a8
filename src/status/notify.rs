//! Notify: owns what the service manager is told, derived from the [`NodeStatus`]: the status
//! line at every change, `READY=1` once (when every task is first healthy), start-timeout
//! extensions while the boot waits on something outside, and watchdog pings only while the
//! supervision loop answers.

use super::NodeStatus;
use crate::supervisor::Liveness;
use crate::systemd::{Notice, ServiceManager};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// Each extension asks for this much more start-up time; one is sent at every change while
/// waiting (each second of a boot wait, each task state change) and at least every third of it.
pub const EXTEND_BY: Duration = Duration::from_secs(30);

/// Follows the status until the board is dropped.
pub async fn follow(mut board: watch::Receiver<NodeStatus>, manager: Arc<dyn ServiceManager>) {
    let mut last = String::new();
    let mut ready = false;
    let mut extended = Instant::now();
    loop {
        {
            let status = board.borrow_and_update();
            let text = status.summary();
            let mut notices = Vec::new();
            if !ready && status.healthy {
                ready = true;
                notices.push(Notice::Ready);
                info!(status = %text, "ready: every task is healthy");
            } else if !ready
                && waiting_outside(&status)
                && (text != last || extended.elapsed() >= EXTEND_BY / 3)
            {
                notices.push(Notice::ExtendTimeout(EXTEND_BY));
                extended = Instant::now();
            }
            if text != last && status.phase != "stopping" {
                notices.push(Notice::Status(text.clone()));
                last = text;
            }
            if !notices.is_empty() {
                manager.notify(&notices);
            }
        }
        tokio::select! {
            changed = board.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(EXTEND_BY / 3), if !ready => {}
        }
    }
}

/// Before readiness, the boot is waiting on something outside nodeagent (IMDS, the Consul
/// servers, the ECS agent, tasks coming up) rather than failing: a task in `crash-loop` is
/// failing, and does not extend the start-up.
fn waiting_outside(status: &NodeStatus) -> bool {
    status.phase != "supervise" || status.tasks.iter().all(|t| t.state != "crash-loop")
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
