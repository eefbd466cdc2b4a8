//! The status client: owns asking a running agent for its [`NodeStatus`] over its Unix socket
//! (what `nodeagent status` does), and telling "no agent" apart from "an agent, degraded".

use super::NodeStatus;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;

/// The whole exchange (connect, request, answer) must fit in this.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why no status could be had: there is no agent to ask (exit status 3).
#[derive(Debug, thiserror::Error)]
#[error("nodeagent is not running: {0}")]
pub struct NotRunning(pub String);

/// Fetches `GET /v1/status` from the agent listening on `socket`.
pub async fn fetch(socket: &Path) -> Result<NodeStatus, NotRunning> {
    let shown = socket.display();
    match tokio::time::timeout(TIMEOUT, exchange(socket)).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(NotRunning(format!("{shown}: {e:#}"))),
        Err(_) => Err(NotRunning(format!(
            "{shown}: no answer within {TIMEOUT:?} (the agent is stuck: see journalctl -u nodeagent)"
        ))),
    }
}

async fn exchange(socket: &Path) -> anyhow::Result<NodeStatus> {
    use anyhow::Context as _;
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("no socket (is nodeagent.service running?)")
            }
            std::io::ErrorKind::ConnectionRefused => {
                anyhow::anyhow!("connection refused (a socket left by a stopped agent)")
            }
            std::io::ErrorKind::PermissionDenied => {
                anyhow::anyhow!("permission denied: run as root or as a member of group nodeagent")
            }
            _ => anyhow::Error::new(e).context("connecting"),
        })?;
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
