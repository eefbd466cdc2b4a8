//! The status client: owns asking a running agent over its Unix socket (what `nodeagent status`
//! and `nodeagent drain` do), with reqwest's Unix-socket transport, and telling "no agent"
//! apart from "an agent that did not answer".

use super::NodeStatus;
use std::path::Path;
use std::time::Duration;

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
    let response = request(socket, reqwest::Method::GET, "/v1/status").await?;
    response.json().await.map_err(|e| {
        FetchError::NoAnswer(format!(
            "{}: GET /v1/status answered something that is not a status: {e}",
            socket.display()
        ))
    })
}

/// `POST /v1/drain` to the agent on `socket`; `tasks_timeout` overrides how long it waits for
/// the application tasks.
pub async fn request_drain(
    socket: &Path,
    tasks_timeout: Option<Duration>,
) -> Result<(), FetchError> {
    let path = match tasks_timeout {
        Some(t) => format!("/v1/drain?tasks_timeout={}", t.as_secs()),
        None => "/v1/drain".into(),
    };
    request(socket, reqwest::Method::POST, &path)
        .await
        .map(|_| ())
}

/// One request; a non-2xx answer is `NoAnswer` with what the agent said.
async fn request(
    socket: &Path,
    method: reqwest::Method,
    path: &str,
) -> Result<reqwest::Response, FetchError> {
    let shown = socket.display();
    let client = reqwest::Client::builder()
        .unix_socket(socket)
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| FetchError::NoAnswer(format!("{shown}: {e}")))?;
    let response = client
        .request(method.clone(), format!("http://nodeagent{path}"))
        .send()
        .await
        .map_err(|e| classify(socket, &e))?;
    let code = response.status();
    if !code.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(FetchError::NoAnswer(format!(
            "{shown}: {method} {path} answered {code}: {}",
            body.trim()
        )));
    }
    Ok(response)
}

/// What a failed exchange means for the operator.
fn classify(socket: &Path, e: &reqwest::Error) -> FetchError {
    let shown = socket.display();
    if e.is_timeout() {
        return FetchError::NoAnswer(format!(
            "{shown}: no answer within {TIMEOUT:?} (the agent is stuck: see journalctl -u nodeagent)"
        ));
    }
    let io = std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .find_map(|e| e.downcast_ref::<std::io::Error>());
    match io.map(std::io::Error::kind) {
        Some(std::io::ErrorKind::NotFound) => FetchError::NotRunning(format!(
            "{shown}: no socket (is nodeagent.service running?)"
        )),
        Some(std::io::ErrorKind::ConnectionRefused) => FetchError::NotRunning(format!(
            "{shown}: connection refused (a socket left by a stopped agent)"
        )),
        Some(std::io::ErrorKind::PermissionDenied) => FetchError::NoAnswer(format!(
            "{shown}: permission denied: run as root or as a member of group nodeagent"
        )),
        _ => FetchError::NoAnswer(format!("{shown}: {}", crate::aws::describe(e))),
    }
}
