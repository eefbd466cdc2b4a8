//! AWS plumbing shared by the EC2 and ECS boundaries: owns the SDK configuration (region,
//! endpoint, credentials chain, timeouts, retries) and the per-operation call accounting.
//!
//! Region: `AWS_REGION`/`AWS_DEFAULT_REGION` when set, else the region IMDS reported.
//! Endpoint and credentials: the SDK's standard sources (`AWS_ENDPOINT_URL`, environment,
//! profile, instance role). Every call has a connect timeout, a per-attempt timeout and an
//! overall timeout; failed attempts are retried by the SDK's standard strategy (at most
//! [`MAX_ATTEMPTS`], exponential backoff with full jitter).

use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

pub const MAX_ATTEMPTS: u32 = 4;

/// Loads the SDK configuration, using `fallback_region` (from IMDS) when the environment names
/// no region.
pub async fn sdk_config(fallback_region: &str) -> SdkConfig {
    let region = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(Region::new(fallback_region.to_string()));
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .load()
        .await
}

/// Calls and errors per AWS operation ("ecs:StartTask"), for the boot summary and metrics.
#[derive(Debug, Default)]
pub struct AwsCalls {
    ops: Mutex<BTreeMap<&'static str, OpCount>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpCount {
    pub calls: u64,
    pub errors: u64,
}

impl AwsCalls {
    pub fn record(&self, op: &'static str, ok: bool) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let c = ops.entry(op).or_default();
        c.calls += 1;
        c.errors += u64::from(!ok);
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, OpCount> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn total(&self) -> u64 {
        self.snapshot().values().map(|c| c.calls).sum()
    }
}

/// An SDK error with its whole source chain, each cause once (the SDK's own Display says only
/// "service error", and its Debug dumps raw responses).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}
