//! AWS plumbing shared by the EC2, ECS and Auto Scaling boundaries: owns the SDK configuration
//! (region, endpoint, credentials chain, timeouts), what a failed call means ([`AwsError`]),
//! the retry policy of AWS calls ([`retry_until`]: full jitter from [`RETRY_BASE`] to
//! [`RETRY_CAP`] until a deadline), the per-operation call accounting ([`AwsCalls`]) and the
//! random delay of a boot's first call ([`FIRST_CALL_JITTER`]).
//!
//! Every AWS call is retried until a deadline of its own (the README's table lists each):
//! through [`retry_until`] (the tags read, the drain's steps, the look for a task a lost
//! `StartTask` may have started), or in a loop with the same backoff where a retry needs more
//! than the same call again (Consul-server discovery, which also waits for a server to appear;
//! `StartTask`, which looks before it starts again); the standing loops (the readiness
//! attribute, self-healing) retry until they succeed, and the reconcile at its next interval.
//!
//! Region: `AWS_REGION`/`AWS_DEFAULT_REGION` when set, else the region IMDS reported.
//! Endpoint and credentials: the SDK's standard sources (`AWS_ENDPOINT_URL`, environment,
//! profile, instance role). Every call has a connect timeout and a per-attempt timeout.
//!
//! Retries: the SDK's own are OFF (one attempt per `send`), chosen on purpose over both its
//! `standard` and `adaptive` modes. ECS and EC2 throttle per account and region — every node
//! of a fleet shares one bucket — so what matters is that a throttled node backs off with full
//! jitter for as long as its phase allows, not for the SDK's 3 attempts: the retries go on
//! until the phase's own deadline (`consul.discovery_timeout`, `ecs.start_timeout`, …).
//! Every attempt is then one counted call (the accounting, the metrics and the fleet benchmark
//! see the truth); and a `StartTask` whose answer was lost is never resent blindly (ECS's
//! `StartTask` takes no client token): its caller looks first ([`FailureKind::Lost`]).
//! `adaptive`'s client-side rate limiter only learns from this one client's throttles, which
//! at fleet scale come from everyone else's calls; measured with 300 nodes, it converged at
//! x1.35 of the throttle floor against full jitter's x1.10 (README, "A hostile AWS").

use crate::retry::FullJitter;
use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ecs::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use rand::Rng;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Throttling is logged at most this often per operation, with how many calls it hit.
const THROTTLE_LOG_EVERY: Duration = Duration::from_secs(60);
/// A boot's first AWS call waits a random delay up to this ([`AwsCalls::jittered`]).
pub const FIRST_CALL_JITTER: Duration = Duration::from_secs(1);
/// Retries start at this delay (full jitter: anything up to it) and double up to the cap.
pub const RETRY_BASE: Duration = Duration::from_millis(200);
pub const RETRY_CAP: Duration = Duration::from_secs(10);

/// The error codes by which AWS services say "too many requests" (the SDK's own list).
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

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
                .operation_timeout(Duration::from_secs(10))
                .build(),
        )
        // One attempt per send: see the module documentation.
        .retry_config(RetryConfig::disabled())
        .load()
        .await
}

/// What a failed AWS call means for whoever would try it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The service said "slow down": retry later, with jitter.
    Throttled,
    /// The service failed (5xx) or did not answer in a way that proves nothing was done:
    /// retrying is safe.
    Transient,
    /// The request may have taken effect but its answer was lost (a timeout, a connection
    /// dropped after sending): safe to retry only for a call that changes nothing; a
    /// `StartTask` must look for what it may have started first.
    Lost,
    /// The request was refused for what it is (a 4xx: a missing permission, a bad
    /// parameter): retrying cannot help.
    Refused,
}

/// A failed AWS call: which operation, on what, how it failed and what AWS said.
#[derive(Debug, thiserror::Error)]
#[error("{op} {what} failed: {}{message}{}", self.code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default(), self.hint())]
pub struct AwsError {
    pub op: &'static str,
    pub kind: FailureKind,
    /// The service's error code (`ThrottlingException`, `AccessDeniedException`, …).
    pub code: Option<String>,
    pub what: String,
    pub message: String,
}

impl AwsError {
    /// Classifies an SDK error of operation `op` on `what`.
    pub fn new<E>(
        op: &'static str,
        what: impl Into<String>,
        e: &SdkError<E, HttpResponse>,
    ) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (kind, code) = match e {
            SdkError::ServiceError(s) => {
                let code = s.err().code().map(str::to_string);
                let status = s.raw().status().as_u16();
                let kind = if code
                    .as_deref()
                    .is_some_and(|c| THROTTLING_CODES.contains(&c))
                {
                    FailureKind::Throttled
                } else if status >= 500 {
                    FailureKind::Transient
                } else {
                    FailureKind::Refused
                };
                (kind, code)
            }
            SdkError::ConstructionFailure(_) => (FailureKind::Refused, None),
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => (FailureKind::Lost, None),
            _ => (FailureKind::Transient, None),
        };
        AwsError {
            op,
            kind,
            code,
            what: what.into(),
            message: describe(e),
        }
    }

    /// What to do about a refusal for want of permission.
    fn hint(&self) -> String {
        let denied = self
            .code
            .as_deref()
            .is_some_and(|c| c.starts_with("AccessDenied") || c.starts_with("Unauthorized"));
        if denied {
            format!("; the instance role needs {}", self.op)
        } else {
            String::new()
        }
    }

    /// Whether trying again may succeed (`Lost` too: for calls that change nothing).
    pub fn retryable(&self) -> bool {
        self.kind != FailureKind::Refused
    }
}

/// The classification of the first AWS error in `e`'s chain, if any.
pub fn failure_kind(e: &anyhow::Error) -> Option<FailureKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<AwsError>())
        .map(|a| a.kind)
}

/// Runs `attempt` until it succeeds, it fails for good, or `deadline` passes: an AWS error
/// that is throttled, transient or lost is retried with exponential backoff and full jitter
/// (from [`RETRY_BASE`] up to [`RETRY_CAP`]); any other error ends it at once. `what` names
/// what is being done, for the error after the deadline.
pub async fn retry_until<T, F, Fut>(
    what: &str,
    deadline: Instant,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = FullJitter::new(RETRY_BASE, RETRY_CAP);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let e = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let retryable = e
            .chain()
            .find_map(|c| c.downcast_ref::<AwsError>())
            .is_some_and(AwsError::retryable);
        if !retryable {
            return Err(e);
        }
        let delay = backoff.next_delay();
        if Instant::now() + delay >= deadline {
            return Err(e.context(format!(
                "{what}: still failing after {tries} attempts, at its deadline"
            )));
        }
        tokio::time::sleep(delay).await;
    }
}

/// Calls and errors per AWS operation ("ecs:StartTask"), for the boot summary, status and
/// metrics; throttling is logged here, once a minute per operation. With a first-call jitter
/// ([`AwsCalls::jittered`]), the first call waits a random delay ([`AwsCalls::pace`]).
#[derive(Debug, Default)]
pub struct AwsCalls {
    ops: Mutex<BTreeMap<&'static str, OpCount>>,
    throttle_log: Mutex<BTreeMap<&'static str, (Instant, u64)>>,
    /// The bound of the first call's random delay, and once drawn, when calls may begin.
    first_call: Mutex<(Duration, Option<Instant>)>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpCount {
    pub calls: u64,
    pub errors: u64,
    /// Of the errors, how many were AWS throttling the call.
    #[serde(default)]
    pub throttled: u64,
}

impl AwsCalls {
    /// Accounting whose first call waits a random delay up to `bound` ([`FIRST_CALL_JITTER`]
    /// for a boot): at a scale-out many nodes boot in the same instant, and their first calls
    /// should not reach the account's buckets all in that instant.
    pub fn jittered(bound: Duration) -> AwsCalls {
        AwsCalls {
            first_call: Mutex::new((bound, None)),
            ..AwsCalls::default()
        }
    }

    /// Awaited before a call that may be the first: the first draws the delay (full jitter up
    /// to the bound; logged) and every call waits until it has passed — at once after that.
    pub async fn pace(&self) {
        let at = {
            let mut first = self.first_call.lock().unwrap_or_else(|p| p.into_inner());
            let (bound, at) = &mut *first;
            *at.get_or_insert_with(|| {
                let delay = rand::rng().random_range(Duration::ZERO..=*bound);
                if !delay.is_zero() {
                    debug!(
                        delay_ms = delay.as_millis() as u64,
                        "the first AWS call waits {delay:?} (jitter)"
                    );
                }
                Instant::now() + delay
            })
        };
        tokio::time::sleep_until(at).await;
    }

    /// One call of `op` that succeeded.
    pub fn ok(&self, op: &'static str) {
        self.count(op, None);
    }

    /// One call of `op` that failed as `e` says; throttling is logged (once a minute).
    pub fn failed(&self, e: &AwsError) {
        self.count(e.op, Some(e.kind));
        if e.kind == FailureKind::Throttled {
            let mut log = self.throttle_log.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (since, hits) = log.entry(e.op).or_insert((now - THROTTLE_LOG_EVERY, 0));
            *hits += 1;
            if now - *since >= THROTTLE_LOG_EVERY {
                warn!(operation = e.op, "{}: AWS is throttling this account's calls ({} throttled since the last report); backing off with jitter", e.op, hits);
                *since = now;
                *hits = 0;
            }
        }
    }

    /// Counts a call's result, and gives an error back classified.
    pub fn record<T, E>(
        &self,
        op: &'static str,
        what: impl FnOnce() -> String,
        result: Result<T, SdkError<E, HttpResponse>>,
    ) -> Result<T, AwsError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match result {
            Ok(v) => {
                self.ok(op);
                Ok(v)
            }
            Err(e) => {
                let e = AwsError::new(op, what(), &e);
                self.failed(&e);
                Err(e)
            }
        }
    }

    fn count(&self, op: &'static str, failed: Option<FailureKind>) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let c = ops.entry(op).or_default();
        c.calls += 1;
        c.errors += u64::from(failed.is_some());
        c.throttled += u64::from(failed == Some(FailureKind::Throttled));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn aws(kind: FailureKind) -> anyhow::Error {
        AwsError {
            op: "ecs:StartTask",
            kind,
            code: None,
            what: "of family x".into(),
            message: "nope".into(),
        }
        .into()
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_with_jitter_until_the_deadline_and_refusals_are_not() {
        let start = Instant::now();
        let mut attempts = Vec::new();
        let out: anyhow::Result<()> =
            retry_until("starting x", start + Duration::from_secs(60), || {
                attempts.push(Instant::now());
                async { Err(aws(FailureKind::Throttled)) }
            })
            .await;
        let err = format!("{:#}", out.unwrap_err());
        assert!(
            err.contains("at its deadline") && err.contains("ecs:StartTask"),
            "{err}"
        );
        assert!(Instant::now() - start <= Duration::from_secs(60));
        let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g <= RETRY_CAP), "{gaps:?}");
        assert!(
            attempts.len() >= 5,
            "backed off, but kept trying: {}",
            attempts.len()
        );

        let mut n = 0;
        let out: anyhow::Result<()> = retry_until("x", start + Duration::from_secs(600), || {
            n += 1;
            async { Err(aws(FailureKind::Refused)) }
        })
        .await;
        assert!(out.is_err());
        assert_eq!(n, 1, "a refusal is not retried");

        let mut n = 0;
        let out = retry_until("x", Instant::now() + Duration::from_secs(600), || {
            n += 1;
            let fail = n < 4;
            async move {
                if fail {
                    Err(aws(FailureKind::Transient))
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!(out.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_call_of_a_jittered_accounting_waits_and_at_most_the_bound() {
        let calls = AwsCalls::jittered(Duration::from_secs(1));
        let start = Instant::now();
        calls.pace().await;
        let first = Instant::now() - start;
        assert!(first <= Duration::from_secs(1), "{first:?}");
        let again = Instant::now();
        calls.pace().await;
        assert_eq!(Instant::now(), again, "later calls do not wait");
        let plain = AwsCalls::default();
        let now = Instant::now();
        plain.pace().await;
        assert_eq!(Instant::now(), now, "no jitter unless asked");
        // And the first waits are spread, not all zero (nor all the bound).
        let mut firsts = Vec::new();
        for _ in 0..20 {
            let calls = AwsCalls::jittered(Duration::from_secs(1));
            let start = Instant::now();
            calls.pace().await;
            firsts.push(Instant::now() - start);
        }
        assert!(firsts.iter().any(|f| !f.is_zero()), "{firsts:?}");
        assert!(
            firsts.iter().any(|f| *f < Duration::from_secs(1)),
            "{firsts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_counted_per_call_and_logged_once_a_minute() {
        let calls = AwsCalls::default();
        for _ in 0..5 {
            calls.failed(&AwsError {
                op: "ec2:DescribeInstances",
                kind: FailureKind::Throttled,
                code: Some("RequestLimitExceeded".into()),
                what: String::new(),
                message: String::new(),
            });
        }
        calls.ok("ec2:DescribeInstances");
        let c = calls.snapshot()["ec2:DescribeInstances"];
        assert_eq!((c.calls, c.errors, c.throttled), (6, 5, 5));
        let log = calls.throttle_log.lock().unwrap();
        assert_eq!(log["ec2:DescribeInstances"].1, 4, "one report, four since");
    }
}
