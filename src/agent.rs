//! ECS container agent boundary: owns the requests to the agent's local introspection API
//! (`GET /v1/metadata`, by default on http://localhost:51678).

use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;

/// What the agent says about itself (`GET /v1/metadata`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentMetadata {
    #[serde(rename = "Cluster")]
    pub cluster: String,
    /// Absent or null until the agent has registered the container instance.
    #[serde(rename = "ContainerInstanceArn", default)]
    pub container_instance_arn: Option<String>,
    #[serde(rename = "Version", default)]
    pub version: Option<String>,
}

#[async_trait]
pub trait EcsAgent: Send + Sync {
    /// One request; an error when the agent is not (yet) answering.
    async fn metadata(&self) -> anyhow::Result<AgentMetadata>;
    /// The endpoint asked (for messages).
    fn url(&self) -> &str;
}

pub struct HttpAgent {
    http: reqwest::Client,
    url: String,
}

impl HttpAgent {
    /// `base` is the introspection URL, e.g. "http://localhost:51678".
    pub fn new(base: &url::Url) -> anyhow::Result<Self> {
        let http =
            crate::http::local_client(Duration::from_millis(500), Some(Duration::from_secs(2)))?;
        Ok(HttpAgent {
            http,
            url: format!("{}/v1/metadata", base.as_str().trim_end_matches('/')),
        })
    }
}

#[async_trait]
impl EcsAgent for HttpAgent {
    async fn metadata(&self) -> anyhow::Result<AgentMetadata> {
        let response = self.http.get(&self.url).send().await?.error_for_status()?;
        Ok(response.json().await?)
    }

    fn url(&self) -> &str {
        &self.url
    }
}
