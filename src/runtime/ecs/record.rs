//! What this node's agents started: every task ARN `StartTask` answered, written to the host
//! (atomically) before anything else is done with it, so an agent that restarts — even right
//! after a `StartTask`, while ECS's `ListTasks` does not list the task yet — knows the task is
//! its own and does not start a second copy.

use crate::hostfs::{HostFs, Perms};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the record lives (nodeagent's state directory).
pub const PATH: &str = "/var/lib/nodeagent/ecs-tasks";

/// A started task: its task's name and when it was started (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub task: String,
    pub at: u64,
}

/// The record on the host; without a host (tests), in memory only.
pub struct Record {
    fs: Option<Arc<dyn HostFs>>,
    entries: BTreeMap<String, Started>,
}

impl Record {
    /// The record as the host has it (an unreadable or garbled one is empty: the reconcile
    /// finds the tasks anyway, only later).
    pub fn load(fs: Option<Arc<dyn HostFs>>) -> Record {
        let text = fs
            .as_ref()
            .and_then(|fs| fs.read(PATH).ok().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let entries = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (arn, task, at) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
                Some((
                    arn.to_string(),
                    Started {
                        task: task.into(),
                        at,
                    },
                ))
            })
            .collect();
        Record { fs, entries }
    }

    pub fn entries(&self) -> &BTreeMap<String, Started> {
        &self.entries
    }

    /// Adds a task started now, and writes the record.
    pub fn add(&mut self, arn: &str, task: &str) -> std::io::Result<()> {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.entries.insert(
            arn.into(),
            Started {
                task: task.into(),
                at,
            },
        );
        self.write()
    }

    /// Forgets tasks known to be gone, and writes the record if that changed it.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) -> std::io::Result<()> {
        let before = self.entries.len();
        self.entries.retain(|arn, _| live(arn));
        if self.entries.len() == before {
            return Ok(());
        }
        self.write()
    }

    /// How long ago a recorded task was started, by the wall clock (the record outlives the
    /// process; a clock stepped back counts as just now).
    pub fn age(started: &Started) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(now.saturating_sub(started.at))
    }

    fn write(&self) -> std::io::Result<()> {
        let Some(fs) = &self.fs else {
            return Ok(());
        };
        let text: String = self
            .entries
            .iter()
            .map(|(arn, s)| format!("{arn} {} {}\n", s.task, s.at))
            .collect();
        fs.write_atomic(PATH, text.as_bytes(), Perms::mode(0o644))
            .map(|_| ())
    }
}
