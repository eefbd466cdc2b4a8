//! A fleet on a virtual clock, past what one machine can run for real: every node runs the
//! agent's own code — the boot ([`nodeagent::boot::run`]: the Consul servers' discovery with its
//! backoff, the ECS agent wait, rendering), the supervision ([`Supervisor`] over the
//! [`EcsRuntime`] with the daemon's own task specs: the first listing, every start with its
//! retries, the reconciles) and the readiness gate — on tokio's paused clock, against an
//! in-process model of the account: the same token buckets as the world's fault layer
//! ([`super::fleet::BUCKETS`]) and ECS's tasks. Only the SDK and the network are replaced: each
//! call takes a virtual 15–45 ms and is counted by the node's [`AwsCalls`] as the SDK boundary
//! counts it (a throttled call is the service's throttling error, classified `Throttled`). The
//! model throttles but never loses an answer: the look after a lost `StartTask` is the fault
//! matrix's (`tests/faults.rs`), not the simulation's.

use super::fleet::{buckets, floor, Bucket, Summary};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use nodeagent::agent::{AgentMetadata, AgentTask, EcsAgent};
use nodeagent::aws::{AwsCalls, AwsError, FailureKind, FIRST_CALL_JITTER};
use nodeagent::config::{self, Fragment, Settings};
use nodeagent::ec2::Ec2;
use nodeagent::ecs::{ContainerInstance, Ecs, EcsTask, StartOutcome};
use nodeagent::facts::InstanceFacts;
use nodeagent::hostfs::RootedFs;
use nodeagent::lifecycle::ready::ReadinessGate;
use nodeagent::phase::Phase;
use nodeagent::runtime::ecs::{self, EcsRuntime};
use nodeagent::runtime::{Instance, Runtime, RuntimeEvent};
use nodeagent::supervisor::health::{Probe, Prober};
use nodeagent::supervisor::{Supervisor, Until};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

const CLUSTER: &str = "l5d-demo";
/// Each node's configuration: the defaults, health checks off (nothing answers them here).
const CONFIG: &str =
    "[tasks.consul-agent.health]\nhttp = \"\"\n[tasks.linkerd.health]\nhttp = \"\"\n";

/// AWS as the nodes see it: the buckets, the tasks, every call's time.
struct Model {
    buckets: Vec<(Bucket, f64, Instant)>,
    tasks: HashMap<String, SimTask>,
    /// Container instance → its tasks' ARNs.
    on: HashMap<String, Vec<String>>,
    next: u64,
    /// Every call (served or throttled), when it reached AWS.
    calls: Vec<Instant>,
    throttled: u64,
    /// Calls by operation: (served, throttled).
    by_op: std::collections::BTreeMap<String, (u64, u64)>,
}

struct SimTask {
    family: String,
    started_by: String,
    ci: String,
    stopped: bool,
}

impl Model {
    /// One call of `op`: a token from every bucket naming it, or throttled.
    fn take(&mut self, op: &str) -> bool {
        let now = Instant::now();
        self.calls.push(now);
        let mut ok = true;
        for (b, tokens, last) in self
            .buckets
            .iter_mut()
            .filter(|(b, ..)| b.ops.contains(&op))
        {
            *tokens = (*tokens + (now - *last).as_secs_f64() * b.rate).min(b.burst);
            *last = now;
            ok &= *tokens >= 1.0;
        }
        let counts = self.by_op.entry(op.to_string()).or_default();
        if ok {
            counts.0 += 1;
            for (_, tokens, _) in self
                .buckets
                .iter_mut()
                .filter(|(b, ..)| b.ops.contains(&op))
            {
                *tokens -= 1.0;
            }
        } else {
            counts.1 += 1;
            self.throttled += 1;
        }
        ok
    }

    fn task(&self, arn: &str) -> Option<EcsTask> {
        let t = self.tasks.get(arn)?;
        let status = if t.stopped { "STOPPED" } else { "RUNNING" };
        Some(EcsTask {
            arn: arn.to_string(),
            family: t.family.clone(),
            revision: Some(1),
            overridden: false,
            started_by: Some(t.started_by.clone()),
            last_status: status.into(),
            desired_status: status.into(),
            container_instance_arn: Some(t.ci.clone()),
        })
    }

    fn live_on(&self, ci: &str) -> Vec<String> {
        self.on
            .get(ci)
            .into_iter()
            .flatten()
            .filter(|arn| !self.tasks[*arn].stopped)
            .cloned()
            .collect()
    }

    /// Families with more than one running task on a container instance.
    fn duplicates(&self) -> usize {
        let mut count: HashMap<(&str, &str), u32> = HashMap::new();
        for t in self.tasks.values().filter(|t| !t.stopped) {
            *count.entry((&t.ci, &t.family)).or_default() += 1;
        }
        count.values().filter(|n| **n > 1).count()
    }
}

/// One node's view of AWS and of its ECS agent.
struct SimNode {
    model: Arc<Mutex<Model>>,
    calls: Arc<AwsCalls>,
    ci: String,
}

impl SimNode {
    /// One AWS call of `op`, there and back: counted, and throttled when a bucket is empty.
    async fn call(&self, op: &'static str) -> Result<(), AwsError> {
        let latency = Duration::from_micros(rand::rng().random_range(15_000..45_000));
        tokio::time::sleep(latency / 2).await;
        let ok = self.model.lock().unwrap().take(op);
        tokio::time::sleep(latency / 2).await;
        if ok {
            self.calls.ok(op);
            return Ok(());
        }
        let code = if op.starts_with("ec2:") {
            "RequestLimitExceeded"
        } else {
            "ThrottlingException"
        };
        let e = AwsError {
            op,
            kind: FailureKind::Throttled,
            code: Some(code.into()),
            what: String::new(),
            message: "Rate exceeded".into(),
        };
        self.calls.failed(&e);
        Err(e)
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap()
    }
}

#[async_trait]
impl Ec2 for SimNode {
    async fn running_private_ips(&self, _: &str, _: &str) -> anyhow::Result<Vec<String>> {
        self.calls.pace().await; // as the SDK boundary does: a boot's first call
        self.call("ec2:DescribeInstances").await?;
        Ok(vec!["10.0.0.10".into(), "10.0.0.11".into()])
    }
    async fn instance_tags(
        &self,
        _: &str,
        _: &str,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        Ok(None)
    }
}

#[async_trait]
impl Ecs for SimNode {
    async fn list_running_tasks(&self, _: &str, ci: &str) -> anyhow::Result<Vec<String>> {
        self.call("ecs:ListTasks").await?;
        Ok(self.model().live_on(ci))
    }
    async fn running_tasks_of(
        &self,
        _: &str,
        ci: &str,
        family: &str,
        started_by: &str,
    ) -> anyhow::Result<Vec<String>> {
        self.call("ecs:ListTasks").await?;
        let m = self.model();
        Ok(m.live_on(ci)
            .into_iter()
            .filter(|a| m.tasks[a].family == family && m.tasks[a].started_by == started_by)
            .collect())
    }
    async fn describe_tasks(&self, _: &str, arns: &[String]) -> anyhow::Result<Vec<EcsTask>> {
        let mut out = Vec::new();
        for chunk in arns.chunks(100) {
            self.call("ecs:DescribeTasks").await?;
            let m = self.model();
            out.extend(chunk.iter().filter_map(|a| m.task(a)));
        }
        Ok(out)
    }
    async fn stop_task(&self, _: &str, arn: &str, _: &str) -> anyhow::Result<()> {
        self.call("ecs:StopTask").await?;
        if let Some(t) = self.model().tasks.get_mut(arn) {
            t.stopped = true;
        }
        Ok(())
    }
    async fn start_task(
        &self,
        _: &str,
        family: &str,
        ci: &str,
        started_by: &str,
    ) -> anyhow::Result<StartOutcome> {
        self.call("ecs:StartTask").await?;
        let mut m = self.model();
        m.next += 1;
        let arn = format!(
            "arn:aws:ecs:us-east-1:123456789012:task/{CLUSTER}/{:032x}",
            m.next
        );
        let family = family.split(':').next().unwrap_or(family).to_string();
        m.tasks.insert(
            arn.clone(),
            SimTask {
                family,
                started_by: started_by.into(),
                ci: ci.into(),
                stopped: false,
            },
        );
        m.on.entry(ci.into()).or_default().push(arn.clone());
        Ok(StartOutcome::Started(m.task(&arn).expect("just started")))
    }
}

#[async_trait]
impl ContainerInstance for SimNode {
    async fn set_draining(&self, _: &str, _: &str) -> anyhow::Result<()> {
        Ok(self.call("ecs:UpdateContainerInstancesState").await?)
    }
    async fn tasks_not_stopped(&self, cluster: &str, ci: &str) -> anyhow::Result<Vec<EcsTask>> {
        let arns = self.list_running_tasks(cluster, ci).await?;
        self.describe_tasks(cluster, &arns).await
    }
    async fn put_attribute(&self, _: &str, _: &str, _: &str, _: &str) -> anyhow::Result<()> {
        Ok(self.call("ecs:PutAttributes").await?)
    }
    async fn delete_attribute(&self, _: &str, _: &str, _: &str, _: &str) -> anyhow::Result<()> {
        Ok(self.call("ecs:DeleteAttributes").await?)
    }
}

#[async_trait]
impl EcsAgent for SimNode {
    async fn metadata(&self) -> anyhow::Result<AgentMetadata> {
        Ok(AgentMetadata {
            cluster: CLUSTER.into(),
            container_instance_arn: Some(self.ci.clone()),
            version: None,
        })
    }
    /// The local agent knows its tasks at once (no eventual consistency).
    async fn tasks(&self) -> anyhow::Result<Vec<AgentTask>> {
        let m = self.model();
        Ok(m.live_on(&self.ci)
            .into_iter()
            .map(|arn| AgentTask {
                family: m.tasks[&arn].family.clone(),
                arn,
                desired_status: "RUNNING".into(),
                known_status: "RUNNING".into(),
            })
            .collect())
    }
    fn url(&self) -> &str {
        "sim"
    }
}

/// Health checks are off: never asked.
struct NoProbes;

#[async_trait]
impl Prober for NoProbes {
    async fn check(&self, _: &str, _: &Probe, _: Duration) -> Result<(), String> {
        Ok(())
    }
}

struct Quiet;

impl nodeagent::boot::Progress for Quiet {
    fn phase(&self, _: Phase) {}
    fn waiting(&self, _: &'static str, _: Option<Duration>) {}
}

/// The runtime, with the starts that failed for good counted (a give-up).
struct Counting {
    inner: EcsRuntime,
    gave_up: Arc<Mutex<bool>>,
}

#[async_trait]
impl Runtime for Counting {
    async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        self.inner.instances().await
    }
    async fn start(&self, task: &str) -> anyhow::Result<Instance> {
        let started = self.inner.start(task).await;
        if started.is_err() {
            *self.gave_up.lock().unwrap() = true;
        }
        started
    }
    async fn stop(&self, instance: &Instance) -> anyhow::Result<()> {
        self.inner.stop(instance).await
    }
    async fn output_tail(&self, instance: &Instance, lines: usize) -> anyhow::Result<String> {
        self.inner.output_tail(instance, lines).await
    }
    async fn wait_stopped(&self, instance: &Instance, limit: Duration) -> anyhow::Result<()> {
        self.inner.wait_stopped(instance, limit).await
    }
    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>> {
        self.inner.events().await
    }
}

/// What was seen of one node (seconds after the fleet's start).
#[derive(Default, Clone)]
struct Seen {
    converged_at: Option<f64>,
    ready_at: Option<f64>,
    /// Served and throttled calls until the readiness attribute was set.
    calls: Option<(u64, u64)>,
    gave_up: bool,
    /// Why its boot failed.
    error: Option<String>,
}

/// What every simulated node shares: AWS, the configuration, the fleet's start, the stop.
#[derive(Clone)]
struct Fleet {
    model: Arc<Mutex<Model>>,
    settings: Arc<Settings>,
    t0: Instant,
    stop: watch::Receiver<bool>,
}

/// Node `k`: started `delay` after the fleet, boots under `dir`, then supervises until the
/// fleet stops; what is seen of it goes to `seen`.
async fn node(
    k: usize,
    fleet: Fleet,
    dir: std::path::PathBuf,
    delay: Duration,
    seen: Arc<Mutex<Seen>>,
) {
    let Fleet {
        model,
        settings,
        t0,
        mut stop,
    } = fleet;
    tokio::time::sleep(delay).await;
    // As `nodeagent run` accounts its calls: the boot's first one jittered.
    let calls = Arc::new(AwsCalls::jittered(FIRST_CALL_JITTER));
    let ci = format!("arn:aws:ecs:us-east-1:123456789012:container-instance/{CLUSTER}/{k:08}");
    let sim = Arc::new(SimNode {
        model,
        calls: calls.clone(),
        ci: ci.clone(),
    });
    let facts = InstanceFacts {
        instance_id: format!("i-{k:017x}"),
        local_ipv4: format!("10.{}.{}.{}", 1 + k / 65536, (k / 256) % 256, k % 256),
        region: "us-east-1".into(),
        availability_zone: "us-east-1a".into(),
        instance_type: "t3.medium".into(),
        ami_id: "ami-00000000".into(),
    };
    std::fs::create_dir_all(&dir).expect("the node's root");
    let fs = RootedFs::new(dir);
    let boot_node = nodeagent::boot::Node {
        fs: &fs,
        ec2: sim.as_ref(),
        agent: sim.as_ref(),
        secrets: &NoSecrets,
    };
    let report = match nodeagent::boot::run(&settings, &facts, &boot_node, &Quiet).await {
        Ok(report) => report,
        Err(e) => {
            let mut s = seen.lock().unwrap();
            s.gave_up = true;
            s.error = Some(format!("{e:#}"));
            return;
        }
    };
    let gave_up = Arc::new(Mutex::new(false));
    let runtime = Counting {
        inner: EcsRuntime::new(ecs::Context {
            ecs: sim.clone(),
            agent: Some(sim.clone()),
            docker: None,
            fs: None,
            cluster: CLUSTER.into(),
            container_instance: ci.clone(),
            instance_id: facts.instance_id.clone(),
            tasks: settings
                .enabled_tasks()
                .map(|t| (t.name.to_string(), t.family.to_string()))
                .collect(),
            start_timeout: settings.ecs.start_timeout,
        }),
        gave_up: gave_up.clone(),
    };
    let mut supervisor = Supervisor::new(
        Arc::new(runtime),
        Arc::new(NoProbes),
        settings.supervision.clone(),
        // The daemon's own specs: the health checks are off in the configuration.
        nodeagent::daemon::task_specs(&settings, &facts, &report).expect("the task specs"),
    );
    let gate = ReadinessGate {
        api: sim.clone(),
        cluster: CLUSTER.into(),
        container_instance: ci,
        attribute: settings.lifecycle.ready_attribute.clone(),
        grace: settings.lifecycle.degraded_grace,
        reassert: None,
        record: Some(Arc::new(fs.clone())),
    };
    let (present, mut set) = watch::channel(None);
    let (_withdraw, withdrawn) = watch::channel(false);
    let gate = tokio::spawn(gate.run(supervisor.watch(), withdrawn, present));
    let mut tasks = supervisor.watch();
    let watcher = tokio::spawn(async move {
        loop {
            let now = (Instant::now() - t0).as_secs_f64();
            let all = {
                let t = tasks.borrow_and_update();
                !t.is_empty() && t.iter().all(|t| t.instance.is_some())
            };
            {
                let mut s = seen.lock().unwrap();
                s.gave_up |= *gave_up.lock().unwrap();
                if all && s.converged_at.is_none() {
                    s.converged_at = Some(now);
                }
                if all && *set.borrow_and_update() == Some(true) && s.ready_at.is_none() {
                    s.ready_at = Some(now);
                    let c = calls.snapshot();
                    let served = c.values().map(|c| c.calls - c.throttled).sum();
                    s.calls = Some((served, c.values().map(|c| c.throttled).sum()));
                }
            }
            tokio::select! {
                r = tasks.changed() => if r.is_err() { return },
                r = set.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    let _ = supervisor
        .run(Until::Shutdown, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    gate.abort();
    watcher.abort();
}

/// A scratch directory for the nodes' roots: in memory (`/dev/shm`) when there is one, as a
/// boot's writes are flushed to disk and thousands of them would wait on the disk, not the clock.
pub fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    match shm.is_dir() {
        true => tempfile::tempdir_in(shm),
        false => tempfile::tempdir(),
    }
    .expect("a scratch directory")
}

/// Runs `nodes` simulated nodes, the buckets at `scale` of AWS's numbers, all started within
/// the first second; then `steady` of steady state after every node converged and set its
/// readiness attribute. Files go under `dir` (one root per node).
pub fn simulate(nodes: usize, scale: f64, steady: Duration, dir: &std::path::Path) -> Summary {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a paused runtime");
    rt.block_on(async {
        let settings = Arc::new(
            config::from_fragments(&[Fragment::file("sim.toml", CONFIG)]).expect("settings"),
        );
        let t0 = Instant::now();
        let model = Arc::new(Mutex::new(Model {
            buckets: buckets(scale)
                .into_iter()
                .map(|b| (b, b.burst, t0))
                .collect(),
            tasks: HashMap::new(),
            on: HashMap::new(),
            next: 0,
            calls: Vec::new(),
            throttled: 0,
            by_op: Default::default(),
        }));
        let (stop, stopped) = watch::channel(false);
        let fleet = Fleet {
            model: model.clone(),
            settings,
            t0,
            stop: stopped,
        };
        let seen: Vec<Arc<Mutex<Seen>>> = (0..nodes).map(|_| Arc::default()).collect();
        let mut running = Vec::new();
        for (k, seen) in seen.iter().enumerate() {
            let delay = Duration::from_micros(rand::rng().random_range(0..1_000_000));
            let root = dir.join(format!("node-{k}"));
            running.push(tokio::spawn(node(
                k,
                fleet.clone(),
                root,
                delay,
                seen.clone(),
            )));
        }
        // Until every node is ready (or gave up), or far past the floor.
        let limit = Duration::from_secs_f64(floor(nodes, scale) * 4.0 + 600.0);
        let done = |s: &Seen| s.gave_up || s.ready_at.is_some();
        while t0.elapsed() < limit && !seen.iter().all(|s| done(&s.lock().unwrap())) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let seen: Vec<Seen> = seen.iter().map(|s| s.lock().unwrap().clone()).collect();
        if let Some(e) = seen.iter().find_map(|s| s.error.as_ref()) {
            eprintln!("fleet: a simulated boot failed: {e}");
        }
        let converged: Vec<f64> = seen.iter().filter_map(|s| s.converged_at).collect();
        let settled = seen
            .iter()
            .map(|s| s.converged_at.unwrap_or(0.0).max(s.ready_at.unwrap_or(0.0)))
            .fold(0.0, f64::max);
        let all = converged.len() == nodes;
        let mut steady_per_min = 0.0;
        if all && !steady.is_zero() {
            let from = t0 + Duration::from_secs_f64(settled);
            tokio::time::sleep_until(from + steady).await;
            let m = model.lock().unwrap();
            let calls = m
                .calls
                .iter()
                .filter(|at| **at >= from && **at < from + steady)
                .count();
            steady_per_min = calls as f64 / nodes as f64 / (steady.as_secs_f64() / 60.0);
        }
        let _ = stop.send(true);
        for r in running {
            let _ = r.await;
        }
        let m = model.lock().unwrap();
        Summary {
            nodes,
            converged: converged.len(),
            converged_in: all.then(|| converged.iter().copied().fold(0.0, f64::max)),
            floor: floor(nodes, scale),
            boot_calls: seen.iter().filter_map(|s| s.calls.map(|c| c.0)).collect(),
            boot_throttled: seen.iter().filter_map(|s| s.calls.map(|c| c.1)).collect(),
            steady_per_min,
            throttled: m.throttled,
            duplicates: m.duplicates(),
            give_ups: seen.iter().filter(|s| s.gave_up).count(),
            note: Some(if scale < 1.0 {
                format!(
                    "simulated; buckets at {:.0}% of AWS's documented rates",
                    scale * 100.0
                )
            } else {
                "simulated".into()
            }),
            by_operation: m.by_op.clone(),
        }
    })
}

/// The simulated nodes have no secrets (the default configuration): nothing is asked of it.
struct NoSecrets;

#[async_trait]
impl nodeagent::secrets::SecretStore for NoSecrets {
    async fn parameters(
        &self,
        _names: &[String],
    ) -> anyhow::Result<std::collections::BTreeMap<String, nodeagent::secrets::Fetched>> {
        anyhow::bail!("no parameter is configured")
    }
    async fn secret_value(&self, _id: &str) -> anyhow::Result<nodeagent::secrets::Fetched> {
        anyhow::bail!("no secret is configured")
    }
}
