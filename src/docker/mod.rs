//! Docker Engine boundary: owns every call nodeagent makes to the local Docker Engine — list,
//! inspect, run, stop, remove and tail the logs of containers, and follow container events.
//!
//! Containers are found by the labels the caller gives; this module invents none. Images are
//! never pulled (there may be no registry): a missing image is an error naming it.
//!
//! API version: the engine on the nodes is Debian's docker.io 20.10, which speaks Engine API
//! 1.41 at most, while bollard defaults to a newer one. [`BollardDocker::connect`] negotiates
//! (`GET /version`) at connect time. Connecting never fails because the engine is down: the
//! calls then use a client pinned at 1.41, and negotiation is tried again before each call
//! until it succeeds once (so an engine that starts later, of any version, is talked to in
//! its own version). Note: bollard 0.21.1 actually sends unversioned paths (`/containers/json`,
//! its URL join drops the `/vX.Y` prefix), which every engine answers in its own newest
//! version; the negotiated version keeps this correct should bollard start sending it.
//!
//! Every call has a time limit ([`CALL_TIMEOUT`]; stopping gets the grace period on top), and
//! every error names the engine and the container or image concerned.

mod engine;

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::EventsOptions;
use engine::{
    bollard_client, describe_labels, engine_error, event_from, label_filters, Engine, DEFAULT_HOST,
    FALLBACK_API,
};
use futures_util::stream::{self, BoxStream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::future::ready;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::debug;

/// Time limit of one call to the engine (connection and version negotiation included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run. Host paths in `binds` are already final (the caller applied --root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    pub image: String,
    /// Empty: the image's default command.
    pub command: Vec<String>,
    /// `None`: the image's entrypoint; `Some(vec![])`: no entrypoint at all.
    pub entrypoint: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// "host:container[:ro]".
    pub binds: Vec<String>,
    pub memory_bytes: Option<i64>,
    pub labels: BTreeMap<String, String>,
}

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// As the engine reports them: the image's labels, then the container's.
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    /// Only when not running.
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    /// RFC 3339, as Docker reports it; `None` if it never started.
    pub started_at: Option<String>,
    /// RFC 3339, as Docker reports it; `None` if it never finished.
    pub finished_at: Option<String>,
    /// How it was made: the image as named at creation, its command, entrypoint and
    /// environment (the image's and the container's), its bind mounts.
    pub made: Made,
}

/// What a container was created with, as the engine reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Made {
    pub image: String,
    pub command: Vec<String>,
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub binds: Vec<String>,
}

/// Container events (no other kind is reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerEvent {
    Started { id: String },
    Died { id: String, exit_code: Option<i64> },
    Oom { id: String },
    Destroyed { id: String },
}

#[async_trait]
pub trait Docker: Send + Sync {
    async fn ping(&self) -> anyhow::Result<()>;
    /// All containers (running or not) carrying every label `key=value` given.
    async fn list(&self, labels: &[(String, String)]) -> anyhow::Result<Vec<ContainerInfo>>;
    /// `None` when the container does not exist (any more).
    async fn inspect(&self, id: &str) -> anyhow::Result<Option<ContainerInfo>>;
    /// Create and start; host network, no restart policy, an init process. Returns the id.
    async fn run(&self, spec: &ContainerSpec) -> anyhow::Result<String>;
    /// Stop with a grace period, then remove (force); a missing container is not an error.
    async fn stop_and_remove(&self, id: &str, grace: Duration) -> anyhow::Result<()>;
    /// The last `lines` lines of stdout+stderr.
    async fn logs_tail(&self, id: &str, lines: usize) -> anyhow::Result<String>;
    /// Sends `signal` (`SIGHUP`) to a running container.
    async fn kill(&self, id: &str, signal: &str) -> anyhow::Result<()>;
    /// Container events for containers carrying every given label, from now on. The stream ends
    /// (or yields an Err, then ends) when the engine goes away; the caller reconnects.
    fn events(
        &self,
        labels: &[(String, String)],
    ) -> BoxStream<'static, anyhow::Result<DockerEvent>>;
}

/// The real engine, through bollard.
pub struct BollardDocker {
    engine: Arc<Engine>,
}

impl BollardDocker {
    /// Connects through bollard's local defaults (DOCKER_HOST, else /var/run/docker.sock).
    /// Does not fail when the engine is down (see the module documentation).
    pub async fn connect() -> anyhow::Result<Self> {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_HOST.to_string());
        Self::connect_to(&host).await
    }

    /// Connects to the engine at `host` ("unix:///path/docker.sock", "tcp://host:port").
    /// Negotiates the API version now if the engine answers; fails only for an address that
    /// can never work (unsupported scheme).
    pub async fn connect_to(host: &str) -> anyhow::Result<Self> {
        let engine = Arc::new(Engine {
            host: host.to_string(),
            negotiated: OnceLock::new(),
            pinned: OnceLock::new(),
        });
        // An unusable address is a configuration error: report it now, not at every call.
        if let Err(e @ BollardError::UnsupportedURISchemeError { .. }) =
            bollard_client(host, &FALLBACK_API)
        {
            return Err(anyhow!(e)).with_context(|| {
                format!(
                    "cannot use Docker engine address {host:?}: use unix:///PATH or \
                     tcp://HOST:PORT (DOCKER_HOST)"
                )
            });
        }
        match tokio::time::timeout(CALL_TIMEOUT, engine.negotiate()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(
                    "Docker engine at {host}: no version negotiation yet, using API {}.{} \
                     until it answers: {e:#}",
                    FALLBACK_API.major_version, FALLBACK_API.minor_version
                );
            }
            Err(_) => {
                debug!(
                    "Docker engine at {host}: version negotiation timed out after {CALL_TIMEOUT:?}"
                );
            }
        }
        Ok(BollardDocker { engine })
    }

    /// The engine address, for messages.
    pub fn host(&self) -> &str {
        &self.engine.host
    }
}

/// No Docker engine listens where nodeagent looks (the socket is missing, or refuses).
#[derive(Debug, thiserror::Error)]
#[error("the Docker engine socket {0} does not exist or refuses connections: is dockerd running? (check `systemctl status docker`)")]
pub struct EngineAbsent(pub String);

#[async_trait]
impl Docker for BollardDocker {
    async fn ping(&self) -> anyhow::Result<()> {
        let engine = &self.engine;
        engine
            .within(CALL_TIMEOUT, || "ping".to_string(), engine.ping())
            .await
    }

    async fn list(&self, labels: &[(String, String)]) -> anyhow::Result<Vec<ContainerInfo>> {
        let engine = &self.engine;
        let what = || format!("listing containers with {}", describe_labels(labels));
        engine.within(CALL_TIMEOUT, what, engine.list(labels)).await
    }

    async fn inspect(&self, id: &str) -> anyhow::Result<Option<ContainerInfo>> {
        let engine = &self.engine;
        let what = || format!("inspecting container {id}");
        let call = async { engine.inspect(&engine.client().await?, id).await };
        engine.within(CALL_TIMEOUT, what, call).await
    }

    async fn run(&self, spec: &ContainerSpec) -> anyhow::Result<String> {
        let engine = &self.engine;
        let what = || format!("starting a container from image {}", spec.image);
        engine.within(CALL_TIMEOUT, what, engine.run(spec)).await
    }

    async fn stop_and_remove(&self, id: &str, grace: Duration) -> anyhow::Result<()> {
        let engine = &self.engine;
        let what = || format!("stopping container {id} (grace {grace:?})");
        let call = engine.stop_and_remove(id, grace);
        engine
            .within(grace.saturating_add(CALL_TIMEOUT), what, call)
            .await
    }

    async fn kill(&self, id: &str, signal: &str) -> anyhow::Result<()> {
        let engine = &self.engine;
        let what = || format!("sending {signal} to container {id}");
        engine
            .within(CALL_TIMEOUT, what, engine.kill(id, signal))
            .await
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> anyhow::Result<String> {
        let engine = &self.engine;
        let what = || format!("reading the logs of container {id}");
        engine
            .within(CALL_TIMEOUT, what, engine.logs_tail(id, lines))
            .await
    }

    fn events(
        &self,
        labels: &[(String, String)],
    ) -> BoxStream<'static, anyhow::Result<DockerEvent>> {
        let engine = Arc::clone(&self.engine);
        let what = format!("container events for {}", describe_labels(labels));
        // "From now on" means from this call, not from the first poll: a container that
        // starts and dies in between must still be reported. The engine is local, so its
        // clock is ours.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let options = EventsOptions {
            since: Some(format!("{}.{:09}", now.as_secs(), now.subsec_nanos())),
            filters: Some(HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                (
                    "event".to_string(),
                    ["start", "die", "oom", "destroy"]
                        .map(String::from)
                        .to_vec(),
                ),
                ("label".to_string(), label_filters(labels)),
            ])),
            ..Default::default()
        };
        let connect = async move {
            let connecting = || format!("connecting for {what}");
            let client = engine
                .within(CALL_TIMEOUT, connecting, engine.client())
                .await
                .with_context(|| format!("cannot follow {what}"))?;
            Ok::<_, anyhow::Error>((client, engine, what))
        };
        stream::once(connect)
            .flat_map(move |connected| match connected {
                Ok((client, engine, what)) => client
                    .events(Some(options.clone()))
                    .map(move |message| match message {
                        Ok(message) => Ok(event_from(message)),
                        Err(e) => Err(engine_error(&engine.host, e))
                            .with_context(|| format!("{what}: the stream broke")),
                    })
                    .boxed(),
                Err(e) => stream::iter([Err(e)]).boxed(),
            })
            // Nothing after an error: the caller reconnects.
            .scan(false, |failed, item| {
                if *failed {
                    return ready(None);
                }
                *failed = item.is_err();
                ready(Some(item))
            })
            .filter_map(|item| ready(item.transpose()))
            .boxed()
    }
}
