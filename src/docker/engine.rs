//! The engine behind [`super::BollardDocker`]: bollard clients (negotiated or pinned to the
//! fallback API version), each call's error naming the engine, and the translations between
//! bollard's models and the boundary's types.

use super::{ContainerInfo, ContainerSpec, DockerEvent, EngineAbsent, Made};
use anyhow::{anyhow, Context};
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HostConfig,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use bollard::{ClientVersion, API_DEFAULT_VERSION};
use futures_util::stream::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;
use tracing::{debug, warn};

/// Used when the engine cannot be asked: what Debian's docker.io 20.10 speaks.
pub(super) const FALLBACK_API: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// bollard's own per-request limit. Ours ([`CALL_TIMEOUT`], wrapped around every call) is the
/// one that counts; bollard's must not cut a long stop short.
pub(super) const BOLLARD_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// Where bollard connects without DOCKER_HOST.
pub(super) const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Docker's "never" timestamp (`StartedAt` of a container never started).
pub(super) const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The connection state shared by the calls and the event streams.
pub(super) struct Engine {
    pub(super) host: String,
    /// Set once the engine has told its version.
    pub(super) negotiated: OnceLock<bollard::Docker>,
    /// Used while the engine cannot be asked.
    pub(super) pinned: OnceLock<bollard::Docker>,
}

impl Engine {
    /// The client for the next request: the negotiated one, else (negotiation failing again)
    /// the one pinned at [`FALLBACK_API`].
    pub(super) async fn client(&self) -> anyhow::Result<bollard::Docker> {
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

    pub(super) async fn negotiate(&self) -> anyhow::Result<bollard::Docker> {
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
    pub(super) async fn within<T>(
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

    pub(super) async fn ping(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .ping()
            .await
            .map_err(|e| engine_error(&self.host, e))?;
        Ok(())
    }

    pub(super) async fn list(
        &self,
        labels: &[(String, String)],
    ) -> anyhow::Result<Vec<ContainerInfo>> {
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

    pub(super) async fn run(&self, spec: &ContainerSpec) -> anyhow::Result<String> {
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

    pub(super) async fn stop_and_remove(&self, id: &str, grace: Duration) -> anyhow::Result<()> {
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

    pub(super) async fn kill(&self, id: &str, signal: &str) -> anyhow::Result<()> {
        let client = self.client().await?;
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        client
            .kill_container(id, Some(options))
            .await
            .map_err(|e| engine_error(&self.host, e))
            .with_context(|| format!("cannot send {signal} to container {id}"))
    }

    pub(super) async fn logs_tail(&self, id: &str, lines: usize) -> anyhow::Result<String> {
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

    pub(super) async fn inspect(
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
    pub(super) async fn remove(&self, client: &bollard::Docker, id: &str) -> anyhow::Result<()> {
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
pub(super) fn bollard_client(
    host: &str,
    version: &ClientVersion,
) -> Result<bollard::Docker, BollardError> {
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
pub(super) fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// A bollard error as a message that says where and, for an unreachable engine, what to check.
pub(super) fn engine_error(host: &str, e: BollardError) -> anyhow::Error {
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

pub(super) fn label_filters(labels: &[(String, String)]) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

pub(super) fn describe_labels(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        "any labels".to_string()
    } else {
        format!("labels {}", label_filters(labels).join(","))
    }
}

pub(super) fn info_from(response: ContainerInspectResponse) -> ContainerInfo {
    let state = response.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let when = |t: Option<String>| t.filter(|t| !t.is_empty() && t != ZERO_TIME);
    let config = response.config.unwrap_or_default();
    let made = Made {
        image: config.image.clone().unwrap_or_default(),
        command: config.cmd.clone().unwrap_or_default(),
        entrypoint: config.entrypoint.clone().unwrap_or_default(),
        env: config.env.clone().unwrap_or_default(),
        binds: response
            .host_config
            .and_then(|h| h.binds)
            .unwrap_or_default(),
    };
    ContainerInfo {
        id: response.id.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        made,
        running,
        exit_code: if running { None } else { state.exit_code },
        oom_killed: state.oom_killed.unwrap_or(false),
        started_at: when(state.started_at),
        finished_at: when(state.finished_at),
    }
}

pub(super) fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
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

pub(super) fn event_from(message: EventMessage) -> Option<DockerEvent> {
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
pub(super) fn grace_secs(grace: Duration) -> i32 {
    let secs = grace
        .as_secs()
        .saturating_add(u64::from(grace.subsec_nanos() > 0));
    i32::try_from(secs).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;
    use std::collections::BTreeMap;

    pub(super) fn message(
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
    pub(super) fn maps_container_events_only() {
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
    pub(super) fn grace_rounds_up_to_whole_seconds() {
        assert_eq!(grace_secs(Duration::ZERO), 0);
        assert_eq!(grace_secs(Duration::from_millis(1500)), 2);
        assert_eq!(grace_secs(Duration::from_secs(30)), 30);
        assert_eq!(grace_secs(Duration::MAX), i32::MAX);
    }

    #[test]
    pub(super) fn spec_becomes_host_network_init_and_no_restart() {
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
