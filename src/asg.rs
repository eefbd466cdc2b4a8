//! Auto Scaling boundary: owns the calls nodeagent makes about its own instance's group — the
//! group's name, completing a terminating lifecycle hook, and marking the instance unhealthy so
//! the group replaces it.

use crate::aws::AwsCalls;
use anyhow::Context;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

const DESCRIBE_INSTANCES: &str = "autoscaling:DescribeAutoScalingInstances";
const COMPLETE_LIFECYCLE_ACTION: &str = "autoscaling:CompleteLifecycleAction";
const SET_INSTANCE_HEALTH: &str = "autoscaling:SetInstanceHealth";
const HEARTBEAT: &str = "autoscaling:RecordLifecycleActionHeartbeat";
const DESCRIBE_HOOKS: &str = "autoscaling:DescribeLifecycleHooks";

#[async_trait]
pub trait AutoScaling: Send + Sync {
    /// The group `instance_id` belongs to; `None` outside any group.
    async fn group_of(&self, instance_id: &str) -> anyhow::Result<Option<String>>;
    /// `CompleteLifecycleAction` with `CONTINUE`: the instance may terminate now.
    async fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
    ) -> anyhow::Result<()>;
    /// `RecordLifecycleActionHeartbeat`: the hook waits its heartbeat timeout again.
    async fn record_heartbeat(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
    ) -> anyhow::Result<()>;
    /// The hook's heartbeat timeout (`DescribeLifecycleHooks`); `None` when the group has no
    /// such hook.
    async fn heartbeat_timeout(&self, group: &str, hook: &str) -> anyhow::Result<Option<Duration>>;
    /// `SetInstanceHealth Unhealthy`: the group replaces the instance.
    async fn set_unhealthy(&self, instance_id: &str) -> anyhow::Result<()>;
}

pub struct SdkAutoScaling {
    client: aws_sdk_autoscaling::Client,
    calls: Arc<AwsCalls>,
}

impl SdkAutoScaling {
    pub fn new(config: &aws_config::SdkConfig, calls: Arc<AwsCalls>) -> Self {
        SdkAutoScaling {
            client: aws_sdk_autoscaling::Client::new(config),
            calls,
        }
    }
}

#[async_trait]
impl AutoScaling for SdkAutoScaling {
    async fn group_of(&self, instance_id: &str) -> anyhow::Result<Option<String>> {
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let out = self
            .calls
            .record(DESCRIBE_INSTANCES, || format!("of {instance_id}"), out)?;
        Ok(out
            .auto_scaling_instances()
            .first()
            .and_then(|i| i.auto_scaling_group_name())
            .map(str::to_string))
    }

    async fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
    ) -> anyhow::Result<()> {
        let out = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await;
        self.calls
            .record(
                COMPLETE_LIFECYCLE_ACTION,
                || format!("(group {group}, hook {hook})"),
                out,
            )
            .map(|_| ())
            .context("lifecycle.lifecycle_hook must name the group's terminating hook")
    }

    async fn record_heartbeat(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
    ) -> anyhow::Result<()> {
        let out = self
            .client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .send()
            .await;
        Ok(self
            .calls
            .record(HEARTBEAT, || format!("(group {group}, hook {hook})"), out)
            .map(|_| ())?)
    }

    async fn heartbeat_timeout(&self, group: &str, hook: &str) -> anyhow::Result<Option<Duration>> {
        let out = self
            .client
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(group)
            .lifecycle_hook_names(hook)
            .send()
            .await;
        let out = self.calls.record(
            DESCRIBE_HOOKS,
            || format!("(group {group}, hook {hook})"),
            out,
        )?;
        Ok(out
            .lifecycle_hooks()
            .iter()
            .find(|h| h.lifecycle_hook_name() == Some(hook))
            .map(|h| Duration::from_secs(h.heartbeat_timeout().unwrap_or(3600).max(0) as u64)))
    }

    async fn set_unhealthy(&self, instance_id: &str) -> anyhow::Result<()> {
        let out = self
            .client
            .set_instance_health()
            .instance_id(instance_id)
            .health_status("Unhealthy")
            .send()
            .await;
        Ok(self
            .calls
            .record(
                SET_INSTANCE_HEALTH,
                || format!("Unhealthy for {instance_id}"),
                out,
            )
            .map(|_| ())?)
    }
}
