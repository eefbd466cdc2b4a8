//! Boot: owns the node's start-up sequence — what the old user-data script did, in order:
//!
//! 1. read the instance facts from IMDSv2 (done by the caller: the facts feed the config);
//! 2. join the ECS cluster: write `ECS_CLUSTER` (and our other keys) into ecs.config;
//! 3. find the Consul servers by EC2 tag, while
//! 4. waiting for the ECS container agent to register this container instance, and reading
//!    the secrets (SSM Parameter Store, Secrets Manager);
//! 5. render the foundational tasks' config files;
//! 6. start the tasks — ECS `StartTask` or Docker — adopting any already running: that is the
//!    supervisor's first act (the daemon's), as it is the one that keeps them running. The boot
//!    reports what it found ([`BootReport`]); whoever starts the supervisor builds its specs.
//!
//! Step 2 alone is [`prepare`], which runs before ecs.service (it needs no network); [`run`]
//! repeats it idempotently and goes on, after ecs.service. Without `ecs.join` (docker runtime
//! only), steps 2 and 4 are skipped.

use crate::agent::{AgentMetadata, EcsAgent};
use crate::config::Settings;
use crate::ec2::Ec2;
use crate::ecs_config;
use crate::facts::InstanceFacts;
use crate::hostfs::{HostFs, Written};
use crate::phase::Phase;
use crate::render::{render_files, RenderedFile};
use crate::retry::{jitter, wait_until, WAIT_LOG_EVERY};
use crate::secrets::{self, SecretStore, Secrets};
use anyhow::{anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, info_span, Instrument};

/// The ECS agent is polled this often (jittered down to half) while it starts.
const AGENT_POLL: Duration = Duration::from_millis(100);
/// How long the ECS agent may take before the wait is logged.
const AGENT_QUIET: Duration = Duration::from_secs(2);

/// The external systems the boot talks to, each behind its boundary trait.
pub struct Node<'a> {
    pub fs: &'a dyn HostFs,
    pub ec2: &'a dyn Ec2,
    pub agent: &'a dyn EcsAgent,
    pub secrets: &'a dyn SecretStore,
}

/// Who hears how the boot goes (status, systemd): a phase began; the boot is still waiting on
/// something outside (called at every poll, so the caller can show a live count and keep a
/// service manager from timing out).
pub trait Progress: Sync {
    fn phase(&self, phase: Phase);
    /// `waited`: how long so far; `None`: no longer waiting on it.
    fn waiting(&self, on: &'static str, waited: Option<Duration>);
}

const WAIT_SERVERS: &str = "a Consul server";
const WAIT_AGENT: &str = "the ECS agent";
const WAIT_SECRETS: &str = "the secrets";

/// When a phase ran, relative to the start of the boot (the status document's `phases[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub phase: Phase,
    pub started_ms: f64,
    pub took_ms: f64,
}

/// What the boot found and did.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub consul_servers: Vec<String>,
    pub container_instance_arn: Option<String>,
    pub files: Vec<RenderedFile>,
    pub phases: Vec<PhaseTime>,
    /// The secrets read (values never serialized, `Debug` redacted).
    #[serde(skip)]
    pub secrets: Secrets,
}

/// Step 2 on its own: join the ECS cluster by writing ecs.config.
pub fn prepare(settings: &Settings, fs: &dyn HostFs) -> anyhow::Result<Written> {
    let path = &settings.ecs.config_path;
    let existing = fs.read(path)?.unwrap_or_default();
    let existing = String::from_utf8(existing)
        .map_err(|_| anyhow!("{path} is not UTF-8 text; fix or remove it"))?;
    let merged = ecs_config::merge(&existing, &settings.ecs_config_lines());
    let written = ecs_config::write(fs, path, &merged)?;
    match written {
        Written::Updated => {
            info!(path = %path, cluster = %settings.cluster, "joined the ECS cluster: wrote ecs.config")
        }
        Written::Unchanged => debug!(path = %path, "ecs.config already up to date"),
    }
    Ok(written)
}

/// Steps 2 to 5.
pub async fn run(
    settings: &Settings,
    facts: &InstanceFacts,
    node: &Node<'_>,
    progress: &dyn Progress,
) -> anyhow::Result<BootReport> {
    let boot = Instant::now();
    let mut phases = Vec::new();
    let timed = |phase: Phase, started: Instant| PhaseTime {
        phase,
        started_ms: ms(started - boot),
        took_ms: ms(started.elapsed()),
    };

    // 2. Join the ECS cluster.
    let join = settings.ecs.join;
    let t = Instant::now();
    if join {
        progress.phase(Phase::Join);
        info_span!("phase", phase = Phase::Join.as_str())
            .in_scope(|| prepare(settings, node.fs))?;
        phases.push(timed(Phase::Join, t));
    }

    // 3 and 4: both wait on something outside, so they wait together.
    progress.phase(Phase::Discover);
    let t = Instant::now();
    let discover = async {
        let servers = discover_servers(settings, node.ec2, progress).await;
        (servers, timed(Phase::Discover, t))
    }
    .instrument(info_span!("phase", phase = Phase::Discover.as_str()));
    let wait = async {
        if !join {
            return (Ok(None), None);
        }
        let agent = wait_for_agent(settings, node.agent, progress).await;
        (agent.map(Some), Some(timed(Phase::Agent, t)))
    }
    .instrument(info_span!("phase", phase = Phase::Agent.as_str()));
    let read_secrets = async {
        let wanted: Vec<secrets::Wanted> = settings.secret_sources();
        let deadline = Instant::now() + settings.consul.discovery_timeout;
        let waiting = |w: Option<Duration>| progress.waiting(WAIT_SECRETS, w);
        secrets::fetch_until(node.secrets, &wanted, deadline, &waiting).await
    }
    .instrument(info_span!("phase", phase = Phase::Discover.as_str()));
    let ((servers, discover_time), (agent, agent_time), secrets) =
        tokio::join!(discover, wait, read_secrets);
    let servers = servers?;
    let container_instance = agent?.and_then(|a| a.container_instance_arn);
    let secrets = secrets?;
    phases.push(discover_time);
    phases.extend(agent_time);

    // 5. Render the config files.
    progress.phase(Phase::Render);
    let t = Instant::now();
    let files = info_span!("phase", phase = Phase::Render.as_str()).in_scope(|| {
        render_files(
            settings,
            facts,
            &servers,
            container_instance.as_deref(),
            &secrets.values(),
            node.fs,
            node.fs,
        )
    })?;
    phases.push(timed(Phase::Render, t));

    Ok(BootReport {
        consul_servers: servers,
        container_instance_arn: container_instance,
        files,
        phases,
        secrets,
    })
}

/// Private IPv4 addresses of the running instances carrying the server tag: sorted, unique.
/// Servers often boot after the nodes, so "none yet" is asked again with backoff until
/// `consul.discovery_timeout`; so is a call that failed (throttled, lost, refused: an instance
/// role's permissions may still be propagating) — one failed call never ends the boot. The
/// backoff is fully jittered: at a scale-out every node polls the same account's EC2.
async fn discover_servers(
    settings: &Settings,
    ec2: &dyn Ec2,
    progress: &dyn Progress,
) -> anyhow::Result<Vec<String>> {
    let tag = &settings.consul.server_tag;
    let filter = format!(
        "tag:{}={} and instance-state-name=running",
        tag.key, tag.value
    );
    let deadline = Instant::now() + settings.consul.discovery_timeout;
    let waiting = |w: Option<Duration>| progress.waiting(WAIT_SERVERS, w);
    let filter = &filter;
    let servers = wait_until("a Consul server", deadline, &waiting, || async move {
        let ips = ec2
            .running_private_ips(&tag.key, &tag.value)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let servers: BTreeSet<Ipv4Addr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        if servers.is_empty() {
            return Err(format!("no running instance matches {filter}"));
        }
        Ok(servers.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>())
    })
    .await
    .map_err(|why| {
        anyhow!(
            "no Consul server found within {:?}: {why}; start the servers or fix consul.server_tag",
            settings.consul.discovery_timeout
        )
    })?;
    info!(servers = ?servers, "found the Consul servers");
    Ok(servers)
}

/// Polls the ECS agent's introspection API until it reports this node's container instance,
/// then checks it joined the configured cluster.
async fn wait_for_agent(
    settings: &Settings,
    agent: &dyn EcsAgent,
    progress: &dyn Progress,
) -> anyhow::Result<AgentMetadata> {
    let start = Instant::now();
    let timeout = settings.ecs.agent_timeout;
    // At boot the agent is normally a moment behind us: only a wait that lasts is news.
    let mut next_log = start + AGENT_QUIET;
    loop {
        let why = match agent.metadata().await {
            Ok(m)
                if m.container_instance_arn
                    .as_deref()
                    .is_some_and(|a| !a.is_empty()) =>
            {
                let reported = m.cluster.rsplit('/').next().unwrap_or_default();
                if reported != settings.cluster {
                    bail!(
                        "the ECS agent at {} registered into cluster {:?}, not {:?}: it read an older ecs.config; restart ecs.service (and clear /var/lib/ecs/data if the instance was registered before)",
                        agent.url(),
                        m.cluster,
                        settings.cluster
                    );
                }
                progress.waiting(WAIT_AGENT, None);
                info!(
                    container_instance = m.container_instance_arn.as_deref().unwrap_or_default(),
                    waited_ms = start.elapsed().as_millis() as u64,
                    "ECS agent is up"
                );
                return Ok(m);
            }
            Ok(_) => "it has not registered a container instance yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!(
                "the ECS agent at {} did not report a container instance within {timeout:?} (last: {why}); check `systemctl status ecs` and `journalctl -u ecs`, or raise ecs.agent_timeout",
                agent.url()
            );
        }
        progress.waiting(WAIT_AGENT, Some(start.elapsed()));
        if Instant::now() >= next_log {
            info!(
                waited_s = start.elapsed().as_secs(),
                "waiting for the ECS agent at {}: {why}",
                agent.url()
            );
            next_log = Instant::now() + WAIT_LOG_EVERY;
        }
        tokio::time::sleep(jitter(AGENT_POLL)).await;
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests;
