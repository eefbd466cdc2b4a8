//! Runtimes: own how the node's foundational tasks are made to run. Today: as ECS tasks on this
//! node's container instance ([`ecs`]), or as containers through the Docker API ([`docker`]).

pub mod docker;
pub mod ecs;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::Serialize;
use std::time::Duration;

/// One running (or finished) instance of a task: a container, an ECS task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub task: String,
    pub id: String,
    pub running: bool,
    pub exit: Option<Exit>,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exit {
    pub code: Option<i64>,
    pub reason: String,
}

/// Something the runtime noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The instance stopped (died, was killed, was removed).
    Exited { id: String, exit: Exit },
}

/// What runs the tasks (docker, ECS).
#[async_trait]
pub trait Runtime: Send + Sync {
    /// Every instance of our tasks, running or not, including tasks no longer configured.
    async fn instances(&self) -> anyhow::Result<Vec<Instance>>;
    async fn start(&self, task: &str) -> anyhow::Result<Instance>;
    /// Stops the instance (if running) and removes what is left of it.
    async fn stop(&self, instance: &Instance) -> anyhow::Result<()>;
    /// The last lines the instance wrote.
    async fn output_tail(&self, instance: &Instance, lines: usize) -> anyhow::Result<String>;
    /// Waits (at most `limit`) until a stopped instance has really stopped — for a runtime
    /// whose `stop` only asks (ECS `StopTask`).
    async fn wait_stopped(&self, _instance: &Instance, _limit: Duration) -> anyhow::Result<()> {
        Ok(())
    }
    /// Sends `signal` (`SIGHUP`) to a running instance, for a task that reloads its files.
    async fn signal(&self, _instance: &Instance, signal: &str) -> anyhow::Result<()> {
        anyhow::bail!("this runtime cannot send {signal} to a task: restart it instead")
    }
    /// Events from now on; the stream ends or errs when the runtime goes away.
    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>>;
}
