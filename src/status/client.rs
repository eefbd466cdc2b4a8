//! The status client: owns asking a running agent for its [`NodeStatus`] over its Unix socket
//! (what `nodeagent status` does), and telling "no agent" apart from "an agent that did not
//! answer" and from "an agent, degraded".

use super::NodeStatus;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;

/// The whole exchange (request, answer) must fit in this.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why no status could be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No agent to ask: no socket, or nobody listening on it (exit status 3).
    #[error("nodeagent is not running: {0}")]
    NotRunning(String),
    /// An agent may be there, but did not tell (exit status 4).
    #[error("cannot get nodeagent's status: {0}")]
    NoAnswer(String),
}

/// Fetches `GET /v1/status` from the agent listening on `socket`.
pub async fn fetch(socket: &Path) -> Result<NodeStatus, FetchError> {
    let shown = socket.display();
    let stream = connect(socket).await?;
    match tokio::time::timeout(TIMEOUT, exchange(stream)).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(FetchError::NoAnswer(format!("{shown}: {e:#}"))),
        Err(_) => Err(FetchError::NoAnswer(format!(
            "{shown}: no answer within {TIMEOUT:?} (the agent is stuck: see journalctl -u nodeagent)"
        ))),
    }
}

async fn connect(socket: &Path) -> Result<UnixStream, FetchError> {
    let shown = socket.display();
    match UnixStream::connect(socket).await {
        Ok(stream) => Ok(stream),
        Err(e) => Err(match e.kind() {
            std::io::ErrorKind::NotFound => FetchError::NotRunning(format!(
                "{shown}: no socket (is nodeagent.service running?)"
            )),
            std::io::ErrorKind::ConnectionRefused => FetchError::NotRunning(format!(
                "{shown}: connection refused (a socket left by a stopped agent)"
            )),
            std::io::ErrorKind::PermissionDenied => FetchError::NoAnswer(format!(
                "{shown}: permission denied: run as root or as a member of group nodeagent"
            )),
            _ => FetchError::NoAnswer(format!("{shown}: {e}")),
        }),
    }
}

/// `POST /v1/drain` to the agent on `socket`; `tasks_timeout` overrides how long it waits for
/// the application tasks.
pub async fn request_drain(
    socket: &Path,
    tasks_timeout: Option<Duration>,
) -> Result<(), FetchError> {
    let shown = socket.display();
    let stream = connect(socket).await?;
    let path = match tasks_timeout {
        Some(t) => format!("/v1/drain?tasks_timeout={}", t.as_secs_f64()),
        None => "/v1/drain".into(),
    };
    let asked = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::post(path)
            .header("host", "nodeagent")
            .body(Empty::<Bytes>::new())?;
        let code = sender.send_request(req).await?.status();
        anyhow::ensure!(code.is_success(), "POST /v1/drain answered {code}");
        Ok(())
    };
    match tokio::time::timeout(TIMEOUT, asked).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(FetchError::NoAnswer(format!("{shown}: {e:#}"))),
        Err(_) => Err(FetchError::NoAnswer(format!(
            "{shown}: no answer within {TIMEOUT:?}"
        ))),
    }
}

async fn exchange(stream: UnixStream) -> anyhow::Result<NodeStatus> {
    use anyhow::Context as _;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/v1/status")
        .header("host", "nodeagent")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let code = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !code.is_success() {
        anyhow::bail!(
            "GET /v1/status answered {code}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("GET /v1/status answered something that is not a status")
}
