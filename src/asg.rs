//! Auto Scaling boundary: owns the calls nodeagent makes about its own instance's group — the
//! group's name, completing a terminating lifecycle hook, and marking the instance unhealthy so
//! the group replaces it.

use crate::aws::{describe, AwsCalls};
use anyhow::{anyhow, Context};
use async_trait::async_trait;
use std::sync::Arc;

const DESCRIBE_INSTANCES: &str = "autoscaling:DescribeAutoScalingInstances";
const COMPLETE_LIFECYCLE_ACTION: &str = "autoscaling:CompleteLifecycleAction";
const SET_INSTANCE_HEALTH: &str = "autoscaling:SetInstanceHealth";

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
        self.calls.record(DESCRIBE_INSTANCES, out.is_ok());
        let out = out.map_err(|e| anyhow!(describe(&e))).with_context(|| {
            format!("{DESCRIBE_INSTANCES} of {instance_id} failed; the instance role needs autoscaling:DescribeAutoScalingInstances")
        })?;
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
        self.calls.record(COMPLETE_LIFECYCLE_ACTION, out.is_ok());
        out.map(|_| ()).map_err(|e| anyhow!(describe(&e))).with_context(|| {
            format!("{COMPLETE_LIFECYCLE_ACTION} (group {group}, hook {hook}) failed; the instance role needs autoscaling:CompleteLifecycleAction, and lifecycle.lifecycle_hook must name the group's terminating hook")
        })
    }

    async fn set_unhealthy(&self, instance_id: &str) -> anyhow::Result<()> {
        let out = self
            .client
            .set_instance_health()
            .instance_id(instance_id)
            .health_status("Unhealthy")
            .send()
            .await;
        self.calls.record(SET_INSTANCE_HEALTH, out.is_ok());
        out.map(|_| ()).map_err(|e| anyhow!(describe(&e))).with_context(|| {
            format!("{SET_INSTANCE_HEALTH} Unhealthy for {instance_id} failed; the instance role needs autoscaling:SetInstanceHealth")
        })
    }
}
