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

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HostConfig,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    EventsOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::{ClientVersion, API_DEFAULT_VERSION};
use futures_util::stream::{self, BoxStream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::future::{ready, Future};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};

/// Time limit of one call to the engine (connection and version negotiation included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Used when the engine cannot be asked: what Debian's docker.io 20.10 speaks.
const FALLBACK_API: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// bollard's own per-request limit. Ours ([`CALL_TIMEOUT`], wrapped around every call) is the
/// one that counts; bollard's must not cut a long stop short.
const BOLLARD_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// Where bollard connects without DOCKER_HOST.
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Docker's "never" timestamp (`StartedAt` of a container never started).
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

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

/// The connection state shared by the calls and the event streams.
struct Engine {
    host: String,
    /// Set once the engine has told its version.
    negotiated: OnceLock<bollard::Docker>,
    /// Used while the engine cannot be asked.
    pinned: OnceLock<bollard::Docker>,
}

impl Engine {
    /// The client for the next request: the negotiated one, else (negotiation failing again)
    /// the one pinned at [`FALLBACK_API`].
    async fn client(&self) -> anyhow::Result<bollard::Docker> {
        if let Some(client) = self.negotiated.get() {
            return Ok(client.clone());
        }
        match self.negotiate().await {
            Ok(client) => Ok(client),
            Err(e) => {
                debug!(
                    "Docker engine at {}: version negotiation failed, using API {}.{}: {e:#}",
                    self.host, FALLBACK_API.major_version, FALLBACK_API.minor_version
                );
                if let Some(client) = self.pinned.get() {
                    return Ok(client.clone());
                }
                let client = bollard_client(&self.host, &FALLBACK_API)
                    .map_err(|e| engine_error(&self.host, e))?;
                Ok(self.pinned.get_or_init(|| client).clone())
            }
        }
    }

    async fn negotiate(&self) -> anyhow::Result<bollard::Docker> {
        let client = bollard_client(&self.host, API_DEFAULT_VERSION)
            .map_err(|e| engine_error(&self.host, e))?;
        let client = client
            .negotiate_version()
            .await
            .map_err(|e| engine_error(&self.host, e))
            .context("cannot negotiate the Engine API version")?;
        let version = client.client_version();
        debug!(
            "Docker engine at {}: using Engine API {}.{}",
            self.host, version.major_version, version.minor_version
        );
        Ok(self.negotiated.get_or_init(|| client).clone())
    }

    /// Runs `call` within `limit`, naming what timed out.
    async fn within<T>(
        &self,
        limit: Duration,
        what: impl FnOnce() -> String,
        call: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(anyhow!(
                "{} timed out after {limit:?}: the Docker engine at {} is not answering \
                 (check `systemctl status docker` and `journalctl -u docker`)",
                what(),
                self.host
            )),
        }
    }

    async fn ping(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .ping()
            .await
            .map_err(|e| engine_error(&self.host, e))?;
        Ok(())
    }

    async fn list(&self, labels: &[(String, String)]) -> anyhow::Result<Vec<ContainerInfo>> {
        let client = self.client().await?;
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                label_filters(labels),
            )])),
            ..Default::default()
        };
        let summaries = client
            .list_containers(Some(options))
            .await
            .map_err(|e| engine_error(&self.host, e))
            .with_context(|| format!("cannot list containers with {}", describe_labels(labels)))?;
        // The summaries lack exit code, OOM flag and times: inspect each one (a handful). One
        // removed in between is simply not listed.
        let mut infos = Vec::with_capacity(summaries.len());
        for id in summaries.into_iter().filter_map(|s| s.id) {
            if let Some(info) = self.inspect(&client, &id).await? {
                infos.push(info);
            }
        }
        Ok(infos)
    }

    async fn run(&self, spec: &ContainerSpec) -> anyhow::Result<String> {
        let image = &spec.image;
        let client = self.client().await?;
        let created = match client.create_container(None, create_body(spec)).await {
            Ok(created) => created,
            Err(e) => {
                let missing = status(&e) == Some(404);
                return Err(engine_error(&self.host, e)).with_context(|| {
                    if missing {
                        format!(
                            "image {image} is not in the Docker engine at {}: nodeagent never \
                             pulls; pull it (`docker pull {image}`) or load it (`docker load -i \
                             FILE`)",
                            self.host
                        )
                    } else {
                        format!("cannot create a container from image {image}")
                    }
                });
            }
        };
        let id = created.id;
        for warning in &created.warnings {
            warn!("Docker engine, creating container {id} from image {image}: {warning}");
        }
        if let Err(e) = client.start_container(&id, None).await {
            let error = engine_error(&self.host, e)
                .context(format!("cannot start container {id} (image {image})"));
            // Leave nothing half-made behind.
            if let Err(cleanup) = self.remove(&client, &id).await {
                warn!("{cleanup:#}");
            }
            return Err(error);
        }
        Ok(id)
    }

    async fn stop_and_remove(&self, id: &str, grace: Duration) -> anyhow::Result<()> {
        let client = self.client().await?;
        let options = StopContainerOptions {
            t: Some(grace_secs(grace)),
            ..Default::default()
        };
        // 304 (not running) counts as success in bollard.
        match client.stop_container(id, Some(options)).await {
            Ok(()) => self.remove(&client, id).await,
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(engine_error(&self.host, e))
                .with_context(|| format!("cannot stop container {id}")),
        }
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> anyhow::Result<String> {
        let client = self.client().await?;
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut logs = client.logs(id, Some(options));
        let mut bytes = Vec::new();
        while let Some(chunk) = logs.next().await {
            let chunk = chunk
                .map_err(|e| engine_error(&self.host, e))
                .with_context(|| format!("cannot read the logs of container {id}"))?;
            bytes.extend_from_slice(chunk.as_ref());
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn inspect(
        &self,
        client: &bollard::Docker,
        id: &str,
    ) -> anyhow::Result<Option<ContainerInfo>> {
        match client.inspect_container(id, None).await {
            Ok(response) => Ok(Some(info_from(response))),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(engine_error(&self.host, e))
                .with_context(|| format!("cannot inspect container {id}")),
        }
    }

    /// Forced removal (with the container's anonymous volumes); missing is fine.
    async fn remove(&self, client: &bollard::Docker, id: &str) -> anyhow::Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            // Anonymous volumes (image VOLUMEs) only: they would pile up at every restart.
            v: true,
            ..Default::default()
        };
        match client.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            // Someone else is removing it already: it will be gone.
            Err(e) if status(&e) == Some(409) && e.to_string().contains("already in progress") => {
                Ok(())
            }
            Err(e) => Err(engine_error(&self.host, e))
                .with_context(|| format!("cannot remove container {id}")),
        }
    }
}

/// A bollard client for `host` speaking `version`. Does not touch the engine, except that a
/// unix socket must exist.
fn bollard_client(host: &str, version: &ClientVersion) -> Result<bollard::Docker, BollardError> {
    if host.starts_with("unix://") {
        bollard::Docker::connect_with_unix(host, BOLLARD_TIMEOUT_SECS, version)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        bollard::Docker::connect_with_http(host, BOLLARD_TIMEOUT_SECS, version)
    } else {
        Err(BollardError::UnsupportedURISchemeError {
            uri: host.to_string(),
        })
    }
}

/// The HTTP status of an engine answer, if the error is one.
fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// A bollard error as a message that says where and, for an unreachable engine, what to check.
/// No Docker engine listens where nodeagent looks (the socket is missing, or refuses).
#[derive(Debug, thiserror::Error)]
#[error("the Docker engine socket {0} does not exist or refuses connections: is dockerd running? (check `systemctl status docker`)")]
pub struct EngineAbsent(pub String);

fn engine_error(host: &str, e: BollardError) -> anyhow::Error {
    match e {
        BollardError::SocketNotFoundError(path) => anyhow!(EngineAbsent(path)),
        BollardError::IOError { err } if err.kind() == std::io::ErrorKind::ConnectionRefused => {
            anyhow!(EngineAbsent(host.to_string()))
        }
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => anyhow!("the Docker engine at {host} answered {status_code}: {message}"),
        e @ (BollardError::HyperLegacyError { .. }
        | BollardError::IOError { .. }
        | BollardError::RequestTimeoutError) => anyhow!(e).context(format!(
            "cannot reach the Docker engine at {host}: is dockerd running? \
             (check `systemctl status docker`)"
        )),
        e => anyhow!(e).context(format!("Docker engine at {host}")),
    }
}

fn label_filters(labels: &[(String, String)]) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn describe_labels(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        "any labels".to_string()
    } else {
        format!("labels {}", label_filters(labels).join(","))
    }
}

fn info_from(response: ContainerInspectResponse) -> ContainerInfo {
    let state = response.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let when = |t: Option<String>| t.filter(|t| !t.is_empty() && t != ZERO_TIME);
    ContainerInfo {
        id: response.id.unwrap_or_default(),
        labels: response
            .config
            .and_then(|c| c.labels)
            .unwrap_or_default()
            .into_iter()
            .collect(),
        running,
        exit_code: if running { None } else { state.exit_code },
        oom_killed: state.oom_killed.unwrap_or(false),
        started_at: when(state.started_at),
        finished_at: when(state.finished_at),
    }
}

fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        // Some(vec![]) is sent as `[]`, which the engine takes as "no entrypoint".
        entrypoint: spec.entrypoint.clone(),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(spec.labels.clone().into_iter().collect()),
        host_config: Some(HostConfig {
            // Host network: the foundational services (Consul agent, proxy) serve the node's
            // own addresses and ports, as on the node before; and the engines here run with
            // --bridge=none.
            network_mode: Some("host".to_string()),
            // No restart policy: the supervisor decides about restarts (backoff, logging,
            // giving up); an engine restarting behind its back would race with it.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            // An init process as PID 1: a command as PID 1 gets no default signal handlers,
            // so SIGTERM would be ignored and every stop would cost the whole grace period;
            // init forwards signals and reaps zombies.
            init: Some(true),
            binds: Some(spec.binds.clone()),
            memory: spec.memory_bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn event_from(message: EventMessage) -> Option<DockerEvent> {
    if message.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let actor = message.actor?;
    let id = actor.id?;
    match message.action.as_deref()? {
        "start" => Some(DockerEvent::Started { id }),
        "die" => {
            let exit_code = actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("exitCode"))
                .and_then(|c| c.parse().ok());
            Some(DockerEvent::Died { id, exit_code })
        }
        "oom" => Some(DockerEvent::Oom { id }),
        "destroy" => Some(DockerEvent::Destroyed { id }),
        _ => None,
    }
}

/// Seconds for the engine's stop timeout: rounded up, so a grace is never shortened.
fn grace_secs(grace: Duration) -> i32 {
    let secs = grace
        .as_secs()
        .saturating_add(u64::from(grace.subsec_nanos() > 0));
    i32::try_from(secs).unwrap_or(i32::MAX)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn message(
        typ: EventMessageTypeEnum,
        action: &str,
        attributes: &[(&str, &str)],
    ) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.to_string()),
            actor: Some(EventActor {
                id: Some("abc".to_string()),
                attributes: Some(
                    attributes
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn maps_container_events_only() {
        use EventMessageTypeEnum::*;
        let id = "abc".to_string();
        assert_eq!(
            event_from(message(CONTAINER, "die", &[("exitCode", "3")])),
            Some(DockerEvent::Died {
                id: id.clone(),
                exit_code: Some(3)
            })
        );
        assert_eq!(
            event_from(message(CONTAINER, "die", &[])),
            Some(DockerEvent::Died {
                id: id.clone(),
                exit_code: None
            })
        );
        assert_eq!(
            event_from(message(CONTAINER, "start", &[])),
            Some(DockerEvent::Started { id: id.clone() })
        );
        assert_eq!(
            event_from(message(CONTAINER, "oom", &[])),
            Some(DockerEvent::Oom { id: id.clone() })
        );
        assert_eq!(
            event_from(message(CONTAINER, "destroy", &[])),
            Some(DockerEvent::Destroyed { id })
        );
        assert_eq!(event_from(message(CONTAINER, "exec_die", &[])), None);
        assert_eq!(event_from(message(IMAGE, "die", &[])), None);
    }

    #[test]
    fn grace_rounds_up_to_whole_seconds() {
        assert_eq!(grace_secs(Duration::ZERO), 0);
        assert_eq!(grace_secs(Duration::from_millis(1500)), 2);
        assert_eq!(grace_secs(Duration::from_secs(30)), 30);
        assert_eq!(grace_secs(Duration::MAX), i32::MAX);
    }

    #[test]
    fn spec_becomes_host_network_init_and_no_restart() {
        let body = create_body(&ContainerSpec {
            image: "x:1".into(),
            entrypoint: Some(vec![]),
            env: BTreeMap::from([("A".into(), "b".into())]),
            memory_bytes: Some(1 << 26),
            ..Default::default()
        });
        assert_eq!(body.cmd, None);
        assert_eq!(body.entrypoint, Some(vec![]));
        assert_eq!(body.env, Some(vec!["A=b".to_string()]));
        let host = body.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        assert_eq!(host.init, Some(true));
        assert_eq!(
            host.restart_policy.and_then(|p| p.name),
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(host.memory, Some(1 << 26));
    }
}
