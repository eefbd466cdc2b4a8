//! systemd boundary: owns talking to the service manager over the `sd_notify` protocol (the
//! sd-notify crate): readiness, the status line, start-timeout extensions, watchdog pings and
//! stopping; and whether the system is shutting down. Without `NOTIFY_SOCKET` (not started by
//! systemd) every notice is dropped.

use std::time::Duration;
use tracing::debug;

/// One thing to tell the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`: start-up is complete.
    Ready,
    /// `STATUS=…`: what `systemctl status` shows.
    Status(String),
    /// `EXTEND_TIMEOUT_USEC=…`: do not fail the start-up for this long from now.
    ExtendTimeout(Duration),
    /// `WATCHDOG=1`: still alive.
    Watchdog,
    /// `STOPPING=1`.
    Stopping,
}

pub trait ServiceManager: Send + Sync {
    /// Sends the notices as one message.
    fn notify(&self, notices: &[Notice]);
    /// How often to ping the watchdog (half of `WATCHDOG_USEC`), `None` without a watchdog.
    fn watchdog_every(&self) -> Option<Duration>;
}

/// Whether the system is shutting down (`systemctl is-system-running` says `stopping`): what
/// tells a stop at shutdown (drain) from a restart (keep the tasks). Bounded at 5 s; no
/// systemd, or no answer, is "no".
pub async fn system_stopping() -> bool {
    let asked = tokio::process::Command::new("systemctl")
        .arg("is-system-running")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).trim() == "stopping",
        Ok(Err(e)) => {
            debug!(error = %e, "cannot run systemctl");
            false
        }
        Err(_) => false,
    }
}

/// The service manager that started this process, if any.
pub struct Systemd;

impl ServiceManager for Systemd {
    fn notify(&self, notices: &[Notice]) {
        use sd_notify::NotifyState;
        let states: Vec<NotifyState<'_>> = notices
            .iter()
            .map(|n| match n {
                Notice::Ready => NotifyState::Ready,
                Notice::Status(text) => NotifyState::Status(text),
                Notice::ExtendTimeout(d) => {
                    NotifyState::ExtendTimeoutUsec(u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
                }
                Notice::Watchdog => NotifyState::Watchdog,
                Notice::Stopping => NotifyState::Stopping,
            })
            .collect();
        if let Err(e) = sd_notify::notify(&states) {
            debug!(error = %e, "cannot notify the service manager");
        }
    }

    fn watchdog_every(&self) -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|d| d / 2)
    }
}
