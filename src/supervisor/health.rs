//! Health probes: owns asking a task "are you healthy?" — an HTTP GET that must answer 2xx, or a
//! TCP connect — each bounded by the check's timeout.

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

/// One check. `Err` says what failed.
pub async fn check(http: &reqwest::Client, probe: &Probe, timeout: Duration) -> Result<(), String> {
    match probe {
        Probe::Http(url) => {
            let response = http
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

/// The HTTP client probes share: local targets, never through a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("a plain HTTP client builds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_connects_or_names_the_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let http = client();
        assert_eq!(
            check(&http, &Probe::Tcp(addr.clone()), Duration::from_secs(1)).await,
            Ok(())
        );
        drop(listener);
        let err = check(&http, &Probe::Tcp(addr.clone()), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.contains(&addr), "{err}");
    }
}
