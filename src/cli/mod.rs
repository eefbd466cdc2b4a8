//! Command line: owns the face of nodeagent — parsing arguments, printing, exit statuses (0 ok,
//! 2 bad configuration, 1 anything else; `status`: 0 healthy, 1 degraded, 3 no agent, 4 no
//! answer). The work is elsewhere: the daemon ([`crate::daemon`]: `run`, `prepare`), the image
//! ([`crate::image`]: `prepare-image`), the status client ([`crate::status::client`]); the
//! `config` subcommand's own code is in [`config_cmd`].

mod config_cmd;

use crate::config::{self, layers, ConfigError, Location};
use crate::daemon;
use crate::facts::InstanceFacts;
use crate::hostfs::RootedFs;
use crate::image;
use crate::logging::{self, Logging};
use crate::status::client;
use clap::{ArgAction, Args, Parser, Subcommand};
use config_cmd::{check_config, show_config};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

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
    /// Join the ECS cluster (write ecs.config) before ecs.service starts.
    Prepare {
        #[command(flatten)]
        common: Common,
    },
    /// Remove this instance's identity before an AMI is made of its disk (run last in the
    /// Packer build): ECS agent state, task directories (Consul's data and node-id), rendered
    /// files, nodeagent's state, nodeagent's keys in ecs.config. Refuses while the ECS agent or
    /// containers run.
    PrepareImage {
        #[command(flatten)]
        common: Common,
    },
    /// Show the running agent's status. Exit 0 healthy, 1 degraded, 3 agent not running, 4 no
    /// answer (permission denied, stuck).
    Status {
        #[command(flatten)]
        common: Common,
        /// The agent's socket [default: status.socket of the configuration files].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The status document as JSON (`GET /v1/status`).
        #[arg(long)]
        json: bool,
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Drain the node now: the running agent runs the ordered drain (readiness withdrawn,
    /// DRAINING, Consul maintenance, application tasks stopped, foundational tasks stopped in
    /// reverse order, Consul leave). Prints each step; exit 0 done, 1 a step failed, 3 no agent.
    Drain {
        #[command(flatten)]
        common: Common,
        /// The agent's socket [default: status.socket of the configuration files].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// How long to wait for the application tasks to stop [default:
        /// lifecycle.drain_tasks_timeout].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Only when the system is shutting down (the unit's ExecStop: a restart of nodeagent
        /// keeps the tasks); otherwise exit 0 at once.
        #[arg(long)]
        if_shutting_down: bool,
    },
    /// Render every config file from given facts into a directory, for reviewing templates.
    Render {
        #[command(flatten)]
        common: Common,
        /// Instance facts as JSON (see packaging/sample-facts.json).
        #[arg(long, value_name = "FILE.json")]
        facts: PathBuf,
        /// Files are written under this directory, at their host paths.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration files without touching AWS: types, unknown keys
    /// (file:line:col), dependency cycles, paths, templates compile. Exit 0 valid, 2 not.
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// Print the merged configuration, each key with the layer that set it. Reads the
    /// instance's user-data and tags when instance metadata answers.
    Show {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Main configuration file; conf.d/*.toml beside it is read too [default:
    /// /etc/nodeagent/nodeagent.toml, under --root; built-in defaults when absent].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Directory that every host path nodeagent reads or writes is placed under.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

impl Common {
    fn location(&self) -> Location {
        Location {
            config: self.config.clone(),
            root: self.root.clone(),
        }
    }
}

/// Parses the command line, runs the command and maps its outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = logging::init(cli.verbose, cli.quiet);
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
    match runtime.block_on(dispatch(cli.command, &logging)) {
        Ok(code) => code,
        Err(e) => {
            let config_error = e.chain().any(|c| c.is::<ConfigError>());
            if logging.to_journal() {
                tracing::error!("nodeagent failed: {e:#}");
            } else {
                eprintln!("nodeagent: error: {e:#}");
            }
            ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}

async fn dispatch(command: Command, logging: &Logging) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { common, once } => daemon::run(&common.location(), once, logging).await,
        Command::Prepare { common } => {
            daemon::prepare(&common.location(), logging).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::PrepareImage { common } => {
            let settings = config::from_fragments(&layers::files(&common.location())?)?;
            let fs = RootedFs::new(&common.root);
            let count =
                image::prepare_image(&settings, &fs, &mut |path| println!("removed {path}"))
                    .await?;
            println!("instance identity removed ({count} items): the disk is ready to be imaged");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            common,
            socket,
            json,
            watch,
        } => Ok(show_status(&common, socket, json, watch).await),
        Command::Render { common, facts, out } => render(&common, &facts, &out),
        Command::Drain {
            common,
            socket,
            timeout,
            if_shutting_down,
        } => {
            if if_shutting_down && !crate::systemd::system_stopping().await {
                println!("the system is not shutting down: no drain (the tasks keep running)");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(drain(&common, socket, timeout).await)
        }
        Command::Config {
            command: ConfigCommand::Check { common },
        } => check_config(&common),
        Command::Config {
            command: ConfigCommand::Show { common },
        } => show_config(&common).await,
    }
}

/// What `render --facts` reads: the instance facts plus what the boot would have found.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RenderFacts {
    #[serde(flatten)]
    instance: InstanceFacts,
    #[serde(default)]
    consul_servers: Vec<String>,
    #[serde(default)]
    container_instance_arn: Option<String>,
    /// Sample values of the secrets (`secrets.NAME`); one not given renders as `<secrets.NAME>`.
    #[serde(default)]
    secrets: std::collections::BTreeMap<String, String>,
}

fn render(common: &Common, facts: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let settings = config::from_fragments(&layers::files(&common.location())?)?;
    let text = std::fs::read_to_string(facts)
        .with_context(|| format!("reading the facts file {}", facts.display()))?;
    let given: RenderFacts = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a facts document (see packaging/sample-facts.json)",
            facts.display()
        )
    })?;
    let placeholders: Vec<(String, String)> = settings
        .secrets
        .keys()
        .map(|name| {
            let value = given.secrets.get(name).cloned();
            (
                name.clone(),
                value.unwrap_or_else(|| format!("<secrets.{name}>")),
            )
        })
        .collect();
    let secrets = placeholders
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let files = crate::render::render_files(
        &settings,
        &given.instance,
        &given.consul_servers,
        given.container_instance_arn.as_deref(),
        &secrets,
        &RootedFs::new(&common.root),
        &RootedFs::new(out),
    )?;
    for f in &files {
        println!(
            "{}  {:04o}  {}  ({})",
            f.sha256,
            f.mode,
            out.join(f.path.trim_start_matches('/')).display(),
            f.task
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `nodeagent drain`: asks the agent, then follows the drain's steps until it is done.
async fn drain(common: &Common, socket: Option<PathBuf>, timeout: Option<Duration>) -> ExitCode {
    let socket = socket_path(common, socket);
    let code = |e: &client::FetchError| match e {
        client::FetchError::NotRunning(_) => 3,
        client::FetchError::NoAnswer(_) => 4,
    };
    if let Err(e) = client::request_drain(&socket, timeout).await {
        eprintln!("nodeagent: {e}");
        return ExitCode::from(code(&e));
    }
    // Bounded: every step is, and the wait for the application tasks.
    let lc = layers::files(&common.location())
        .and_then(|f| config::from_fragments(&f))
        .map(|s| s.lifecycle)
        .unwrap_or_default();
    let deadline = Instant::now()
        + timeout.unwrap_or(lc.drain_tasks_timeout)
        + lc.drain_step_timeout * 10
        + Duration::from_secs(60);
    let mut shown = 0;
    loop {
        if Instant::now() >= deadline {
            eprintln!("nodeagent: the drain did not finish in time; see `nodeagent status` and journalctl -u nodeagent");
            return ExitCode::from(1);
        }
        let status = match client::fetch(&socket).await {
            Ok(status) => status,
            Err(e) => {
                eprintln!("nodeagent: {e}");
                return ExitCode::from(code(&e));
            }
        };
        if let Some(d) = &status.drain {
            for step in d.steps.iter().skip(shown) {
                let mark = if step.ok { "ok" } else { "FAILED" };
                println!(
                    "{mark:<6} {} ({} ms): {}",
                    step.step, step.took_ms, step.detail
                );
            }
            shown = d.steps.len();
            if d.done {
                let failed = d.steps.iter().any(|s| !s.ok);
                println!("drained ({})", d.trigger);
                return ExitCode::from(u8::from(failed));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The agent's socket: `--socket`, else `status.socket` of the configuration files (under
/// `--root`).
fn socket_path(common: &Common, socket: Option<PathBuf>) -> PathBuf {
    socket.unwrap_or_else(|| {
        let path = match layers::files(&common.location()).and_then(|f| config::from_fragments(&f))
        {
            Ok(settings) => settings.status.socket,
            Err(e) => {
                eprintln!("nodeagent: warning: {e}; using the default status socket");
                config::from_fragments(&[])
                    .map(|s| s.status.socket)
                    .unwrap_or_default()
            }
        };
        RootedFs::new(&common.root).resolve(&path)
    })
}

/// `nodeagent status`: 0 healthy, 1 degraded, 3 no agent, 4 no answer.
async fn show_status(
    common: &Common,
    socket: Option<PathBuf>,
    json: bool,
    watch: bool,
) -> ExitCode {
    let socket = socket_path(common, socket);
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let code = match client::fetch(&socket).await {
            Ok(status) => {
                if watch {
                    print!("\x1b[2J\x1b[H");
                }
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&status).unwrap_or_default()
                    );
                } else {
                    print!("{}", status.table(SystemTime::now()));
                }
                ExitCode::from(if status.healthy { 0 } else { 1 })
            }
            Err(e) => {
                eprintln!("nodeagent: {e}");
                ExitCode::from(match e {
                    client::FetchError::NotRunning(_) => 3,
                    client::FetchError::NoAnswer(_) => 4,
                })
            }
        };
        if !watch {
            return code;
        }
        tokio::select! {
            _ = &mut interrupted => return code,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
