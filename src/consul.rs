//! Consul boundary: owns the requests to the node's local Consul agent HTTP API
//! (`consul.api`, by default http://127.0.0.1:8500) — node maintenance mode and leaving the
//! cluster, the two things a drain asks of it. Each request is bounded (2 s) and retried
//! (3 attempts, jittered backoff).

use crate::retry::Backoff;
use anyhow::Context;
use async_trait::async_trait;
use std::time::Duration;

const ATTEMPTS: u32 = 3;

#[async_trait]
pub trait ConsulAgent: Send + Sync {
    /// `PUT /v1/agent/maintenance`: every service of this node critical (enable) or back.
    async fn maintenance(&self, enable: bool, reason: &str) -> anyhow::Result<()>;
    /// `PUT /v1/agent/leave`: leave the cluster gracefully, before the agent stops.
    async fn leave(&self) -> anyhow::Result<()>;
}

pub struct HttpConsul {
    http: reqwest::Client,
    base: String,
}

impl HttpConsul {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            // Loopback API: never through a proxy from the environment.
            .no_proxy()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .build()
            .context("cannot build the HTTP client for the Consul agent")?;
        Ok(HttpConsul {
            http,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    async fn put(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let mut attempt = 1;
        loop {
            let sent = self.http.put(&url).query(query).send().await;
            let result = match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let code = r.status();
                    let body = r.text().await.unwrap_or_default();
                    Err(anyhow::anyhow!("answered {code}: {}", body.trim()))
                }
                Err(e) => Err(anyhow::Error::new(e)),
            };
            if attempt >= ATTEMPTS {
                return result.with_context(|| {
                    format!("PUT {url} failed {ATTEMPTS} times; is the Consul agent running (consul.api)?")
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
        self.put(
            "/v1/agent/maintenance",
            &[("enable", enable), ("reason", reason)],
        )
        .await
    }

    async fn leave(&self) -> anyhow::Result<()> {
        self.put("/v1/agent/leave", &[]).await
    }
}
