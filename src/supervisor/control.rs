//! What others may ask of the supervision loop: to hold, suspend, restart or signal a task
//! ([`Control`]: a drain, a rotated secret), and whether it is turning ([`Liveness`]: the
//! systemd watchdog). Each request is answered by the loop itself.

use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What a request asks of the loop for a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ask {
    /// No restart from now on; the instance is left as it is.
    Suspend,
    /// Suspend, and stop the instance.
    Hold,
    /// Replace the running instance now (its files changed), outside the failure counters.
    Restart(String),
    /// Send the running instance this signal (its files changed, it reloads them).
    Signal(String),
}

/// A request to the loop, answered when done (a restart: once it is under way).
pub(super) type HoldRequest = (String, Ask, oneshot::Sender<anyhow::Result<()>>);

/// Asks the loop to stop a task and keep it stopped (a drain stops the tasks one by one, in
/// reverse start order, around Consul's leave).
#[derive(Clone)]
pub struct Control(pub(super) mpsc::Sender<HoldRequest>);

impl Control {
    /// Stops `task` and keeps it stopped; returns once it has stopped.
    pub async fn hold(&self, task: &str) -> anyhow::Result<()> {
        self.ask(task, Ask::Hold).await
    }

    /// Replaces `task`'s running instance now (`why`: for the log and its last exit), outside
    /// the restart backoff and crash-loop counters; returns once the stop is under way. A task
    /// not running is left to its own schedule.
    pub async fn restart(&self, task: &str, why: &str) -> anyhow::Result<()> {
        self.ask(task, Ask::Restart(why.to_string())).await
    }

    /// Sends `signal` (`SIGHUP`) to `task`'s running instance.
    pub async fn signal(&self, task: &str, signal: &str) -> anyhow::Result<()> {
        self.ask(task, Ask::Signal(signal.to_string())).await
    }

    /// Restarts `task` no more, whatever happens to it, and leaves it running (before asking
    /// it to exit by itself, as Consul's leave does).
    pub async fn suspend(&self, task: &str) -> anyhow::Result<()> {
        self.ask(task, Ask::Suspend).await
    }

    async fn ask(&self, task: &str, ask: Ask) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((task.to_string(), ask, tx))
            .await
            .map_err(|_| anyhow::anyhow!("the supervision loop has ended"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the supervision loop has ended"))?
    }
}

/// Asks the supervision loop whether it is turning: the loop answers between two of its steps,
/// so a loop stuck in a call (a hung engine) does not answer. Feeds the systemd watchdog.
#[derive(Clone)]
pub struct Liveness(pub(super) mpsc::Sender<oneshot::Sender<()>>);

impl Liveness {
    /// Whether the loop answered within `within`.
    pub async fn responsive(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let asked = async { self.0.send(tx).await.is_ok() && rx.await.is_ok() };
        tokio::time::timeout(within, asked).await.unwrap_or(false)
    }
}
