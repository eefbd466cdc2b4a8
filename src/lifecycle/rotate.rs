//! Rotation: owns keeping the node's secrets current. Each secret is read again every
//! `refresh`, those of one `refresh` together (one `GetParameters` per ten parameters, one
//! `GetSecretValue` per secret; a failed read is retried with full jitter within the refresh,
//! then waits for the next); when a value changed, every file is rendered again (only the
//! changed ones are written), the new value is in use once they are, and the tasks owning a
//! file that uses it are restarted one at a time in start order — or sent their
//! `reload` signal — each given `supervision.ready_timeout` to be healthy again before the
//! next (the readiness attribute stays: a restart shorter than `degraded_grace` keeps it). What it did is reported as [`SecretStatus`] (status, logs), never a value.

use crate::aws::{RETRY_BASE, RETRY_CAP};
use crate::config::Settings;
use crate::facts::InstanceFacts;
use crate::hostfs::HostFs;
use crate::render::render_files;
use crate::retry::{jitter, FullJitter};
use crate::secrets::{fetch_once, Fetched, SecretStore, Secrets, Wanted};
use crate::supervisor::{Control, State, TaskStatus};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Secrets due within this of each other are read together (one `GetParameters`).
const BATCH_WINDOW: Duration = Duration::from_secs(1);

/// One secret as status shows it: where it comes from and which version is in use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretStatus {
    pub name: String,
    /// `ssm:/…` or `secretsmanager:…#key`.
    pub source: String,
    /// `v3` (a parameter's version) or the start of a Secrets Manager `VersionId`.
    pub version: String,
    /// When it was last read (RFC 3339).
    pub read_at: String,
    /// `null` for a secret read once (`refresh = "0s"`).
    pub refresh_s: Option<u64>,
    /// The last change: `from` and `to` versions, `at` (RFC 3339).
    pub rotated: Option<Rotated>,
    /// Why the last refresh failed (the value in use stays), `null` when it did not.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rotated {
    pub from: String,
    pub to: String,
    pub at: String,
}

/// The secrets' refresh and what a change sets off.
pub struct Rotation {
    pub store: Arc<dyn SecretStore>,
    pub settings: Settings,
    pub facts: InstanceFacts,
    pub servers: Vec<String>,
    pub container_instance: Option<String>,
    pub fs: Arc<dyn HostFs>,
    pub control: Control,
    pub tasks: watch::Receiver<Vec<TaskStatus>>,
    /// The secrets the boot read.
    pub current: Secrets,
    /// Hears the files each time a rotation rendered them again.
    pub files: watch::Sender<Vec<crate::render::RenderedFile>>,
}

/// Every secret's status as the boot read it.
pub fn statuses(settings: &Settings, secrets: &Secrets) -> Vec<SecretStatus> {
    secrets
        .0
        .iter()
        .map(|(name, c)| SecretStatus {
            name: name.clone(),
            source: c.source.to_string(),
            version: c.fetched.version.clone(),
            read_at: rfc3339(c.fetched_at),
            refresh_s: settings
                .secrets
                .get(name)
                .map(|s| s.refresh.as_secs())
                .filter(|s| *s > 0),
            rotated: None,
            error: None,
        })
        .collect()
}

impl Rotation {
    /// Refreshes until dropped; `progress` hears every secret's status after each refresh.
    ///
    /// Secrets with the same `refresh` are read together on one schedule — a random phase at
    /// start (a fleet's nodes do not read in step), then exactly every `refresh` — so a
    /// refresh costs one `GetParameters` (per ten) and one `GetSecretValue` per secret, and
    /// secrets rotated together restart their tasks once. A new value is taken into use only
    /// once its files are rendered; if they cannot be, the next refresh tries again.
    pub async fn run(mut self, progress: watch::Sender<Vec<SecretStatus>>) {
        let mut status = statuses(&self.settings, &self.current);
        let mut groups: BTreeMap<Duration, Vec<String>> = BTreeMap::new();
        for (name, s) in &self.settings.secrets {
            if !s.refresh.is_zero() {
                groups.entry(s.refresh).or_default().push(name.clone());
            }
        }
        let mut due: BTreeMap<Duration, Instant> = groups
            .keys()
            .map(|r| (*r, Instant::now() + jitter(*r)))
            .collect();
        while let Some(next) = due.values().min().copied() {
            tokio::time::sleep_until(next).await;
            let now = Instant::now();
            let periods: Vec<Duration> = due
                .iter()
                .filter(|(_, t)| **t <= now + BATCH_WINDOW)
                .map(|(r, _)| *r)
                .collect();
            let wanted: Vec<Wanted> = periods
                .iter()
                .flat_map(|r| &groups[r])
                .filter_map(|n| self.current.0.get(n).map(|c| (n.clone(), c.source.clone())))
                .collect();
            let shortest = periods.iter().min().copied().unwrap_or(RETRY_CAP);
            let read = read_within(self.store.as_ref(), &wanted, now + shortest).await;
            for r in &periods {
                let d = due.get_mut(r).expect("a due period");
                *d += *r;
                if *d <= Instant::now() {
                    *d = Instant::now() + *r;
                }
            }
            let mut fresh: BTreeMap<String, Fetched> = BTreeMap::new();
            for (name, result) in read {
                let entry = status.iter_mut().find(|s| s.name == name);
                let (Some(entry), Some(current)) = (entry, self.current.0.get_mut(&name)) else {
                    continue;
                };
                match result {
                    Ok(fetched) => {
                        entry.error = None;
                        entry.read_at = rfc3339(SystemTime::now());
                        current.fetched_at = SystemTime::now();
                        if fetched.value != current.fetched.value {
                            fresh.insert(name, fetched);
                        }
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        warn!(secret = %name, "secrets: could not refresh {name}, keeping the value in use ({}): {why}", entry.version);
                        entry.error = Some(why);
                    }
                }
            }
            if fresh.is_empty() {
                progress.send_replace(status.clone());
                continue;
            }
            let what: Vec<String> = fresh
                .iter()
                .map(|(n, f)| format!("{n} ({}→{})", self.current.0[n].fetched.version, f.version))
                .collect();
            let what = format!("secret {} rotated", what.join(", "));
            match self.render(&fresh) {
                Ok(owners) => {
                    for (name, fetched) in fresh {
                        let current = self.current.0.get_mut(&name).expect("a current secret");
                        let (from, to) = (current.fetched.version.clone(), fetched.version.clone());
                        info!(secret = %name, from = %from, to = %to, "secrets: rotated {name} ({from}→{to})");
                        if let Some(entry) = status.iter_mut().find(|s| s.name == name) {
                            entry.version = to.clone();
                            entry.rotated = Some(Rotated {
                                from,
                                to,
                                at: rfc3339(SystemTime::now()),
                            });
                        }
                        current.fetched = fetched;
                    }
                    progress.send_replace(status.clone());
                    for task in owners {
                        self.renew(&task, &what).await;
                    }
                }
                Err(e) => {
                    let why = format!("{what}, but its files could not be rendered again ({e:#}); the tasks keep the files and the value they have; tried again at the next refresh");
                    warn!("secrets: {why}");
                    for entry in status.iter_mut().filter(|s| fresh.contains_key(&s.name)) {
                        entry.error = Some(why.clone());
                    }
                    progress.send_replace(status.clone());
                }
            }
        }
    }

    /// Renders every file with the `fresh` values (and the others in use) and writes it; the
    /// tasks owning a file that uses a fresh secret, in start order.
    fn render(&mut self, fresh: &BTreeMap<String, Fetched>) -> anyhow::Result<Vec<String>> {
        let mut values = self.current.values();
        for (name, f) in fresh {
            values.insert(name.as_str(), f.value.expose());
        }
        let files = render_files(
            &self.settings,
            &self.facts,
            &self.servers,
            self.container_instance.as_deref(),
            &values,
            self.fs.as_ref(),
            self.fs.as_ref(),
        )?;
        let owners: BTreeSet<&str> = files
            .iter()
            .filter(|f| f.secrets.iter().any(|s| fresh.contains_key(s)))
            .map(|f| f.task.as_str())
            .collect();
        let order: Vec<String> = self
            .settings
            .start_levels()
            .into_iter()
            .flatten()
            .map(|t| t.name.to_string())
            .filter(|t| owners.contains(t.as_str()))
            .collect();
        self.files.send_replace(files);
        Ok(order)
    }

    /// Reloads or restarts `task`, then waits (at most `ready_timeout`) for it to be healthy.
    async fn renew(&mut self, task: &str, why: &str) {
        let instance_before = self.instance_of(task);
        // (`restart` answers once the replacement is scheduled: the old instance still shows.)
        let reload = self.settings.tasks[task].reload.clone();
        let replaced = match reload {
            Some(signal) => match self.control.signal(task, &signal).await {
                Ok(()) => {
                    info!(task = %task, "{task}: sent {signal}: {why}");
                    false
                }
                Err(e) => {
                    warn!(task = %task, "{task}: cannot send {signal} ({e:#}); restarting it instead");
                    self.restart(task, why).await
                }
            },
            None => self.restart(task, why).await,
        };
        let limit = self.settings.supervision.ready_timeout;
        let deadline = Instant::now() + limit;
        let healthy = |tasks: &Vec<TaskStatus>| {
            tasks.iter().any(|t| {
                t.name == task
                    && t.state == State::Healthy
                    && (!replaced || t.instance.is_some() && t.instance != instance_before)
            })
        };
        let waited = tokio::time::timeout_at(deadline, self.tasks.wait_for(healthy)).await;
        match waited {
            Ok(Ok(_)) => info!(task = %task, "{task}: healthy again after the rotation"),
            Ok(Err(_)) => {}
            Err(_) => {
                warn!(task = %task, "{task}: not healthy {limit:?} after the rotation; going on with the next task")
            }
        }
    }

    /// Asks for a restart; whether one is under way.
    async fn restart(&self, task: &str, why: &str) -> bool {
        match self
            .control
            .restart(task, &format!("restarted: {why}"))
            .await
        {
            Ok(()) => self.instance_of(task).is_some(),
            Err(e) => {
                warn!(task = %task, "{task}: not restarted after the rotation: {e:#}");
                false
            }
        }
    }

    fn instance_of(&self, task: &str) -> Option<String> {
        self.tasks
            .borrow()
            .iter()
            .find(|t| t.name == task)
            .and_then(|t| t.instance.clone())
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Reads `wanted` once, then again those that failed (full jitter) until `deadline`.
async fn read_within(
    store: &dyn SecretStore,
    wanted: &[Wanted],
    deadline: Instant,
) -> BTreeMap<String, anyhow::Result<crate::secrets::Fetched>> {
    let mut results = fetch_once(store, wanted).await;
    // A failed refresh is tried again with AWS calls' full jitter, within its refresh.
    let mut backoff = FullJitter::new(RETRY_BASE, RETRY_CAP);
    loop {
        let failed: Vec<Wanted> = wanted
            .iter()
            .filter(|(n, _)| results.get(n).is_some_and(|r| r.is_err()))
            .cloned()
            .collect();
        let delay = backoff.next_delay();
        if failed.is_empty() || Instant::now() + delay >= deadline {
            return results;
        }
        tokio::time::sleep(delay).await;
        results.extend(fetch_once(store, &failed).await);
    }
}
