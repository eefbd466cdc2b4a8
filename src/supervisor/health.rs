//! Health probes: owns asking a task "are you healthy?" — an HTTP GET that must answer 2xx, or a
//! TCP connect — each bounded by the check's timeout. The supervisor asks through [`Prober`],
//! so its tests answer from memory.

use async_trait::async_trait;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET this URL; healthy on 2xx.
    Http(String),
    /// Connect to this "host:port"; healthy when it connects.
    Tcp(String),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Http(url) => write!(f, "GET {url}"),
            Probe::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

/// Who answers the probes.
#[async_trait]
pub trait Prober: Send + Sync {
    /// One check of `task`. `Err` says what failed.
    async fn check(&self, task: &str, probe: &Probe, timeout: Duration) -> Result<(), String>;
}

/// The real checks, over the network.
pub struct NetProber {
    http: reqwest::Client,
}

impl NetProber {
    pub fn new() -> anyhow::Result<NetProber> {
        Ok(NetProber {
            http: crate::http::local_client(Duration::from_secs(2), None)?,
        })
    }
}

#[async_trait]
impl Prober for NetProber {
    async fn check(&self, _task: &str, probe: &Probe, timeout: Duration) -> Result<(), String> {
        match probe {
            Probe::Http(url) => {
                let response = self
                    .http
                    .get(url)
                    .timeout(timeout)
                    .send()
                    .await
                    .map_err(|e| format!("{probe}: {e}"))?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("{probe}: HTTP {}", response.status()))
                }
            }
            Probe::Tcp(addr) => {
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("{probe}: {e}")),
                    Err(_) => Err(format!("{probe}: no connection within {timeout:?}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_connects_or_names_the_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let prober = NetProber::new().unwrap();
        let probe = Probe::Tcp(addr.clone());
        assert_eq!(
            prober.check("t", &probe, Duration::from_secs(1)).await,
            Ok(())
        );
        drop(listener);
        let err = prober
            .check("t", &probe, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.contains(&addr), "{err}");
    }
}
