//! The daemon: owns wiring the agent together for `nodeagent run` (and its first step alone,
//! `nodeagent prepare`) — the real boundary implementations, the status socket and board, the
//! systemd notifier, the boot, the supervisor and the node's lifecycle beside it, and the
//! signals that end it. It reads top to bottom like the node's life:
//!
//! 1. signals first (a stop during a long boot is a stop), the status socket next (`nodeagent
//!    status` answers from the agent's first moment);
//! 2. the boot ([`node`]): instance facts, the configuration layers the instance carries,
//!    ecs.config, the Consul servers and the ECS agent, the config files;
//! 3. the tasks ([`tasks`]): their runtime, their specs, the supervisor;
//! 4. the node's standing ([`lifecycle`]): readiness, self-healing, the drain;
//! 5. supervision until SIGTERM — the tasks keep running.

mod lifecycle;
mod node;
mod tasks;

pub use tasks::task_specs;

use crate::aws::{self, AwsCalls};
use crate::config::{self, layers, Location};
use crate::ec2::SdkEc2;
use crate::facts::InstanceFacts;
use crate::hostfs::{HostFs, RootedFs};
use crate::image;
use crate::imds::AwsImds;
use crate::lifecycle::drain;
use crate::logging::Logging;
use crate::phase::Phase;
use crate::status::{notify, server, Board};
use crate::supervisor::Until;
use crate::systemd::{Notice, ServiceManager, Systemd};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

/// The node's lock: one `nodeagent run` per node.
pub const LOCK: &str = "/run/nodeagent/agent.lock";

/// `nodeagent run`: boots the node and supervises its tasks until SIGTERM/SIGINT (then leaves
/// them running). `once`: returns once every task is started or adopted (bootstrap only).
pub async fn run(at: &Location, once: bool, logging: &Logging) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // 1. From the first moment: a stop during a long boot is a stop, not a kill.
    let mut signals = Signals::install()?;
    let fs = RootedFs::new(&at.root);
    let files = layers::files(at)?;
    // The files alone place the status socket, so `nodeagent status` answers from the start.
    let early = config::from_fragments(&files)?;
    let manager: Arc<dyn ServiceManager> = Arc::new(Systemd);
    let notifier = Arc::new(notify::Notifier::new(
        manager.clone(),
        early.supervision.ready_timeout,
    ));
    let board = {
        let notifier = notifier.clone();
        Board::new(
            &early.cluster,
            early.runtime.as_str(),
            Some(Arc::new(move |s| notifier.observe(s))),
        )
    };
    let _extender = AbortOnDrop(tokio::spawn(notifier.clone().keep_extending(board.clone())));
    // The boot's first AWS call is jittered: a scale-out boots many nodes in the same instant.
    let calls = Arc::new(AwsCalls::jittered(aws::FIRST_CALL_JITTER));
    let snapshot: server::Snapshot = {
        let (board, calls) = (board.clone(), calls.clone());
        Arc::new(move || {
            board.set_aws_calls(calls.snapshot());
            board.snapshot()
        })
    };
    // One agent per node, whatever its socket.
    let _lock = server::NodeLock::take(&fs.resolve(LOCK))?;
    let socket = fs.resolve(&early.status.socket);
    let group = fs.group_id("nodeagent").unwrap_or(None);
    let (listener, _socket) = server::bind_unix(&socket, group)?;
    // A drain asked for during the boot waits for the supervision to begin.
    let (drain_requests, drains) = tokio::sync::mpsc::channel(1);
    let _server = AbortOnDrop(tokio::spawn(server::serve_unix(
        listener,
        snapshot.clone(),
        drain_requests,
    )));
    let stop = |during: &str| {
        board.set_phase(Phase::Stopping);
        manager.notify(&[
            Notice::Stopping,
            Notice::Status("stopping; the tasks keep running".into()),
        ]);
        info!("stopping{during}; the tasks keep running");
        Ok(ExitCode::SUCCESS)
    };

    // 2. Facts, configuration, join, Consul, the ECS agent, the files.
    let boot = node::boot(files, &fs, &board, &calls, logging, started);
    let booted = tokio::select! {
        booted = boot => booted?,
        _ = signals.recv() => return stop(" during the boot"),
    };
    let settings = &booted.settings;
    notifier.set_ready_timeout(settings.supervision.ready_timeout);
    if settings.status.socket != early.status.socket {
        warn!(socket = %socket.display(), "status.socket from EC2 user-data or tags is ignored: the socket is placed by the configuration files");
    }
    let _metrics = match settings.metrics.listen {
        None => None,
        Some(addr) => {
            let listener = server::bind_metrics(addr).await?;
            Some(AbortOnDrop(tokio::spawn(server::serve_metrics(
                listener,
                snapshot.clone(),
            ))))
        }
    };

    // 3. Start or adopt the tasks, and keep them running.
    let mut supervisor = tasks::supervisor(&booted, &fs, &calls).await?;
    let mut task_status = supervisor.watch();
    board.set_tasks(&task_status.borrow_and_update());
    board.set_phase(Phase::Supervise);
    let _forward = AbortOnDrop(tokio::spawn({
        let board = board.clone();
        async move {
            while task_status.changed().await.is_ok() {
                let tasks = task_status.borrow_and_update().clone();
                board.set_tasks(&tasks);
            }
        }
    }));
    // 4. The node's standing; bootstrap only (`--once`) does not stay to keep it.
    let _lifecycle = if once {
        Vec::new()
    } else {
        // A drain an earlier agent began goes on: nothing is started again.
        let resume = drain::recorded(&fs);
        match &resume {
            Some(d) if d.done => warn!(
                record = drain::RECORD,
                "this node was drained in this boot ({}): starting nothing", d.trigger
            ),
            Some(_) => warn!(
                record = drain::RECORD,
                "this node was being drained: resuming the drain, starting nothing"
            ),
            None => {}
        }
        if resume.is_some() {
            supervisor.suspend_all();
        }
        let standing = lifecycle::Standing {
            booted: &booted,
            calls: &calls,
            supervisor: &supervisor,
            board: &board,
            fs: fs.clone(),
        };
        standing.start(drains, resume)
    };
    let _watchdog = AbortOnDrop(tokio::spawn(notify::watchdog(
        manager.clone(),
        supervisor.liveness(),
    )));

    // 5. Until SIGTERM.
    let span = info_span!("phase", phase = Phase::Supervise.as_str());
    if !once {
        supervisor
            .run(Until::Shutdown, signals.recv())
            .instrument(span)
            .await?;
        return stop("");
    }
    tokio::select! {
        done = supervisor.run(Until::AllStarted, std::future::pending()).instrument(span) => done?,
        _ = signals.recv() => return stop(" before every task started"),
    }
    let tasks = supervisor.watch().borrow().clone();
    let adopted = tasks.iter().filter(|t| t.adopted).count();
    info!(
        total_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        aws_calls = calls.total(),
        started = tasks.len() - adopted,
        adopted,
        "all tasks started"
    );
    Ok(ExitCode::SUCCESS)
}

/// `nodeagent prepare`: before ecs.service, the first-boot guard (a disk baked from another
/// instance is cleaned), then ecs.config.
pub async fn prepare(at: &Location, logging: &Logging) -> anyhow::Result<()> {
    let fs = RootedFs::new(&at.root);
    let files = layers::files(at)?;
    let imds = AwsImds::new();
    let facts = InstanceFacts::read(&imds).await?;
    logging.set_instance_id(&facts.instance_id);
    let sdk = aws::sdk_config(&facts.region).await;
    let ec2 = SdkEc2::new(&sdk, Arc::new(AwsCalls::default()));
    let deadline = Instant::now() + node::early_discovery_timeout(&files);
    let loaded = layers::with_instance(files, &imds, &ec2, &facts.instance_id, deadline).await?;
    node::warn_ignored(&loaded.ignored);
    let settings = loaded.settings;
    image::guard(&settings, &fs, &facts.instance_id)?;
    crate::boot::prepare(&settings, &fs)?;
    Ok(())
}

/// SIGTERM and SIGINT, listened to from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use anyhow::Context as _;
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

/// A spawned task that ends with its owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
