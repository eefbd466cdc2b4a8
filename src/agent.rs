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

/// A task as the local agent knows it (`GET /v1/tasks`): what runs on this instance, known at
/// once — unlike ECS's `ListTasks`, which is eventually consistent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentTask {
    #[serde(rename = "Arn")]
    pub arn: String,
    #[serde(rename = "Family", default)]
    pub family: String,
    #[serde(rename = "DesiredStatus", default)]
    pub desired_status: String,
    #[serde(rename = "KnownStatus", default)]
    pub known_status: String,
}

impl AgentTask {
    /// Running, or on its way: neither stopped nor being stopped.
    pub fn live(&self) -> bool {
        self.desired_status != "STOPPED" && self.known_status != "STOPPED"
    }
}

#[async_trait]
pub trait EcsAgent: Send + Sync {
    /// One request; an error when the agent is not (yet) answering.
    async fn metadata(&self) -> anyhow::Result<AgentMetadata>;
    /// The tasks the agent runs on this instance (`GET /v1/tasks`).
    async fn tasks(&self) -> anyhow::Result<Vec<AgentTask>>;
    /// The endpoint asked (for messages).
    fn url(&self) -> &str;
}

pub struct HttpAgent {
    http: reqwest::Client,
    url: String,
    tasks_url: String,
}

impl HttpAgent {
    /// `base` is the introspection URL, e.g. "http://localhost:51678".
    pub fn new(base: &url::Url) -> anyhow::Result<Self> {
        let http =
            crate::http::local_client(Duration::from_millis(500), Some(Duration::from_secs(2)))?;
        let base = base.as_str().trim_end_matches('/');
        Ok(HttpAgent {
            http,
            url: format!("{base}/v1/metadata"),
            tasks_url: format!("{base}/v1/tasks"),
        })
    }
}

#[async_trait]
impl EcsAgent for HttpAgent {
    async fn metadata(&self) -> anyhow::Result<AgentMetadata> {
        let response = self.http.get(&self.url).send().await?.error_for_status()?;
        Ok(response.json().await?)
    }

    async fn tasks(&self) -> anyhow::Result<Vec<AgentTask>> {
        #[derive(Deserialize)]
        struct Tasks {
            #[serde(rename = "Tasks", default)]
            tasks: Option<Vec<AgentTask>>,
        }
        let response = self
            .http
            .get(&self.tasks_url)
            .send()
            .await?
            .error_for_status()?;
        // The agent sends no content type for it: read the JSON as such.
        let body = response.bytes().await?;
        Ok(serde_json::from_slice::<Tasks>(&body)?
            .tasks
            .unwrap_or_default())
    }

    fn url(&self) -> &str {
        &self.url
    }
}
