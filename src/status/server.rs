//! The status API: owns serving [`NodeStatus`] over HTTP/1.1 (hyper) — `GET /v1/status` (JSON),
//! `GET /metrics` (Prometheus text) and `POST /v1/drain` — on the agent's Unix socket, and
//! `GET /metrics` alone on the optional TCP metrics address.
//!
//! The socket is created mode 0660 (owner root, group `nodeagent` when that group exists), in
//! a directory created 0750 (same group) if missing. The node's lock ([`NodeLock`]) makes the
//! node one agent's: a socket left by a dead agent is replaced; a second agent is refused.

use super::{metrics, NodeStatus};
use crate::lifecycle::drain::DrainRequest;
use anyhow::{bail, Context as _};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

/// A client gets this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many connections are served at once; a new one sheds the oldest. A member of
/// group `nodeagent` holding thousands of half-sent requests must exhaust neither the agent's
/// file descriptors nor its memory, and `nodeagent status` (the newest) is still served.
const MAX_CONNECTIONS: usize = 32;
/// Request headers larger than this are refused (the requests are a line and a host).
const MAX_HEADERS: usize = 8 * 1024;
/// Permissions of the socket: root and the `nodeagent` group read the node's internals.
const SOCKET_MODE: u32 = 0o660;
/// Permissions of a socket directory nodeagent creates (tmpfiles.d normally does).
const DIR_MODE: u32 = 0o750;

/// What is served: the status as of the request.
pub type Snapshot = Arc<dyn Fn() -> NodeStatus + Send + Sync>;

/// The bound status socket, removed when the agent ends.
pub struct SocketGuard {
    path: PathBuf,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The one agent of a node: a lock (flock) on `path`, held for the agent's life whatever its
/// status socket is, so a second `nodeagent run` on the node is refused — even one told
/// another `status.socket` — and one that was killed leaves nothing that blocks the next.
pub struct NodeLock {
    _file: std::fs::File,
}

impl NodeLock {
    pub fn take(path: &Path) -> anyhow::Result<NodeLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening nodeagent's lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(NodeLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "another nodeagent runs on this node (it holds {}): stop it first (systemctl stop nodeagent)",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
            }
        }
    }
}

/// Binds the status socket at `path` (see the module doc); `group` owns it (and a directory
/// created for it) when given. The caller holds the node's lock ([`NodeLock`]): whatever is at
/// the path was left by an agent that is gone, and is replaced.
pub fn bind_unix(path: &Path, group: Option<u32>) -> anyhow::Result<(UnixListener, SocketGuard)> {
    let dir = path
        .parent()
        .with_context(|| format!("status socket {} has no directory", path.display()))?;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the status socket's directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(dir, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", dir.display()))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale status socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "removing the stale status socket {}",
                path.display()
            )))
        }
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the status socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!("giving the status socket {} to group {gid}", path.display())
        })?;
    }
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
        },
    ))
}

/// Serves `GET /v1/status`, `GET /metrics` and `POST /v1/drain` (handed to `drains`) on the
/// Unix socket until the task is dropped.
pub async fn serve_unix(
    listener: UnixListener,
    snapshot: Snapshot,
    drains: mpsc::Sender<DrainRequest>,
) {
    let api = Arc::new(Api {
        snapshot,
        drains: Some(drains),
    });
    // Reading the status is for root and group `nodeagent` (the socket's mode); draining the
    // node is for root, or the agent's own user.
    let own_uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let mut live = Connections::default();
    loop {
        let permit = live.room().await;
        match listener.accept().await {
            Ok((stream, _)) => {
                let uid = stream.peer_cred().ok().map(|c| c.uid());
                let may_drain = uid.is_some_and(|u| u == 0 || Some(u) == own_uid);
                live.add(connection(
                    TokioIo::new(stream),
                    api.clone(),
                    may_drain,
                    permit,
                ));
            }
            Err(e) => {
                debug!(error = %e, "status socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves `/metrics` on a TCP address (`metrics.listen`).
pub async fn bind_metrics(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (metrics.listen)"))?;
    info!(address = %addr, "serving Prometheus metrics at /metrics");
    Ok(listener)
}

/// Serves `GET /metrics` alone.
pub async fn serve_metrics(listener: TcpListener, snapshot: Snapshot) {
    let api = Arc::new(Api {
        snapshot,
        drains: None,
    });
    let mut live = Connections::default();
    loop {
        let permit = live.room().await;
        match listener.accept().await {
            Ok((stream, _)) => {
                live.add(connection(TokioIo::new(stream), api.clone(), false, permit))
            }
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a listener serves: the status (and, on the socket, the drain).
struct Api {
    snapshot: Snapshot,
    drains: Option<mpsc::Sender<DrainRequest>>,
}

/// The connections being served, oldest first, at most [`MAX_CONNECTIONS`]: each holds a
/// permit until its task is dropped, so the bound is on open sockets, not on bookkeeping.
struct Connections {
    live: std::collections::VecDeque<tokio::task::AbortHandle>,
    room: Arc<Semaphore>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            live: Default::default(),
            room: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

impl Connections {
    /// Room for one more: when every permit is taken, the oldest connection is shed and its
    /// socket's close awaited.
    async fn room(&mut self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.room.clone().try_acquire_owned() {
            return permit;
        }
        self.live.retain(|c| !c.is_finished());
        if let Some(oldest) = self.live.pop_front() {
            oldest.abort();
        }
        self.room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    fn add(&mut self, served: tokio::task::AbortHandle) {
        self.live.retain(|c| !c.is_finished());
        self.live.push_back(served);
    }
}

fn connection<IO>(
    io: IO,
    api: Arc<Api>,
    may_drain: bool,
    permit: OwnedSemaphorePermit,
) -> tokio::task::AbortHandle
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let served = tokio::spawn(async move {
        let _permit = permit;
        serve(io, api, may_drain).await;
    });
    served.abort_handle()
}

/// Serves one connection until it ends: requests within [`HEADER_TIMEOUT`] and
/// [`MAX_HEADERS`], else the connection is closed.
async fn serve<IO>(io: IO, api: Arc<Api>, may_drain: bool)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(answer(&req, &api, may_drain)) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADERS)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served {
        debug!(error = %e, "status connection ended");
    }
}

/// The longest `tasks_timeout` a drain may be asked to wait for the application tasks.
const MAX_TASKS_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `tasks_timeout=SECONDS` of a drain request (whole seconds, at most a day); any other query
/// parameter is refused.
pub fn drain_timeout(query: &str) -> Result<Option<Duration>, String> {
    let mut timeout = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "tasks_timeout" => {
                let secs = value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s <= MAX_TASKS_TIMEOUT.as_secs())
                    .ok_or_else(|| {
                        format!(
                            "tasks_timeout must be whole seconds from 0 to {}",
                            MAX_TASKS_TIMEOUT.as_secs()
                        )
                    })?;
                timeout = Some(Duration::from_secs(secs));
            }
            _ => return Err(format!("unknown parameter {key:?}: only tasks_timeout")),
        }
    }
    Ok(timeout)
}

fn answer(req: &Request<Incoming>, api: &Api, may_drain: bool) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    let path = req.uri().path();
    let on_socket = api.drains.is_some();
    let method = match path {
        "/metrics" => Method::GET,
        "/v1/status" if on_socket => Method::GET,
        "/v1/drain" if on_socket => Method::POST,
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("no {path} here\n"),
            )
        }
    };
    if req.method() != method {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("{method} only\n"),
        );
    }
    if let (Some(drains), "/v1/drain") = (&api.drains, path) {
        if !may_drain {
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "only root may drain the node\n".into(),
            );
        }
        let tasks_timeout = match drain_timeout(req.uri().query().unwrap_or_default()) {
            Ok(t) => t,
            Err(why) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
        };
        return match drains.try_send(DrainRequest { tasks_timeout }) {
            // Full: a drain is already asked for.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => reply(
                StatusCode::ACCEPTED,
                "application/json",
                "{\"draining\": true}\n".into(),
            ),
            Err(mpsc::error::TrySendError::Closed(_)) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "this agent cannot drain (bootstrap only, or its drain ended): see journalctl -u nodeagent\n".into(),
            ),
        };
    }
    let status = (api.snapshot)();
    if path == "/metrics" {
        return reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(&status),
        );
    }
    match serde_json::to_string_pretty(&status) {
        Ok(json) => reply(StatusCode::OK, "application/json", json + "\n"),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `POST /v1/drain?tasks_timeout=1e20` made `Duration::from_secs_f64` panic, and a panic
    /// aborts the agent: every value is parsed and bounded, anything else is a 400.
    #[test]
    fn drain_parameters_are_parsed_and_bounded() {
        assert_eq!(drain_timeout(""), Ok(None));
        assert_eq!(
            drain_timeout("tasks_timeout=90"),
            Ok(Some(Duration::from_secs(90)))
        );
        for bad in [
            "tasks_timeout=1e20",
            "tasks_timeout=-1",
            "tasks_timeout=NaN",
            "tasks_timeout=86401",
            "tasks_timeout=18446744073709551616",
            "tasks_timeout=",
            "other=1",
        ] {
            assert!(drain_timeout(bad).is_err(), "{bad}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Whatever a client sends — bytes, or a request line with any path and query — the
        /// connection ends (answered or closed, never hung past the header timeout) and
        /// nothing panics (a panic aborts the agent).
        #[test]
        fn any_request_ends_without_a_panic(
            raw in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..2048),
                ("(GET|POST|PUT) ", "/[ -~]{0,64}", " HTTP/1\\.[01]\r\n([A-Za-z-]{1,12}: [ -~]{0,40}\r\n){0,4}(\r\n)?")
                    .prop_map(|(m, p, rest)| format!("{m}{p}{rest}").into_bytes()),
            ],
            may_drain in any::<bool>(),
        ) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            let (drains, _requests) = mpsc::channel(1);
            let api = Arc::new(Api {
                snapshot: Arc::new(NodeStatus::default),
                drains: Some(drains),
            });
            let ended = runtime.block_on(async move {
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                let served = serve(TokioIo::new(server), api, may_drain);
                let client = async move {
                    let _ = client.write_all(&raw).await;
                    let mut answer = Vec::new();
                    let _ = client.read_to_end(&mut answer).await;
                };
                tokio::time::timeout(HEADER_TIMEOUT * 10, async { tokio::join!(served, client) }).await
            });
            prop_assert!(ended.is_ok(), "the connection hung");
        }
    }
}
