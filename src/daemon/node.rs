//! The boot as the daemon runs it: the instance facts first (they decide the region and the
//! instance's layers), the configuration layers the instance carries, then [`crate::boot`]
//! proper; the status board follows every phase and wait.

use crate::agent::HttpAgent;
use crate::aws::{self, AwsCalls};
use crate::boot::{self, BootReport, Node, PhaseTime, Progress};
use crate::config::{layers, Fragment, Settings};
use crate::ec2::SdkEc2;
use crate::facts::InstanceFacts;
use crate::hostfs::RootedFs;
use crate::image;
use crate::imds::{AwsImds, Imds};
use crate::logging::Logging;
use crate::phase::Phase;
use crate::secrets::sdk::SdkSecrets;
use crate::status::Board;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

/// What the boot found, for the supervision that follows.
pub struct Booted {
    pub settings: Settings,
    pub facts: InstanceFacts,
    pub report: BootReport,
    pub sdk: aws_config::SdkConfig,
    pub imds: Arc<dyn Imds>,
    pub secrets: Arc<dyn crate::secrets::SecretStore>,
}

/// Steps 1 to 5: the instance facts, then the configuration layers the instance carries, then
/// the boot proper; the board follows along.
pub async fn boot(
    files: Vec<Fragment>,
    fs: &RootedFs,
    board: &Board,
    calls: &Arc<AwsCalls>,
    logging: &Logging,
    started: Instant,
) -> anyhow::Result<Booted> {
    let imds = AwsImds::new();
    let facts = InstanceFacts::read(&imds)
        .instrument(info_span!("phase", phase = Phase::Imds.as_str()))
        .await?;
    logging.set_instance_id(&facts.instance_id);
    board.set_facts(&facts);
    match image::baked_from(fs, &facts.instance_id) {
        Ok(Some(other)) => {
            warn!(baked_from = %other, "this disk carries the identity of instance {other}: run `nodeagent prepare` before ecs.service (nodeagent-prepare.service), which removes it")
        }
        Ok(None) => image::record(fs, &facts.instance_id)?,
        Err(e) => warn!("cannot tell whose identity this disk carries: {e:#}"),
    }
    let sdk = aws::sdk_config(&facts.region).await;
    let ec2 = SdkEc2::new(&sdk, calls.clone());
    // The files' discovery timeout bounds the boot's EC2 calls, this one included.
    let deadline = Instant::now() + early_discovery_timeout(&files);
    let loaded = layers::with_instance(files, &imds, &ec2, &facts.instance_id, deadline)
        .instrument(info_span!("phase", phase = Phase::Imds.as_str()))
        .await?;
    warn_ignored(&loaded.ignored);
    board.update(|s| s.ignored = loaded.ignored.clone());
    let settings = loaded.settings;
    let imds_phase = PhaseTime {
        phase: Phase::Imds,
        started_ms: 0.0,
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    info!(instance_id = %facts.instance_id, local_ipv4 = %facts.local_ipv4, az = %facts.availability_zone, "read instance metadata");
    board.update(|s| {
        s.cluster = settings.cluster.clone();
        s.runtime = settings.runtime.as_str().into();
    });

    let agent = HttpAgent::new(&settings.ecs.introspection_url)?;
    let secrets = Arc::new(SdkSecrets::new(&sdk, calls.clone()));
    let node = Node {
        fs,
        ec2: &ec2,
        agent: &agent,
        secrets: secrets.as_ref(),
    };
    let progress = BoardProgress {
        board,
        waits: Mutex::default(),
    };
    let boot_began = SystemTime::now();
    let report = boot::run(&settings, &facts, &node, &progress).await?;
    let found_at = report
        .phases
        .iter()
        .find(|p| p.phase == Phase::Discover)
        .map_or(SystemTime::now(), |p| {
            boot_began + Duration::from_secs_f64((p.started_ms + p.took_ms) / 1e3)
        });
    board.set_report(&report, &imds_phase, found_at);
    board.set_secrets(crate::lifecycle::rotate::statuses(
        &settings,
        &report.secrets,
    ));
    let phases: Vec<String> = std::iter::once(&imds_phase)
        .chain(&report.phases)
        .map(|p| format!("{}={:.1}ms", p.phase, p.took_ms))
        .collect();
    info!(phases = %phases.join(" "), "node prepared; starting the tasks");
    Ok(Booted {
        settings,
        facts,
        report,
        sdk,
        imds: Arc::new(imds),
        secrets,
    })
}

/// One warning per key a layer set and nodeagent did not take: the key, never the value.
pub fn warn_ignored(ignored: &[crate::config::trust::Ignored]) {
    for i in ignored {
        warn!(key = %i.key, layer = %i.layer, "{} sets {}, which is ignored: {}", i.layer, i.key, i.why);
    }
}

/// `consul.discovery_timeout` as the files set it (the instance's layers are not read yet).
pub fn early_discovery_timeout(files: &[Fragment]) -> Duration {
    crate::config::from_fragments(files)
        .map(|s| s.consul.discovery_timeout)
        .unwrap_or(Duration::from_secs(600))
}

/// Boot progress, as the status board shows it.
struct BoardProgress<'a> {
    board: &'a Board,
    waits: Mutex<BTreeMap<&'static str, u64>>,
}

impl Progress for BoardProgress<'_> {
    fn phase(&self, phase: Phase) {
        self.board.set_phase(phase);
    }

    fn waiting(&self, on: &'static str, waited: Option<Duration>) {
        let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        match waited {
            Some(d) => waits.insert(on, d.as_secs()),
            None => waits.remove(on),
        };
        let detail = (!waits.is_empty()).then(|| {
            let each: Vec<String> = waits
                .iter()
                .map(|(on, s)| format!("{on} ({s} s)"))
                .collect();
            format!("waiting for {}", each.join(", "))
        });
        self.board.update(|s| s.phase_detail = detail);
    }
}
