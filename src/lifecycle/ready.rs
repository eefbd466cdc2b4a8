//! The readiness gate: owns the container-instance attribute (`lifecycle.ready_attribute`,
//! default `nodeagent.ready`) that services opt into with the placement constraint
//! `attribute:nodeagent.ready == true`.
//!
//! It is put ("true") once every task is healthy, and deleted when the node has been degraded
//! for `lifecycle.degraded_grace` — a blip shorter than that changes nothing. Both calls are
//! idempotent, so an agent that restarts simply puts it again once its adopted tasks pass their
//! checks. Failed calls are retried with backoff.

use crate::ecs::ContainerInstance;
use crate::retry::Backoff;
use crate::supervisor::{State, TaskStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

pub struct ReadinessGate {
    pub api: Arc<dyn ContainerInstance>,
    pub cluster: String,
    pub container_instance: String,
    pub attribute: String,
    pub grace: Duration,
    /// Put the attribute again this often while healthy: when the ECS agent registers it as
    /// "false" itself (`ECS_INSTANCE_ATTRIBUTES`), an agent restart resets it.
    pub reassert: Option<Duration>,
}

impl ReadinessGate {
    /// Follows the tasks' states until their channel closes, or until `withdrawn` turns true
    /// (a drain): then the attribute is removed for good. `present` reports whether the
    /// attribute is known to be set (`None` until the first call succeeded).
    pub async fn run(
        self,
        mut tasks: watch::Receiver<Vec<TaskStatus>>,
        mut withdrawn: watch::Receiver<bool>,
        present: watch::Sender<Option<bool>>,
    ) {
        let mut degraded_since = Some(Instant::now());
        let mut retry_at: Option<Instant> = None;
        let mut put_at: Option<Instant> = None;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let healthy = tasks.borrow().iter().all(|t| t.state == State::Healthy);
            let now = Instant::now();
            if healthy {
                degraded_since = None;
            } else if degraded_since.is_none() {
                degraded_since = Some(now);
            }
            let grace_over = degraded_since.is_some_and(|t| now >= t + self.grace);
            let withdraw = *withdrawn.borrow();
            if withdraw && *present.borrow() == Some(false) {
                return;
            }
            let want = if withdraw {
                Some(false)
            } else if healthy {
                Some(true)
            } else if grace_over {
                Some(false)
            } else {
                None
            };
            let due = retry_at.is_none_or(|t| now >= t);
            let reassert_at = match (self.reassert, put_at) {
                (Some(every), Some(at)) if want == Some(true) && !withdraw => Some(at + every),
                _ => None,
            };
            let stale = reassert_at.is_some_and(|t| now >= t);
            if let Some(want) = want.filter(|w| (*present.borrow() != Some(*w) || stale) && due) {
                match self.apply(want).await {
                    Ok(()) => {
                        put_at = want.then(Instant::now);
                        present.send_replace(Some(want));
                        retry_at = None;
                        backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        warn!(attribute = %self.attribute, retry_in = ?delay, "cannot update the readiness attribute {} ({e:#}); retrying in {delay:?}", self.attribute);
                        retry_at = Some(Instant::now() + delay);
                    }
                }
                continue;
            }
            let grace_end = degraded_since
                .filter(|_| *present.borrow() != Some(false))
                .map(|t| t + self.grace);
            let wake = [grace_end, retry_at, reassert_at]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                changed = tasks.changed() => if changed.is_err() { return },
                _ = withdrawn.changed() => {}
                _ = super::sleep_until(wake) => {}
            }
        }
    }

    async fn apply(&self, set: bool) -> anyhow::Result<()> {
        let (cluster, ci, name) = (&self.cluster, &self.container_instance, &self.attribute);
        if set {
            self.api.put_attribute(cluster, ci, name, "true").await?;
            info!(attribute = %name, container_instance = %ci, "every task is healthy: the node takes application tasks ({name}=true)");
        } else {
            self.api.delete_attribute(cluster, ci, name, "true").await?;
            warn!(attribute = %name, container_instance = %ci, grace = ?self.grace, "the node stayed degraded: removed {name}, no new application tasks land here");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::Mutex;
    use std::time::SystemTime;

    /// Records calls; fails the first `fail` of them.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail: Mutex<u32>,
    }

    #[async_trait]
    impl ContainerInstance for Recorder {
        async fn set_draining(&self, _: &str, ci: &str) -> anyhow::Result<()> {
            self.call(format!("draining {ci}"))
        }
        async fn tasks_not_stopped(
            &self,
            _: &str,
            _: &str,
        ) -> anyhow::Result<Vec<crate::ecs::EcsTask>> {
            Ok(Vec::new())
        }
        async fn put_attribute(
            &self,
            _: &str,
            ci: &str,
            name: &str,
            value: &str,
        ) -> anyhow::Result<()> {
            self.call(format!("put {ci} {name}={value}"))
        }
        async fn delete_attribute(
            &self,
            _: &str,
            ci: &str,
            name: &str,
            _: &str,
        ) -> anyhow::Result<()> {
            self.call(format!("delete {ci} {name}"))
        }
    }

    impl Recorder {
        fn call(&self, what: String) -> anyhow::Result<()> {
            let mut fail = self.fail.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                anyhow::bail!("throttled");
            }
            self.calls.lock().unwrap().push(what);
            Ok(())
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn tasks(states: &[State]) -> Vec<TaskStatus> {
        states
            .iter()
            .map(|s| TaskStatus {
                name: "t".into(),
                state: *s,
                since: SystemTime::now(),
                restarts: 0,
                instance: None,
                last_exit: None,
                last_output: None,
                health: None,
                health_latency: None,
                adopted: false,
            })
            .collect()
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn absent_until_healthy_then_removed_only_after_the_grace() {
        let api = Arc::new(Recorder::default());
        *api.fail.lock().unwrap() = 1; // the first put is throttled, and retried
        let (tx, rx) = watch::channel(tasks(&[State::Starting, State::Healthy]));
        let (present, seen) = watch::channel(None);
        let gate = ReadinessGate {
            api: api.clone(),
            cluster: "c".into(),
            container_instance: "arn:ci".into(),
            attribute: "nodeagent.ready".into(),
            grace: Duration::from_secs(60),
            reassert: None,
        };
        let (withdraw, withdrawn) = watch::channel(false);
        let run = tokio::spawn(gate.run(rx, withdrawn, present));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(api.calls().is_empty(), "not every task is healthy yet");

        tx.send_replace(tasks(&[State::Healthy, State::Healthy]));
        settle().await;
        tokio::time::sleep(Duration::from_secs(2)).await; // the retry
        assert_eq!(api.calls(), ["put arn:ci nodeagent.ready=true"]);
        assert_eq!(*seen.borrow(), Some(true));

        // A blip shorter than the grace changes nothing.
        tx.send_replace(tasks(&[State::Unhealthy, State::Healthy]));
        tokio::time::sleep(Duration::from_secs(30)).await;
        tx.send_replace(tasks(&[State::Healthy, State::Healthy]));
        settle().await;
        assert_eq!(api.calls().len(), 1);

        // Degraded past the grace: removed once; healthy again: put again.
        tx.send_replace(tasks(&[State::CrashLoop, State::Healthy]));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(api.calls().len(), 1, "still within the grace");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(api.calls()[1], "delete arn:ci nodeagent.ready");
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(api.calls().len(), 2, "removed once");
        tx.send_replace(tasks(&[State::Healthy, State::Healthy]));
        settle().await;
        assert_eq!(api.calls()[2], "put arn:ci nodeagent.ready=true");

        // A drain withdraws it for good, healthy or not.
        withdraw.send_replace(true);
        run.await.unwrap();
        assert_eq!(api.calls()[3], "delete arn:ci nodeagent.ready");
        assert_eq!(*seen.borrow(), Some(false));
        drop(tx);
    }
}
