//! systemd boundary: owns talking to the service manager over the `sd_notify` protocol (the
//! sd-notify crate): readiness, the status line, start-timeout extensions, watchdog pings and
//! stopping. Without `NOTIFY_SOCKET` (not started by systemd) every notice is dropped.

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
