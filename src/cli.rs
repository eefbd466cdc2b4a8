//! Command line: owns parsing arguments, building the real boundary implementations, reading
//! the configuration layers, logging and exit statuses (0 ok, 2 bad configuration, 1 anything
//! else; `status`: 0 healthy, 1 degraded, 3 no agent). Everything below it is handed its
//! collaborators explicitly.

use crate::agent::{EcsAgent, HttpAgent};
use crate::asg::SdkAutoScaling;
use crate::aws::{self, AwsCalls};
use crate::boot::{self, Node, PhaseTime, Progress};
use crate::config::{self, ConfigError, Fragment, Loaded, RuntimeKind, TAG_PREFIX};
use crate::consul::HttpConsul;
use crate::docker::{BollardDocker, Docker};
use crate::ec2::{Ec2, SdkEc2};
use crate::ecs::SdkEcs;
use crate::facts::InstanceFacts;
use crate::hostfs::{HostFs, Perms, RootedFs};
use crate::image;
use crate::imds::{AwsImds, Imds};
use crate::lifecycle::drain::{wait_for_trigger, Drain, DrainRequest, Trigger, Withdraw};
use crate::lifecycle::heal::SelfHeal;
use crate::lifecycle::ready::ReadinessGate;
use crate::logging::{self, Logging};
use crate::render::{self, Renderer};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::ecs::EcsRuntime;
use crate::status::{self, client, notify, server, Board};
use crate::supervisor::{Runtime, Supervisor, Until};
use crate::systemd::{Notice, ServiceManager, Systemd};
use clap::{ArgAction, Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, info_span, warn, Instrument};

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
        Command::Run { common, once } => run(&common, once, logging).await,
        Command::Prepare { common } => {
            let fs = RootedFs::new(&common.root);
            let files = file_layers(&common)?;
            let imds = AwsImds::new();
            let facts = InstanceFacts::read(&imds).await?;
            logging.set_instance_id(&facts.instance_id);
            let calls = Arc::new(AwsCalls::default());
            let sdk = aws::sdk_config(&facts.region).await;
            let ec2 = SdkEc2::new(&sdk, calls);
            let settings = instance_layers(files, &imds, &ec2, &facts).await?.settings;
            // Before ecs.service: a disk baked from another instance is cleaned first.
            image::guard(&settings, &fs, &facts.instance_id)?;
            boot::prepare(&settings, &fs)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::PrepareImage { common } => prepare_image(&common).await,
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

/// The configuration files: the main one, then `conf.d/*.toml` beside it in lexical order.
fn file_layers(common: &Common) -> Result<Vec<Fragment>, ConfigError> {
    let (fs, main, explicit) = match &common.config {
        Some(path) => {
            let path = std::path::absolute(path)
                .map_err(|e| ConfigError::unreadable(path.display().to_string(), e))?;
            (RootedFs::new("/"), path.display().to_string(), true)
        }
        None => (
            RootedFs::new(&common.root),
            config::DEFAULT_CONFIG_PATH.to_string(),
            false,
        ),
    };
    let read = |path: &str| -> Result<Option<Fragment>, ConfigError> {
        let shown = fs.resolve(path).display().to_string();
        let bytes = fs
            .read(path)
            .map_err(|e| ConfigError::unreadable(&shown, e))?;
        bytes
            .map(|b| {
                String::from_utf8(b)
                    .map(|text| Fragment::file(&shown, text))
                    .map_err(|_| ConfigError::unreadable(&shown, "not UTF-8 text"))
            })
            .transpose()
    };
    let mut fragments = Vec::new();
    match read(&main)? {
        Some(f) => fragments.push(f),
        None if explicit => return Err(ConfigError::unreadable(main, "no such file")),
        None => {}
    }
    let dir = Path::new(&main)
        .parent()
        .unwrap_or(Path::new("/"))
        .join("conf.d");
    let dir = dir.to_string_lossy();
    let names = fs
        .list(&dir)
        .map_err(|e| ConfigError::unreadable(dir.to_string(), e))?;
    for name in names.iter().filter(|n| n.ends_with(".toml")) {
        fragments.extend(read(&format!("{dir}/{name}"))?);
    }
    Ok(fragments)
}

/// The files, then the instance's layers: a `[nodeagent]` document in user-data, then its
/// `nodeagent:` tags (from instance metadata when tags are shown there, else DescribeTags).
async fn instance_layers(
    mut fragments: Vec<Fragment>,
    imds: &dyn Imds,
    ec2: &dyn Ec2,
    facts: &InstanceFacts,
) -> anyhow::Result<Loaded> {
    let (user_data, tags) = tokio::try_join!(imds.user_data(), imds.tags(TAG_PREFIX))?;
    if let Some(user_data) = user_data {
        fragments.extend(Fragment::user_data(&user_data));
    }
    let tags = match tags {
        Some(tags) => tags,
        None => match ec2.instance_tags(&facts.instance_id, TAG_PREFIX).await? {
            Some(tags) => tags,
            None => {
                warn!("nodeagent: instance tags are not read: the instance metadata does not show tags and the instance role lacks ec2:DescribeTags; enable one or the other if tags configure this node");
                Vec::new()
            }
        },
    };
    let tags: Vec<(String, String)> = tags
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(TAG_PREFIX)?.to_string(), v)))
        .collect();
    Ok(config::from_layers(&fragments, &tags)?)
}

/// Everything that can be checked without the node: the settings, then every template.
fn check_config(common: &Common) -> anyhow::Result<ExitCode> {
    let settings = config::from_fragments(&file_layers(common)?)?;
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
        runtime_name(settings.runtime),
        settings.cluster,
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints every key of the merged configuration as a dotted TOML line with the layer that set
/// it. Values of keys that look secret are not printed.
async fn show_config(common: &Common) -> anyhow::Result<ExitCode> {
    let files = file_layers(common)?;
    let imds = AwsImds::new();
    let instance = async {
        let facts = InstanceFacts::read(&imds).await?;
        let sdk = aws::sdk_config(&facts.region).await;
        let ec2 = SdkEc2::new(&sdk, Arc::new(AwsCalls::default()));
        instance_layers(files.clone(), &imds, &ec2, &facts).await
    };
    let (loaded, note) = match tokio::time::timeout(Duration::from_secs(15), instance).await {
        Ok(Ok(loaded)) => (loaded, None),
        Ok(Err(e)) if e.chain().any(|c| c.is::<ConfigError>()) => return Err(e),
        Ok(Err(e)) => (config::from_layers(&files, &[])?, Some(format!("{e:#}"))),
        Err(_) => (
            config::from_layers(&files, &[])?,
            Some("instance metadata did not answer".into()),
        ),
    };
    println!("# nodeagent configuration: every key, and the layer that set it (later layers win:");
    println!("# built-in defaults, the main file, conf.d/*.toml, EC2 user-data, nodeagent: tags).");
    if let Some(why) = note {
        println!("# Not on an EC2 instance, or its metadata is unreachable: user-data and tags not read ({why}).");
    }
    let mut leaves = Vec::new();
    flatten(&loaded.merged, "", &mut leaves);
    for (key, value) in leaves {
        let origin = loaded.origins.get(&key).map_or("?", String::as_str);
        let value = if config::looks_secret(&key) {
            "\"<redacted>\"".to_string()
        } else {
            value.to_string()
        };
        println!("{key} = {value}  # {origin}");
    }
    Ok(ExitCode::SUCCESS)
}

fn flatten(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = format!("{prefix}{}", config::dotted_key(k));
        match v {
            toml::Value::Table(t) => flatten(t, &format!("{key}."), out),
            v => out.push((key, v.clone())),
        }
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
}

fn render(common: &Common, facts: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let settings = config::from_fragments(&file_layers(common)?)?;
    let text = std::fs::read_to_string(facts)
        .with_context(|| format!("reading the facts file {}", facts.display()))?;
    let given: RenderFacts = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a facts document (see packaging/sample-facts.json)",
            facts.display()
        )
    })?;
    let files = boot::render_files(
        &settings,
        &given.instance,
        &given.consul_servers,
        given.container_instance_arn.as_deref(),
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
    let lc = file_layers(common)
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
        let path = match file_layers(common).and_then(|f| config::from_fragments(&f)) {
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

/// Boot progress, as the status board shows it.
struct BoardProgress<'a> {
    board: &'a Board,
    waits: Mutex<BTreeMap<&'static str, u64>>,
}

impl Progress for BoardProgress<'_> {
    fn phase(&self, phase: &'static str) {
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

async fn run(common: &Common, once: bool, logging: &Logging) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // From the first moment: a stop during a long boot is a stop, not a kill.
    let mut signals = Signals::install()?;
    let fs = RootedFs::new(&common.root);
    let files = file_layers(common)?;
    // The files alone place the status socket, so `nodeagent status` answers from the start.
    let early = config::from_fragments(&files)?;
    let manager: Arc<dyn ServiceManager> = Arc::new(Systemd);
    let notifier = Arc::new(notify::Notifier::new(
        manager.clone(),
        early.supervision.ready_timeout,
    ));
    let observer: status::Observer = {
        let notifier = notifier.clone();
        Arc::new(move |s| notifier.observe(s))
    };
    let board = Board::new(&early.cluster, runtime_name(early.runtime), Some(observer));
    let _extender = AbortOnDrop(tokio::spawn(notifier.clone().keep_extending(board.clone())));
    let calls = Arc::new(AwsCalls::default());
    let snapshot: server::Snapshot = {
        let (board, calls) = (board.clone(), calls.clone());
        Arc::new(move || {
            board.set_aws_calls(calls.snapshot());
            board.snapshot()
        })
    };
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
        board.set_phase("stopping");
        manager.notify(&[
            Notice::Stopping,
            Notice::Status("stopping; the tasks keep running".into()),
        ]);
        info!("stopping{during}; the tasks keep running");
        Ok(ExitCode::SUCCESS)
    };

    // 1-5: facts, configuration, join, Consul, the ECS agent, the files.
    let boot = boot_node(files, &fs, &board, &calls, logging, started);
    let Booted {
        settings,
        facts,
        report,
        sdk,
        imds,
    } = tokio::select! {
        booted = boot => booted?,
        _ = signals.recv() => return stop(" during the boot"),
    };
    notifier.set_ready_timeout(settings.supervision.ready_timeout);
    if settings.status.socket != early.status.socket {
        warn!(socket = %socket.display(), "status.socket from EC2 user-data or tags is ignored: the socket is placed by the configuration files");
    }
    let _metrics = match settings.metrics.listen.as_str() {
        "" => None,
        addr => {
            let listener = server::bind_metrics(addr).await?;
            Some(AbortOnDrop(tokio::spawn(server::serve_metrics(
                listener,
                snapshot.clone(),
            ))))
        }
    };

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
                .inspect_err(|e| warn!("no Docker engine ({e:#}): task deaths are found by the periodic reconcile only"))
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
    let mut task_status = supervisor.watch();
    board.set_tasks(&task_status.borrow_and_update());
    board.set_phase("supervise");
    let _forward = AbortOnDrop(tokio::spawn({
        let board = board.clone();
        async move {
            while task_status.changed().await.is_ok() {
                let tasks = task_status.borrow_and_update().clone();
                board.set_tasks(&tasks);
            }
        }
    }));
    // Bootstrap only (`--once`) does not stay to keep the node's standing.
    let _lifecycle = if once {
        Vec::new()
    } else {
        // A drain an earlier agent began goes on: nothing is started again.
        let resume = fs.read(image::DRAIN_MARKER).ok().flatten().is_some();
        if resume {
            warn!(
                marker = image::DRAIN_MARKER,
                "this node was being drained: resuming the drain, starting nothing"
            );
            supervisor.suspend_all();
        }
        start_lifecycle(
            &settings,
            &facts,
            &report,
            &sdk,
            &calls,
            imds,
            &supervisor,
            &board,
            drains,
            fs.clone(),
            resume,
        )
    };
    let _watchdog = AbortOnDrop(tokio::spawn(notify::watchdog(
        manager.clone(),
        supervisor.liveness(),
    )));
    let span = info_span!("phase", phase = "supervise");
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

/// `prepare-image`: refuses while anything that holds the identity runs, then removes it.
async fn prepare_image(common: &Common) -> anyhow::Result<ExitCode> {
    let settings = config::from_fragments(&file_layers(common)?)?;
    let fs = RootedFs::new(&common.root);
    let socket = fs.resolve(&settings.status.socket);
    if client::fetch(&socket).await.is_ok() {
        anyhow::bail!(
            "nodeagent runs (it answers on {}): stop it first (systemctl stop nodeagent), it records the instance again",
            socket.display()
        );
    }
    if settings.ecs.join {
        let agent = HttpAgent::new(&settings.ecs.introspection_url)?;
        match agent.metadata().await {
            Err(e) if e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(|r| r.is_connect())) => {}
            Ok(_) | Err(_) => anyhow::bail!(
                "the ECS agent answers at {}: stop it first (systemctl stop ecs), or its state is written again",
                agent.url()
            ),
        }
    }
    let containers = match BollardDocker::connect().await {
        Ok(docker) => docker.list(&[]).await,
        Err(e) => Err(e),
    };
    match containers {
        Err(e) if e.chain().any(|c| c.is::<crate::docker::EngineAbsent>()) => {
            info!("no Docker engine runs: no container either")
        }
        Err(e) => {
            return Err(e.context(
                "cannot tell whether containers run: stop docker.service, or fix the access to it",
            ))
        }
        Ok(containers) => {
            let running: Vec<String> = containers
                .into_iter()
                .filter(|c| c.running)
                .map(|c| c.id.chars().take(12).collect())
                .collect();
            if !running.is_empty() {
                anyhow::bail!(
                    "{} containers run ({}): stop them first (docker stop), the image must not start them again",
                    running.len(),
                    running.join(", ")
                );
            }
        }
    }
    let mut count = 0;
    image::clean(&settings, &fs, &mut |path| {
        println!("removed {path}");
        count += 1;
    })?;
    println!("instance identity removed ({count} items): the disk is ready to be imaged");
    Ok(ExitCode::SUCCESS)
}

/// The node's standing beside the supervision: the readiness gate, self-healing, and the
/// drain (on a trigger seen in IMDS or a request on the socket); the board shows them.
#[allow(clippy::too_many_arguments)]
fn start_lifecycle(
    settings: &config::Settings,
    facts: &InstanceFacts,
    report: &boot::BootReport,
    sdk: &aws_config::SdkConfig,
    calls: &Arc<AwsCalls>,
    imds: Arc<dyn Imds>,
    supervisor: &Supervisor,
    board: &Board,
    mut drains: tokio::sync::mpsc::Receiver<DrainRequest>,
    fs: RootedFs,
    resume: bool,
) -> Vec<AbortOnDrop<()>> {
    use tokio::sync::watch;
    let lc = &settings.lifecycle;
    let ecs = Arc::new(SdkEcs::new(sdk, calls.clone()));
    let asg = Arc::new(SdkAutoScaling::new(sdk, calls.clone()));
    let mut running = Vec::new();

    let readiness = match &report.container_instance_arn {
        Some(ci) if !lc.ready_attribute.is_empty() => {
            let (present, mut seen) = watch::channel(None);
            // A resumed drain withdraws the attribute from the start.
            let (withdraw, withdrawn) = watch::channel(resume);
            let attribute = lc.ready_attribute.clone();
            board.update(|s| {
                s.readiness = Some(status::Readiness {
                    attribute: attribute.clone(),
                    set: None,
                })
            });
            let gate = ReadinessGate {
                api: ecs.clone(),
                cluster: settings.cluster.clone(),
                container_instance: ci.clone(),
                attribute,
                grace: lc.degraded_grace,
                reassert: lc
                    .ready_attribute_at_join
                    .then_some(Duration::from_secs(300)),
            };
            let withdraw = Withdraw {
                withdraw,
                present: seen.clone(),
            };
            let board = board.clone();
            running.push(AbortOnDrop(tokio::spawn(gate.run(
                supervisor.watch(),
                withdrawn,
                present,
            ))));
            running.push(AbortOnDrop(tokio::spawn(async move {
                while seen.changed().await.is_ok() {
                    let set = *seen.borrow_and_update();
                    board.update(|s| {
                        if let Some(r) = &mut s.readiness {
                            r.set = set;
                        }
                    });
                }
            })));
            Some(withdraw)
        }
        _ => None,
    };

    if !lc.unhealthy_after.is_zero() {
        let heal = SelfHeal {
            asg: asg.clone(),
            instance_id: facts.instance_id.clone(),
            after: lc.unhealthy_after,
        };
        running.push(AbortOnDrop(tokio::spawn(heal.run(supervisor.watch()))));
    }

    let consul: Arc<dyn crate::consul::ConsulAgent> = match HttpConsul::new(&settings.consul.api) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            warn!("no Consul client ({e:#}): no drain");
            return running;
        }
    };
    let mut drain = Drain {
        cluster: settings.cluster.clone(),
        container_instance: report.container_instance_arn.clone(),
        instance_id: facts.instance_id.clone(),
        started_by: crate::runtime::ecs::started_by(&facts.instance_id),
        ecs,
        consul,
        asg,
        control: supervisor.control(),
        readiness,
        // The levels in reverse; within a level, the start order (registrator before linkerd).
        stop_order: settings
            .start_levels()
            .into_iter()
            .rev()
            .flatten()
            .map(|t| t.name.to_string())
            .collect(),
        consul_task: Some(settings.consul.agent_task.clone()).filter(|t| !t.is_empty()),
        lifecycle_hook: Some(lc.lifecycle_hook.clone()).filter(|h| !h.is_empty()),
        tasks_timeout: lc.drain_tasks_timeout,
        step_timeout: lc.drain_step_timeout,
    };
    let (poll, rebalance) = (lc.trigger_poll, lc.drain_on_rebalance);
    let board = board.clone();
    running.push(AbortOnDrop(tokio::spawn(async move {
        let trigger = if resume {
            Trigger::Resumed
        } else {
            tokio::select! {
                t = wait_for_trigger(imds.clone(), poll, rebalance) => t,
                Some(request) = drains.recv() => {
                    if let Some(t) = request.tasks_timeout {
                        drain.tasks_timeout = t;
                    }
                    Trigger::Requested
                }
            }
        };
        // The node stays drained, whatever happens to this agent.
        if let Err(e) = fs
            .create_dir_all(image::RUNTIME_DIR, Perms::mode(0o750))
            .and_then(|()| {
                fs.write_atomic(
                    image::DRAIN_MARKER,
                    trigger.name().as_bytes(),
                    Perms::mode(0o644),
                )
            })
        {
            warn!("cannot record the drain ({e}): a restarted agent would not resume it");
        }
        let (progress, mut seen) = watch::channel(None);
        board.set_phase("draining");
        let follow = {
            let board = board.clone();
            async move {
                while seen.changed().await.is_ok() {
                    let d = seen.borrow_and_update().clone();
                    board.update(|s| s.drain = d);
                }
            }
        };
        tokio::join!(
            async {
                drain.run(trigger, &progress).await;
                board.set_phase("drained");
                if trigger != Trigger::Terminated {
                    drain.complete_when_terminated(imds, poll, &progress).await;
                }
                drop(progress);
            },
            follow
        );
        // Later requests find the drain done; the socket keeps answering.
        while drains.recv().await.is_some() {}
    })));
    running
}

/// What the boot found, for the supervision that follows.
struct Booted {
    settings: config::Settings,
    facts: InstanceFacts,
    report: boot::BootReport,
    sdk: aws_config::SdkConfig,
    imds: Arc<dyn Imds>,
}

/// Steps 1 to 5: the instance facts, then the configuration layers the instance carries, then
/// the boot proper; the board follows along.
async fn boot_node(
    files: Vec<Fragment>,
    fs: &RootedFs,
    board: &Board,
    calls: &Arc<AwsCalls>,
    logging: &Logging,
    started: Instant,
) -> anyhow::Result<Booted> {
    let imds = AwsImds::new();
    let facts = InstanceFacts::read(&imds)
        .instrument(info_span!("phase", phase = "imds"))
        .await?;
    logging.set_instance_id(&facts.instance_id);
    board.set_facts(&facts);
    match image::baked_from(fs, &facts.instance_id) {
        Ok(Some(other)) => {
            warn!(baked_from = %other, "this disk carries the identity of instance {other}: run `nodeagent prepare` before ecs.service (nodeagent-prepare.service), which removes it")
        }
        Ok(None) => image::record(fs, &facts.instance_id)?,
        Err(e) => {
            warn!("cannot tell whose identity this disk carries: {e:#}")
        }
    }
    let sdk = aws::sdk_config(&facts.region).await;
    let ec2 = SdkEc2::new(&sdk, calls.clone());
    let settings = instance_layers(files, &imds, &ec2, &facts)
        .instrument(info_span!("phase", phase = "imds"))
        .await?
        .settings;
    let imds_phase = PhaseTime {
        phase: "imds",
        started_ms: 0.0,
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    info!(instance_id = %facts.instance_id, local_ipv4 = %facts.local_ipv4, az = %facts.availability_zone, "read instance metadata");
    board.update(|s| {
        s.cluster = settings.cluster.clone();
        s.runtime = runtime_name(settings.runtime).into();
    });

    let agent = HttpAgent::new(&settings.ecs.introspection_url)?;
    let node = Node {
        fs,
        ec2: &ec2,
        agent: &agent,
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
        .find(|p| p.phase == "discover")
        .map_or(SystemTime::now(), |p| {
            boot_began + Duration::from_secs_f64((p.started_ms + p.took_ms) / 1e3)
        });
    board.set_report(&report, &imds_phase, found_at);
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
    })
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

fn runtime_name(kind: RuntimeKind) -> &'static str {
    match kind {
        RuntimeKind::Ecs => "ecs",
        RuntimeKind::Docker => "docker",
    }
}
