//! Consul boundary: owns the requests to the node's local Consul agent HTTP API
//! (`consul.api`, by default http://127.0.0.1:8500) — node maintenance mode and leaving the
//! cluster, the two things a drain asks of it. Maintenance is bounded (2 s) and retried (3
//! attempts, jittered backoff); leave is asked once, bounded at 20 s.

use crate::retry::Backoff;
use anyhow::Context;
use async_trait::async_trait;
use std::time::Duration;

const ATTEMPTS: u32 = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const LEAVE_TIMEOUT: Duration = Duration::from_secs(20);

#[async_trait]
pub trait ConsulAgent: Send + Sync {
    /// `PUT /v1/agent/maintenance`: every service of this node critical (enable) or back.
    async fn maintenance(&self, enable: bool, reason: &str) -> anyhow::Result<()>;
    /// `PUT /v1/agent/leave`: leave the cluster gracefully; the agent exits afterwards.
    async fn leave(&self) -> anyhow::Result<()>;
}

pub struct HttpConsul {
    http: reqwest::Client,
    base: String,
}

impl HttpConsul {
    pub fn new(base: &url::Url) -> anyhow::Result<Self> {
        Ok(HttpConsul {
            http: crate::http::local_client(Duration::from_millis(500), None)?,
            base: base.as_str().trim_end_matches('/').to_string(),
        })
    }

    /// `attempts` tries, each bounded by `timeout`.
    async fn put(
        &self,
        path: &str,
        query: &[(&str, &str)],
        attempts: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let mut attempt = 1;
        loop {
            let sent = self
                .http
                .put(&url)
                .query(query)
                .timeout(timeout)
                .send()
                .await;
            let result = match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let code = r.status();
                    let body = r.text().await.unwrap_or_default();
                    Err(anyhow::anyhow!("answered {code}: {}", body.trim()))
                }
                Err(e) => Err(anyhow::Error::new(e)),
            };
            if attempt >= attempts {
                return result.with_context(|| {
                    format!("PUT {url} failed ({attempts} attempts); is the Consul agent running (consul.api)?")
                });
            }
            attempt += 1;
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

#[async_trait]
impl ConsulAgent for HttpConsul {
    async fn maintenance(&self, enable: bool, reason: &str) -> anyhow::Result<()> {
        let enable = if enable { "true" } else { "false" };
        let query = [("enable", enable), ("reason", reason)];
        self.put("/v1/agent/maintenance", &query, ATTEMPTS, REQUEST_TIMEOUT)
            .await
    }

    /// Once, and given time: a graceful leave waits for the gossip to spread, then the agent
    /// exits (a retry would find it gone).
    async fn leave(&self) -> anyhow::Result<()> {
        self.put("/v1/agent/leave", &[], 1, LEAVE_TIMEOUT).await
    }
}
