//! Self-healing: owns giving up on the node. A task in `crash-loop` for longer than
//! `lifecycle.unhealthy_after` marks the instance Unhealthy in its autoscaling group
//! (`SetInstanceHealth`), once, so the group replaces it.

use crate::asg::AutoScaling;
use crate::retry::Backoff;
use crate::supervisor::{State, TaskStatus};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{error, warn};

pub struct SelfHeal {
    pub asg: Arc<dyn AutoScaling>,
    pub instance_id: String,
    pub after: Duration,
}

impl SelfHeal {
    /// Follows the tasks until one has crash-looped for `after`, then marks the instance
    /// unhealthy (retrying until it is done) and returns.
    pub async fn run(self, mut tasks: watch::Receiver<Vec<TaskStatus>>) {
        let task = loop {
            let oldest = tasks
                .borrow()
                .iter()
                .filter(|t| t.state == State::CrashLoop)
                .map(|t| (t.since, t.name.clone()))
                .min();
            let wake = match oldest {
                Some((since, name)) => {
                    let looping = SystemTime::now().duration_since(since).unwrap_or_default();
                    if looping >= self.after {
                        break name;
                    }
                    Some(self.after - looping)
                }
                None => None,
            };
            tokio::select! {
                changed = tasks.changed() => if changed.is_err() { return },
                _ = sleep(wake) => {}
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

async fn sleep(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
