//! Self-healing: owns giving up on the node. A task in `crash-loop` for longer than
//! `lifecycle.unhealthy_after` marks the instance Unhealthy in its autoscaling group
//! (`SetInstanceHealth`), once, so the group replaces it.

use crate::asg::AutoScaling;
use crate::retry::Backoff;
use crate::supervisor::{State, TaskStatus};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, warn};

pub struct SelfHeal {
    pub asg: Arc<dyn AutoScaling>,
    pub instance_id: String,
    pub after: Duration,
}

impl SelfHeal {
    /// Follows the tasks until one has crash-looped for `after`, then marks the instance
    /// unhealthy (retrying until it is done) and returns. Time is the monotonic clock's, from
    /// when this agent saw the task enter crash-loop: a wall clock stepped forward (NTP at
    /// boot) must not make a task look crash-looping for an hour.
    pub async fn run(self, mut tasks: watch::Receiver<Vec<TaskStatus>>) {
        let mut looping: BTreeMap<String, Instant> = BTreeMap::new();
        let task = loop {
            let now = Instant::now();
            {
                let current = tasks.borrow_and_update();
                looping.retain(|name, _| {
                    current
                        .iter()
                        .any(|t| &t.name == name && t.state == State::CrashLoop)
                });
                for t in current.iter().filter(|t| t.state == State::CrashLoop) {
                    looping.entry(t.name.clone()).or_insert(now);
                }
            }
            let oldest = looping.iter().min_by_key(|(_, since)| **since);
            let wake = match oldest {
                Some((name, since)) if now - *since >= self.after => break name.clone(),
                Some((_, since)) => Some(*since + self.after),
                None => None,
            };
            tokio::select! {
                changed = tasks.changed() => if changed.is_err() { return },
                _ = super::sleep_until(wake) => {}
            }
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            match self.asg.group_of(&self.instance_id).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    error!(task = %task, after = ?self.after, "{task} has crash-looped too long, but {} is in no autoscaling group: replace it by hand", self.instance_id);
                    return;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(retry_in = ?delay, "cannot tell the instance's autoscaling group ({e:#}); retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            match self.asg.set_unhealthy(&self.instance_id).await {
                Ok(()) => {
                    error!(task = %task, after = ?self.after, "{task} has crash-looped too long: marked this instance Unhealthy; its autoscaling group will replace it");
                    return;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(retry_in = ?delay, "cannot mark the instance unhealthy ({e:#}); retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::SystemTime;

    #[derive(Default)]
    struct Group(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl AutoScaling for Group {
        async fn group_of(&self, _: &str) -> anyhow::Result<Option<String>> {
            Ok(Some("g".into()))
        }
        async fn complete_lifecycle_action(&self, _: &str, _: &str, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn record_heartbeat(&self, _: &str, _: &str, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn heartbeat_timeout(&self, _: &str, _: &str) -> anyhow::Result<Option<Duration>> {
            Ok(None)
        }
        async fn set_unhealthy(&self, id: &str) -> anyhow::Result<()> {
            self.0.lock().unwrap().push(id.into());
            Ok(())
        }
    }

    fn task(state: State, since: SystemTime) -> Vec<TaskStatus> {
        vec![TaskStatus {
            name: "consul-agent".into(),
            state,
            since,
            restarts: 9,
            instance: None,
            last_exit: None,
            last_output: None,
            health: None,
            health_latency: None,
            adopted: false,
        }]
    }

    /// The wall clock says the task has looped since an hour ago (NTP stepped it, or the
    /// status's `since` came from before a reboot): only this agent's own monotonic time counts.
    #[tokio::test(start_paused = true)]
    async fn crash_loop_time_is_monotonic_and_leaving_the_loop_resets_it() {
        let asg = Arc::new(Group::default());
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let (tx, rx) = watch::channel(task(State::CrashLoop, hour_ago));
        let heal = SelfHeal {
            asg: asg.clone(),
            instance_id: "i-1".into(),
            after: Duration::from_secs(60),
        };
        let run = tokio::spawn(heal.run(rx));
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(
            asg.0.lock().unwrap().is_empty(),
            "not after 50 s, whatever the wall clock says"
        );
        tx.send_replace(task(State::Healthy, SystemTime::now()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        tx.send_replace(task(State::CrashLoop, SystemTime::now()));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(
            asg.0.lock().unwrap().is_empty(),
            "the loop began again 59 s ago"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        run.await.unwrap();
        assert_eq!(*asg.0.lock().unwrap(), ["i-1"], "once");
    }
}
