//! Command line: owns parsing arguments, building the real boundary implementations, logging
//! and exit statuses (0 ok, 2 bad configuration, 1 anything else). Everything below it is
//! handed its collaborators explicitly.

use crate::agent::HttpAgent;
use crate::aws::{self, AwsCalls};
use crate::boot::{self, Node, PhaseTime};
use crate::config::{self, ConfigError, Fragment, RuntimeKind, Settings};
use crate::docker::{BollardDocker, Docker};
use crate::ec2::SdkEc2;
use crate::ecs::SdkEcs;
use crate::facts::InstanceFacts;
use crate::hostfs::{HostFs, RootedFs};
use crate::imds::AwsImds;
use crate::render::{self, Renderer};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::ecs::EcsRuntime;
use crate::supervisor::{Runtime, Supervisor, Until};
use clap::{ArgAction, Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, info_span, warn, Instrument};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "nodeagent",
    version,
    about = "Boots an ECS node's foundational tasks from instance metadata"
)]
struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot the node: read IMDS, join the cluster, find Consul, render configs, start the tasks.
    Run {
        #[command(flatten)]
        common: Common,
        /// Exit 0 once the tasks are started or adopted (bootstrap only).
        #[arg(long)]
        once: bool,
    },
    /// Join the ECS cluster (write ecs.config) without touching the network: run before ecs.service.
    Prepare {
        #[command(flatten)]
        common: Common,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration without touching AWS: types, unknown keys (file:line:col),
    /// dependency cycles, paths, templates compile. Exit 0 valid, 2 not (for the AMI build).
    Check {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Configuration file [default: /etc/nodeagent/nodeagent.toml, under --root; built-in defaults when absent].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Directory that every host path nodeagent reads or writes is placed under.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

/// Parses the command line, runs the command and maps its outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeagent: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeagent: error: {e:#}");
            let config_error = e.chain().any(|c| c.is::<ConfigError>());
            ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,nodeagent={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Prepare { common } => {
            let settings = load_settings(&common)?;
            boot::prepare(&settings, &RootedFs::new(&common.root))?;
            Ok(())
        }
        Command::Run { common, once } => run(&common, once).await,
        Command::Config {
            command: ConfigCommand::Check { common },
        } => check_config(&common),
    }
}

/// Everything that can be checked without the node: the settings, then every template.
fn check_config(common: &Common) -> anyhow::Result<()> {
    let settings = load_settings(common)?;
    let fs = RootedFs::new(&common.root);
    let invalid = |e: anyhow::Error| ConfigError::Invalid(vec![format!("{e:#}")]);
    Renderer::new(&settings, &|path: &str| boot::read_text(&fs, path)).map_err(invalid)?;
    let mut files = 0;
    for task in settings.enabled_tasks() {
        let config = &settings.tasks[task.name];
        files += config.files.len();
        let health = config
            .health
            .iter()
            .flat_map(|h| [h.http(), h.tcp()])
            .flatten();
        for template in health {
            render::compile_value(template)
                .map_err(|e| invalid(e.context(format!("tasks.{}.health", task.name))))?;
        }
    }
    let names: Vec<&str> = settings.enabled_tasks().map(|t| t.name).collect();
    println!(
        "configuration OK: runtime {}, cluster {}, tasks {}, {files} files",
        format!("{:?}", settings.runtime).to_lowercase(),
        settings.cluster,
        names.join(", ")
    );
    Ok(())
}

/// Built-in defaults, then the configuration file.
fn load_settings(common: &Common) -> Result<Settings, ConfigError> {
    let fs = RootedFs::new(&common.root);
    let text = match &common.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::unreadable(path.display().to_string(), e))?,
        ),
        None => fs
            .read(config::DEFAULT_CONFIG_PATH)
            .map_err(|e| ConfigError::unreadable(config::DEFAULT_CONFIG_PATH, e))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    };
    let origin = common
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| {
            fs.resolve(config::DEFAULT_CONFIG_PATH)
                .display()
                .to_string()
        });
    let fragments: Vec<Fragment> = text
        .map(|text| Fragment { origin, text })
        .into_iter()
        .collect();
    config::from_fragments(&fragments)
}

async fn run(common: &Common, once: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let settings = load_settings(common)?;
    let fs = RootedFs::new(&common.root);

    let imds = AwsImds::new();
    let facts = InstanceFacts::read(&imds)
        .instrument(info_span!("phase", phase = "imds"))
        .await?;
    let imds_phase = PhaseTime {
        phase: "imds",
        started_ms: 0.0,
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    info!(instance_id = %facts.instance_id, local_ipv4 = %facts.local_ipv4, az = %facts.availability_zone, "read instance metadata");

    let calls = Arc::new(AwsCalls::default());
    let sdk = aws::sdk_config(&facts.region).await;
    let ec2 = SdkEc2::new(&sdk, calls.clone());
    let agent = HttpAgent::new(&settings.ecs.introspection_url)?;
    let node = Node {
        fs: &fs,
        ec2: &ec2,
        agent: &agent,
    };
    let report = boot::run(&settings, &facts, &node).await?;
    let phases: Vec<String> = std::iter::once(&imds_phase)
        .chain(&report.phases)
        .map(|p| format!("{}={:.1}ms", p.phase, p.took_ms))
        .collect();
    info!(phases = %phases.join(" "), "node prepared; starting the tasks");

    // 6. Start or adopt the tasks, and keep them running.
    let docker = BollardDocker::connect()
        .await
        .map(|d| Arc::new(d) as Arc<dyn Docker>);
    let runtime: Arc<dyn Runtime> = match settings.runtime {
        RuntimeKind::Docker => Arc::new(DockerRuntime::new(
            docker?,
            &settings,
            &facts.instance_id,
            &fs,
        )),
        RuntimeKind::Ecs => {
            let docker = docker
                .inspect_err(|e| warn!(error = %format!("{e:#}"), "no Docker engine: task deaths are found by the periodic reconcile only"))
                .ok();
            let tasks: Vec<(String, String)> = settings
                .enabled_tasks()
                .map(|t| (t.name.to_string(), t.family.to_string()))
                .collect();
            Arc::new(EcsRuntime::new(
                Arc::new(SdkEcs::new(&sdk, calls.clone())),
                docker,
                &settings.cluster,
                report.container_instance_arn.as_deref().unwrap_or_default(),
                &facts.instance_id,
                &tasks,
                settings.ecs.start_timeout,
            ))
        }
    };
    let tasks = boot::supervised_tasks(&settings, &facts, &report)?;
    let mut supervisor = Supervisor::new(runtime, settings.supervision.clone(), tasks);
    let status = supervisor.watch();
    let until = if once {
        Until::AllStarted
    } else {
        Until::Shutdown
    };
    let summary = || {
        let tasks = status.borrow();
        let adopted = tasks.iter().filter(|t| t.adopted).count();
        info!(
            total_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            aws_calls = calls.total(),
            started = tasks.len() - adopted,
            adopted,
            "all tasks started"
        );
    };
    supervisor
        .run(until, async {
            if let Err(e) = wait_for_shutdown().await {
                tracing::error!(error = %e, "cannot wait for signals");
            }
        })
        .instrument(info_span!("supervise"))
        .await?;
    if once {
        summary();
    } else {
        info!("stopping; the tasks keep running");
    }
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
