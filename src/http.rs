//! Local HTTP: owns the one way nodeagent builds an HTTP client for the services on its own
//! node — the ECS agent's introspection API, the Consul agent's API, the tasks' health checks.
//! They are local (loopback, or the node's own address), so a proxy from the environment
//! (`HTTP_PROXY`, which the AWS calls may need) must never be used for them, and every request
//! is bounded.

use anyhow::Context;
use std::time::Duration;

/// A client for local services: no proxy, `connect` to connect, `timeout` (when given) for a
/// whole request (a request may set its own).
pub fn local_client(
    connect: Duration,
    timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(connect);
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    builder
        .build()
        .context("cannot build an HTTP client for the node's local services")
}
