//! Logging: owns where tracing's output goes. Under systemd, when stderr is still the journal
//! stream systemd set up (`JOURNAL_STREAM` names stderr's device and inode), events go to the
//! journal natively (tracing-journald) with their fields as journal fields — `NODEAGENT_TASK`,
//! `NODEAGENT_PHASE`, … (every field, prefixed) and `INSTANCE_ID` once it is known — so
//! `journalctl -u nodeagent NODEAGENT_TASK=linkerd` works. Otherwise: human-readable lines on
//! stderr. Verbosity: `-v`/`-q`, overridden by `RUST_LOG`.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

/// Prefix of every field nodeagent logs, as a journal field name (`task` → `NODEAGENT_TASK`).
pub const FIELD_PREFIX: &str = "NODEAGENT";
/// The journal's SYSLOG_IDENTIFIER for nodeagent's entries.
const IDENTIFIER: &str = "nodeagent";

/// Rebuilds the journal layer with the instance id.
type SetInstanceId = Box<dyn Fn(&str) + Send + Sync>;

/// What was set up; adds the instance id to journal entries once known.
pub struct Logging {
    set_instance_id: Option<SetInstanceId>,
}

impl Logging {
    /// Whether events go to the journal (else to stderr).
    pub fn to_journal(&self) -> bool {
        self.set_instance_id.is_some()
    }

    pub fn set_instance_id(&self, id: &str) {
        if let Some(set) = &self.set_instance_id {
            set(id);
        }
    }
}

/// Installs the global subscriber.
pub fn init(verbose: u8, quiet: bool) -> Logging {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("warn,nodeagent={level}")))
    };
    if stderr_is_journal() {
        if let Ok(layer) = journald(None) {
            let (layer, handle) = reload::Layer::new(layer);
            tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .init();
            return Logging {
                set_instance_id: Some(Box::new(move |id: &str| {
                    if let Ok(with_id) = journald(Some(id)) {
                        let _ = handle.modify(|l| *l = with_id);
                    }
                })),
            };
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    Logging {
        set_instance_id: None,
    }
}

fn journald(instance_id: Option<&str>) -> std::io::Result<tracing_journald::Layer> {
    let layer = tracing_journald::Layer::new()?
        .with_field_prefix(Some(FIELD_PREFIX.into()))
        .with_syslog_identifier(IDENTIFIER.into());
    Ok(match instance_id {
        Some(id) => layer.with_custom_fields([("INSTANCE_ID", id)]),
        None => layer,
    })
}

/// systemd's check: `JOURNAL_STREAM` is `DEVICE:INODE` of the stream it connected stderr to;
/// if stderr was redirected since (a shell, a pipe), log there instead.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
