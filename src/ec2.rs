//! EC2 boundary: owns the EC2 questions nodeagent asks — which running instances carry a tag
//! (the Consul servers), and which `nodeagent:` tags this instance carries when the instance
//! metadata does not show tags. One of them is a boot's first AWS call: both wait for the
//! accounting's first-call jitter ([`AwsCalls::pace`]), as the secrets' reads beside discovery do.

use crate::aws::AwsCalls;
use async_trait::async_trait;
use aws_sdk_ec2::types::Filter;
use std::sync::Arc;

const DESCRIBE_INSTANCES: &str = "ec2:DescribeInstances";
const DESCRIBE_TAGS: &str = "ec2:DescribeTags";

#[async_trait]
pub trait Ec2: Send + Sync {
    /// Private IPv4 addresses of the running instances tagged `key=value`, all pages.
    async fn running_private_ips(&self, key: &str, value: &str) -> anyhow::Result<Vec<String>>;
    /// The tags of `instance_id` whose key starts with `prefix`, all pages; `None` when the
    /// instance role may not ask (no ec2:DescribeTags).
    async fn instance_tags(
        &self,
        instance_id: &str,
        prefix: &str,
    ) -> anyhow::Result<Option<Vec<(String, String)>>>;
}

pub struct SdkEc2 {
    client: aws_sdk_ec2::Client,
    calls: Arc<AwsCalls>,
}

impl SdkEc2 {
    pub fn new(config: &aws_config::SdkConfig, calls: Arc<AwsCalls>) -> Self {
        SdkEc2 {
            client: aws_sdk_ec2::Client::new(config),
            calls,
        }
    }
}

#[async_trait]
impl Ec2 for SdkEc2 {
    async fn running_private_ips(&self, key: &str, value: &str) -> anyhow::Result<Vec<String>> {
        self.calls.pace().await;
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .build(),
            )
            .into_paginator()
            .send();
        let mut ips = Vec::new();
        while let Some(page) = pages.next().await {
            let page = self.calls.record(
                DESCRIBE_INSTANCES,
                || format!("(tag:{key}={value}, running)"),
                page,
            )?;
            ips.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(|i| i.private_ip_address().map(str::to_string)),
            );
        }
        Ok(ips)
    }

    async fn instance_tags(
        &self,
        instance_id: &str,
        prefix: &str,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        self.calls.pace().await;
        let mut pages = self
            .client
            .describe_tags()
            .filters(
                Filter::builder()
                    .name("resource-id")
                    .values(instance_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("key")
                    .values(format!("{prefix}*"))
                    .build(),
            )
            .into_paginator()
            .send();
        let mut tags = Vec::new();
        while let Some(page) = pages.next().await {
            let page = match self.calls.record(
                DESCRIBE_TAGS,
                || format!("({instance_id}, {prefix}*)"),
                page,
            ) {
                Ok(page) => page,
                Err(e) if e.code.as_deref() == Some("UnauthorizedOperation") => return Ok(None),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("reading this instance's tags: give the instance role ec2:DescribeTags, or enable instance tags in the instance metadata"))
                }
            };
            tags.extend(page.tags().iter().filter_map(|t| {
                let key = t.key()?;
                key.starts_with(prefix)
                    .then(|| (key.to_string(), t.value().unwrap_or_default().to_string()))
            }));
        }
        Ok(Some(tags))
    }
}
