//! The readiness gate: owns the container-instance attribute (`lifecycle.ready_attribute`,
//! default `nodeagent.ready`) that services opt into with the placement constraint
//! `attribute:nodeagent.ready == true`.
//!
//! It is put ("true") once every task is healthy, and deleted when the node has been degraded
//! for `lifecycle.degraded_grace` — a blip shorter than that changes nothing. Both calls are
//! idempotent, so an agent that restarts simply puts it again once its adopted tasks pass their
//! checks. Only the gate puts it, and it notes so on the host ([`RECORD`]): an agent that
//! finds no note knows there is nothing to delete — a node still starting its tasks past the
//! grace (a throttled scale-out) spends no call removing what it never had. Failed calls are retried with AWS calls' full jitter ([`crate::aws::retry_until`]'s
//! pacing): the attribute shares ECS's `StartTask` bucket, which a scale-out drains.

use crate::aws::{RETRY_BASE, RETRY_CAP};
use crate::ecs::ContainerInstance;
use crate::hostfs::{HostFs, Perms};
use crate::retry::FullJitter;
use crate::supervisor::{State, TaskStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Where the gate notes that it put the attribute (the attribute's name), removed when it
/// deletes it: nodeagent's state, kept across reboots as the container instance keeps its
/// attributes, and removed with the instance's identity by `prepare-image`.
pub const RECORD: &str = "/var/lib/nodeagent/ready-attribute";

pub struct ReadinessGate {
    pub api: Arc<dyn ContainerInstance>,
    pub cluster: String,
    pub container_instance: String,
    pub attribute: String,
    pub grace: Duration,
    /// Put the attribute again this often while healthy: when the ECS agent registers it as
    /// "false" itself (`ECS_INSTANCE_ATTRIBUTES`), an agent restart resets it.
    pub reassert: Option<Duration>,
    /// Where [`RECORD`] is kept; `None`: nowhere (whether the attribute is there is then
    /// unknown until a call succeeds).
    pub record: Option<Arc<dyn HostFs>>,
}

impl ReadinessGate {
    /// Follows the tasks' states until their channel closes, or until `withdrawn` turns true
    /// (a drain): then the attribute is removed for good. `present` reports whether the
    /// attribute is known to be set (`None`: not known until a call succeeds — an earlier
    /// agent noted it put it, or the note cannot be read).
    pub async fn run(
        self,
        mut tasks: watch::Receiver<Vec<TaskStatus>>,
        mut withdrawn: watch::Receiver<bool>,
        present: watch::Sender<Option<bool>>,
    ) {
        if let Some(fs) = &self.record {
            if let Ok(None) = fs.read(RECORD) {
                present.send_replace(Some(false)); // never put: nothing to delete
            }
        }
        let mut degraded_since = Some(Instant::now());
        let mut retry_at: Option<Instant> = None;
        let mut put_at: Option<Instant> = None;
        let mut backoff = FullJitter::new(RETRY_BASE, RETRY_CAP);
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
                        self.note(want);
                        put_at = want.then(Instant::now);
                        present.send_replace(Some(want));
                        retry_at = None;
                        backoff = FullJitter::new(RETRY_BASE, RETRY_CAP);
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

    /// Notes on the host whether the attribute is there now.
    fn note(&self, set: bool) {
        let Some(fs) = &self.record else { return };
        let noted = if set {
            fs.write_atomic(RECORD, self.attribute.as_bytes(), Perms::mode(0o644))
                .map(|_| ())
        } else {
            fs.remove(RECORD).map(|_| ())
        };
        if let Err(e) = noted {
            warn!(path = RECORD, "cannot note the readiness attribute in {RECORD} ({e}): a restarted agent may delete an attribute that is not there, or keep one it should delete");
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

    fn gate(api: Arc<Recorder>, record: Option<Arc<dyn HostFs>>) -> ReadinessGate {
        ReadinessGate {
            api,
            cluster: "c".into(),
            container_instance: "arn:ci".into(),
            attribute: "nodeagent.ready".into(),
            grace: Duration::from_secs(60),
            reassert: None,
            record,
        }
    }

    /// A scale-out's node waits minutes for its starts (throttled): past the grace, it has
    /// nothing to delete unless an earlier agent noted it put the attribute.
    #[tokio::test(start_paused = true)]
    async fn a_node_still_starting_past_the_grace_deletes_only_what_was_put() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn HostFs> = Arc::new(crate::hostfs::RootedFs::new(dir.path()));
        let api = Arc::new(Recorder::default());
        let (tx, rx) = watch::channel(tasks(&[State::Starting, State::Starting]));
        let (present, seen) = watch::channel(None);
        let (_withdraw, withdrawn) = watch::channel(false);
        let run = tokio::spawn(gate(api.clone(), Some(fs.clone())).run(rx, withdrawn, present));
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(api.calls().is_empty(), "never put, nothing deleted");
        assert_eq!(*seen.borrow(), Some(false));
        tx.send_replace(tasks(&[State::Healthy, State::Healthy]));
        settle().await;
        assert_eq!(api.calls(), ["put arn:ci nodeagent.ready=true"]);
        assert_eq!(
            fs.read(RECORD).unwrap().as_deref(),
            Some(&b"nodeagent.ready"[..])
        );
        drop(tx);
        run.await.unwrap();

        // The next agent finds the note: degraded past the grace, it deletes the attribute.
        let api = Arc::new(Recorder::default());
        let (_tx, rx) = watch::channel(tasks(&[State::CrashLoop]));
        let (present, seen) = watch::channel(None);
        let (_withdraw, withdrawn) = watch::channel(false);
        tokio::spawn(gate(api.clone(), Some(fs.clone())).run(rx, withdrawn, present));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(api.calls().is_empty(), "within the grace");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(api.calls(), ["delete arn:ci nodeagent.ready"]);
        assert_eq!(*seen.borrow(), Some(false));
        assert_eq!(fs.read(RECORD).unwrap(), None, "the note goes with it");
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
            record: None,
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
