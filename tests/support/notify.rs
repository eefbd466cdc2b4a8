//! A service manager's notify socket (`NOTIFY_SOCKET`): a datagram socket the test binds, on
//! which nodeagent's sd_notify messages arrive and are kept with when they arrived.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every datagram received on a socket, with when it arrived.
pub type Received = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

pub struct Listener {
    got: Received,
}

impl Listener {
    pub fn bind(path: &Path) -> Listener {
        let socket = UnixDatagram::bind(path).unwrap();
        let got: Received = Arc::default();
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push((Instant::now(), buf[..n].to_vec()));
            }
        });
        Listener { got }
    }

    pub fn datagrams(&self) -> Vec<Vec<u8>> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.clone())
            .collect()
    }

    pub fn messages(&self) -> Vec<(Instant, String)> {
        let got = self.got.lock().unwrap();
        got.iter()
            .map(|(t, d)| (*t, String::from_utf8_lossy(d).into_owned()))
            .collect()
    }

    pub fn texts(&self) -> Vec<String> {
        self.messages().into_iter().map(|(_, m)| m).collect()
    }

    /// The last message once `STOPPING=1` has been read. The agent queued
    /// its datagrams before it exited, but the reading thread may lag.
    pub fn last_after_stopping(&self) -> String {
        super::wait_for(Duration::from_secs(5), "STOPPING=1 to be read", || {
            self.texts().iter().any(|m| m.starts_with("STOPPING=1\n"))
        });
        self.texts().last().cloned().unwrap()
    }
}

impl Listener {
    /// Every `KEY=VALUE` line received so far, in order.
    pub fn lines(&self) -> Vec<String> {
        self.texts()
            .iter()
            .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    /// The `STATUS=` texts received so far, in order.
    pub fn statuses(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("STATUS=").map(str::to_string))
            .collect()
    }

    /// The message that carried `READY=1`, once one did.
    pub fn ready(&self) -> Option<String> {
        self.texts()
            .into_iter()
            .find(|m| m.lines().any(|l| l == "READY=1"))
    }
}
