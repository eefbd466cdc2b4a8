//! Instance metadata boundary (IMDSv2 only): owns every request to the EC2 instance metadata
//! service.
//!
//! [`AwsImds`] is aws-config's IMDS client: it fetches a session token with `PUT
//! /latest/api/token`, caches it until its TTL, applies per-attempt timeouts and retries server
//! errors and timeouts with jittered backoff. aws-config keeps a cached token until its TTL ends
//! even when IMDS no longer accepts it (401), so on a 401 [`AwsImds`] replaces the client — a new
//! token — and asks once more. It honours
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`. It never falls back to IMDSv1. Like Bottlerocket's
//! imdsclient, each item has a typed method, a 404 is `None` and every error names the path.

use async_trait::async_trait;
use aws_config::imds::client::error::ImdsError as SdkImdsError;
use aws_config::imds::client::ImdsResponseRetryClassifier;
use aws_smithy_runtime_api::client::retries::classifiers::SharedRetryClassifier;
use std::time::Duration;

const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

/// A failed metadata request, naming the item and the endpoint.
#[derive(Debug, thiserror::Error)]
#[error("instance metadata {path} from {endpoint}: {message}")]
pub struct ImdsError {
    pub path: String,
    pub endpoint: String,
    pub message: String,
    /// IMDS answered, but with bytes that are not UTF-8 text (gzip-compressed user-data).
    pub not_text: bool,
}

#[async_trait]
pub trait Imds: Send + Sync {
    /// The item at `path` ("/latest/meta-data/instance-id"), `None` when IMDS answers 404.
    async fn get(&self, path: &str) -> Result<Option<String>, ImdsError>;

    /// Where requests go (for messages).
    fn endpoint(&self) -> &str;

    async fn instance_id(&self) -> Result<String, ImdsError> {
        self.required("/latest/meta-data/instance-id").await
    }
    async fn local_ipv4(&self) -> Result<String, ImdsError> {
        self.required("/latest/meta-data/local-ipv4").await
    }
    async fn region(&self) -> Result<String, ImdsError> {
        self.required("/latest/meta-data/placement/region").await
    }
    async fn availability_zone(&self) -> Result<String, ImdsError> {
        self.required("/latest/meta-data/placement/availability-zone")
            .await
    }
    async fn instance_type(&self) -> Result<String, ImdsError> {
        self.required("/latest/meta-data/instance-type").await
    }
    async fn ami_id(&self) -> Result<String, ImdsError> {
        self.required("/latest/meta-data/ami-id").await
    }

    /// The instance's user-data; `None` when it has none, or when it is not text (gzip).
    async fn user_data(&self) -> Result<Option<String>, ImdsError> {
        match self.get("/latest/user-data").await {
            Err(e) if e.not_text => Ok(None),
            other => other,
        }
    }

    /// The instance's tags whose key starts with `prefix`, `None` when tags are not in the
    /// instance metadata (the instance's `InstanceMetadataTags` option is disabled).
    async fn tags(&self, prefix: &str) -> Result<Option<Vec<(String, String)>>, ImdsError> {
        let Some(keys) = self.get("/latest/meta-data/tags/instance").await? else {
            return Ok(None);
        };
        let mut tags = Vec::new();
        for key in keys.lines().filter(|k| k.starts_with(prefix)) {
            // A tag removed between the listing and now is simply gone.
            if let Some(value) = self
                .get(&format!("/latest/meta-data/tags/instance/{key}"))
                .await?
            {
                tags.push((key.to_string(), value));
            }
        }
        Ok(Some(tags))
    }

    /// `Terminated` when the autoscaling group is terminating this instance (with a lifecycle
    /// hook, it waits for us); `None` outside a group.
    async fn target_lifecycle_state(&self) -> Result<Option<String>, ImdsError> {
        self.get("/latest/meta-data/autoscaling/target-lifecycle-state")
            .await
    }

    /// The spot interruption notice (`{"action": "terminate", "time": …}`); `None` until one.
    async fn spot_instance_action(&self) -> Result<Option<String>, ImdsError> {
        self.get("/latest/meta-data/spot/instance-action").await
    }

    /// The rebalance recommendation (`{"noticeTime": …}`); `None` until one.
    async fn rebalance_recommendation(&self) -> Result<Option<String>, ImdsError> {
        self.get("/latest/meta-data/events/recommendations/rebalance")
            .await
    }

    /// An item every EC2 instance has: a 404 is an error.
    async fn required(&self, path: &str) -> Result<String, ImdsError> {
        self.get(path).await?.ok_or_else(|| ImdsError {
            path: path.to_string(),
            endpoint: self.endpoint().to_string(),
            message: "not found (404), but every EC2 instance has it".into(),
            not_text: false,
        })
    }
}

/// aws-config's IMDSv2 client, replaced when IMDS refuses its token.
#[derive(Debug)]
pub struct AwsImds {
    client: std::sync::Mutex<aws_config::imds::Client>,
    endpoint: String,
}

impl AwsImds {
    pub fn new() -> Self {
        let endpoint = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string());
        AwsImds {
            client: std::sync::Mutex::new(Self::client()),
            endpoint,
        }
    }

    /// A client with an empty token cache.
    fn client() -> aws_config::imds::Client {
        aws_config::imds::Client::builder()
            // Boot-time IMDS can be briefly unreachable: retry timeouts too, not only 5xx/401.
            .retry_classifier(SharedRetryClassifier::new(
                ImdsResponseRetryClassifier::default().with_retry_connect_timeouts(true),
            ))
            .max_attempts(4)
            .connect_timeout(Duration::from_secs(1))
            // A busy metadata service (throttled at 1024 packets/s per instance) answers in
            // seconds, not milliseconds.
            .read_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(6))
            // Bounds the whole item, token fetches and retries included.
            .operation_timeout(Duration::from_secs(20))
            .build()
    }

    fn current(&self) -> aws_config::imds::Client {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Default for AwsImds {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Imds for AwsImds {
    async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let mut answer = self.current().get(path).await;
        if matches!(&answer, Err(SdkImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 401)
        {
            // IMDS no longer takes the cached token (aws-config retried with it): a new client
            // asks for a new one.
            tracing::debug!(
                path,
                "IMDS refused the session token (401): fetching a new one"
            );
            let fresh = Self::client();
            *self.client.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
            answer = fresh.get(path).await;
        }
        match answer {
            Ok(value) => Ok(Some(value.as_ref().to_string())),
            Err(SdkImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => {
                Ok(None)
            }
            Err(e) => Err(ImdsError {
                path: path.to_string(),
                endpoint: self.endpoint.clone(),
                // aws-config's client reads every answer as text and says so when it is not.
                not_text: matches!(e, SdkImdsError::Unexpected(_))
                    && e.to_string().contains("UTF-8"),
                message: describe(&e),
            }),
        }
    }

    fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

fn describe(e: &SdkImdsError) -> String {
    let chain = crate::aws::describe(e);
    match e {
        SdkImdsError::ErrorResponse(r) => {
            format!("IMDS answered HTTP {}", r.response().status().as_u16())
        }
        SdkImdsError::FailedToLoadToken(_) => format!(
            "no IMDSv2 session token ({chain}); is the metadata service enabled \
             (HttpEndpoint=enabled) and, from a container, the hop limit at least 2?"
        ),
        _ => format!("unreachable after retries ({chain})"),
    }
}
