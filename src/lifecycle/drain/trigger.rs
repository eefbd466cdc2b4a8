//! Triggers: owns noticing that the node must drain — the autoscaling group terminating the
//! instance, a spot interruption notice (with the time it gives), a rebalance recommendation —
//! by polling the instance metadata.

use crate::imds::Imds;
use crate::retry::jitter;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// Why the node drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `nodeagent drain` (the unit's ExecStop at system shutdown, or by hand).
    Requested,
    /// The autoscaling group is terminating the instance (`target-lifecycle-state`).
    Terminated,
    /// A spot interruption notice.
    SpotInterruption,
    /// A rebalance recommendation (`lifecycle.drain_on_rebalance`).
    Rebalance,
    /// A drain an earlier agent on this node began (it stopped, or was restarted, meanwhile).
    Resumed,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Requested => "requested",
            Trigger::Terminated => "autoscaling-terminated",
            Trigger::SpotInterruption => "spot-interruption",
            Trigger::Rebalance => "rebalance-recommendation",
            Trigger::Resumed => "resumed",
        }
    }

    /// The drain an earlier agent began for the trigger it recorded (`name`), resumed: a
    /// scale-in's stays one (its lifecycle hook kept alive, then completed), a spot
    /// interruption's too (budgeted from the notice, read again); anything else is "resumed".
    pub fn resuming(name: &str) -> Trigger {
        [Trigger::Terminated, Trigger::SpotInterruption]
            .into_iter()
            .find(|t| t.name() == name)
            .unwrap_or(Trigger::Resumed)
    }
}

/// A reason to drain, and when the instance goes away if the notice says (a spot interruption
/// gives two minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub trigger: Trigger,
    pub gone_at: Option<SystemTime>,
}

/// The time a spot `instance-action` notice gives (`{"action": "terminate", "time":
/// "2026-11-29T08:22:00Z"}`); `None` when it names none.
pub fn spot_deadline(notice: &str) -> Option<SystemTime> {
    let doc: serde_json::Value = serde_json::from_str(notice.trim()).ok()?;
    humantime::parse_rfc3339_weak(doc.get("time")?.as_str()?).ok()
}

/// The notice of a drain an earlier agent began for the trigger it recorded (`name`): a spot
/// interruption's deadline is read from IMDS again.
pub async fn resumed_notice(name: &str, imds: &dyn Imds) -> Notice {
    let trigger = Trigger::resuming(name);
    let gone_at = match trigger {
        Trigger::SpotInterruption => imds
            .spot_instance_action()
            .await
            .ok()
            .flatten()
            .and_then(|n| spot_deadline(&n)),
        _ => None,
    };
    Notice { trigger, gone_at }
}

/// Polls IMDS every `every` (jittered) for a reason to drain: the autoscaling group
/// terminating the instance, a spot interruption notice, and (when `rebalance`) a rebalance
/// recommendation. Returns the first one seen.
pub async fn wait_for_trigger(imds: Arc<dyn Imds>, every: Duration, rebalance: bool) -> Notice {
    let now = |trigger| Notice {
        trigger,
        gone_at: None,
    };
    // An instance metadata service that does not answer hides a termination or a spot
    // notice: said at once, then at most once a minute while it lasts.
    let mut unseen_since: Option<tokio::time::Instant> = None;
    let mut said_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(jitter(every)).await;
        let mut failed = Vec::new();
        match imds.target_lifecycle_state().await {
            Ok(Some(state)) if state.trim() == "Terminated" => return now(Trigger::Terminated),
            Ok(_) => {}
            Err(e) => failed.push(format!("autoscaling/target-lifecycle-state: {e}")),
        }
        match imds.spot_instance_action().await {
            Ok(Some(notice)) => {
                warn!(notice = %notice.trim(), "spot interruption notice");
                return Notice {
                    trigger: Trigger::SpotInterruption,
                    gone_at: spot_deadline(&notice),
                };
            }
            Ok(None) => {}
            Err(e) => failed.push(format!("spot/instance-action: {e}")),
        }
        if rebalance {
            match imds.rebalance_recommendation().await {
                Ok(Some(_)) => return now(Trigger::Rebalance),
                Ok(None) => {}
                Err(e) => failed.push(format!("events/recommendations/rebalance: {e}")),
            }
        }
        let at = tokio::time::Instant::now();
        if failed.is_empty() {
            if let Some(since) = unseen_since.take() {
                info!("instance metadata answers again (after {:?}): watching for a termination or a spot notice", at - since);
            }
            said_at = None;
            continue;
        }
        let since = *unseen_since.get_or_insert(at);
        if said_at.is_none_or(|t| at - t >= Duration::from_secs(60)) {
            said_at = Some(at);
            warn!(
                "cannot watch for a termination or a spot notice for {:?}: {}; a drain would start late",
                at - since,
                failed.join("; ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::ImdsError;
    use async_trait::async_trait;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Meta-data items the test sets while the poller runs.
    #[derive(Default)]
    struct Items(Mutex<BTreeMap<String, String>>);

    #[async_trait]
    impl Imds for Items {
        async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
            let item = path.trim_start_matches("/latest/meta-data/");
            Ok(self.0.lock().unwrap().get(item).cloned())
        }
        fn endpoint(&self) -> &str {
            "test"
        }
    }

    impl Items {
        fn set(&self, item: &str, value: &str) {
            self.0.lock().unwrap().insert(item.into(), value.into());
        }
    }

    async fn first_trigger(items: Arc<Items>, rebalance: bool) -> Option<Trigger> {
        let poll = wait_for_trigger(items, Duration::from_secs(5), rebalance);
        tokio::time::timeout(Duration::from_secs(60), poll)
            .await
            .ok()
            .map(|n| n.trigger)
    }

    #[test]
    fn a_spot_notice_gives_its_time() {
        let at = spot_deadline(r#"{"action": "terminate", "time": "2026-11-29T08:22:00Z"}"#);
        assert_eq!(
            at,
            Some(humantime::parse_rfc3339("2026-11-29T08:22:00Z").unwrap())
        );
        assert_eq!(spot_deadline(r#"{"action": "stop"}"#), None);
        assert_eq!(spot_deadline("garbled"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn each_notice_is_a_trigger_and_rebalance_only_when_asked() {
        let items = Arc::new(Items::default());
        items.set("autoscaling/target-lifecycle-state", "InService");
        assert_eq!(
            first_trigger(items.clone(), true).await,
            None,
            "in service: no drain"
        );

        items.set(
            "events/recommendations/rebalance",
            r#"{"noticeTime": "2026-11-23T18:00:00Z"}"#,
        );
        assert_eq!(first_trigger(items.clone(), false).await, None, "not asked");
        assert_eq!(
            first_trigger(items.clone(), true).await,
            Some(Trigger::Rebalance)
        );

        items.set(
            "spot/instance-action",
            r#"{"action": "terminate", "time": "2026-11-29T08:22:00Z"}"#,
        );
        assert_eq!(
            first_trigger(items.clone(), false).await,
            Some(Trigger::SpotInterruption)
        );

        items.set("autoscaling/target-lifecycle-state", "Terminated");
        assert_eq!(
            first_trigger(items.clone(), false).await,
            Some(Trigger::Terminated),
            "the group's decision comes first"
        );
    }
}
