//! The fault matrix's instruments (`tests/faults.rs`): an observer of the emulated ECS that the
//! world's fault layer leaves alone, a background watch that checks the invariants while a
//! fault is on (never two running copies of a task, no torn rendered file), the rendered files'
//! parsers, the world's control API from synchronous tests, and a placement check moto lacks
//! (`RESOURCE:PORTS`).

use super::World;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The world's marker for its own AWS requests (`INTERNAL_UA` in world.py): requests whose
/// user agent carries it are neither faulted, lagged, throttled nor counted. The observer uses
/// it so that what it sees is moto's truth, and so that it does not use up a rule's `times`.
pub const INTERNAL_APP: &str = "nodeagent-world-internal";

/// The SDK configuration of the test's observer: the world's moto, its own requests unfaulted.
pub async fn observer_sdk(world: &World) -> aws_config::SdkConfig {
    observer_sdk_at(&world.info.moto_url, &world.info.region).await
}

pub async fn observer_sdk_at(moto_url: &str, region: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto_url)
        .region(aws_config::Region::new(region.to_string()))
        .app_name(aws_config::AppName::new(INTERNAL_APP).unwrap())
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await
}

/// A task as moto has it on this node's container instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MotoTask {
    pub family: String,
    pub arn: String,
    pub last_status: String,
    pub desired_status: String,
}

impl MotoTask {
    /// Running or on its way (not told to stop, not stopped).
    pub fn live(&self) -> bool {
        self.desired_status == "RUNNING" && self.last_status != "STOPPED"
    }
}

/// Every task moto has on the cluster's (one) container instance, whatever its status.
pub async fn moto_tasks(ecs: &aws_sdk_ecs::Client, cluster: &str) -> anyhow::Result<Vec<MotoTask>> {
    let cis = ecs
        .list_container_instances()
        .cluster(cluster)
        .send()
        .await?;
    let Some(ci) = cis.container_instance_arns().first().cloned() else {
        return Ok(Vec::new());
    };
    let mut arns = Vec::new();
    for desired in [
        aws_sdk_ecs::types::DesiredStatus::Running,
        aws_sdk_ecs::types::DesiredStatus::Stopped,
    ] {
        let out = ecs
            .list_tasks()
            .cluster(cluster)
            .container_instance(&ci)
            .desired_status(desired)
            .send()
            .await?;
        arns.extend(out.task_arns().iter().cloned());
    }
    arns.sort();
    arns.dedup();
    let mut tasks = Vec::new();
    for chunk in arns.chunks(100) {
        let out = ecs
            .describe_tasks()
            .cluster(cluster)
            .set_tasks(Some(chunk.to_vec()))
            .send()
            .await?;
        tasks.extend(out.tasks().iter().map(|t| {
            MotoTask {
                family: t
                    .task_definition_arn()
                    .unwrap_or_default()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                arn: t.task_arn().unwrap_or_default().to_string(),
                last_status: t.last_status().unwrap_or_default().to_string(),
                desired_status: t.desired_status().unwrap_or_default().to_string(),
            }
        }));
    }
    tasks.sort();
    Ok(tasks)
}

/// Live tasks per family, from moto, now (a synchronous call for the test's thread).
pub fn live_by_family(world: &World) -> BTreeMap<String, Vec<String>> {
    super::block_on(async {
        let ecs = aws_sdk_ecs::Client::new(&observer_sdk(world).await);
        let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in moto_tasks(&ecs, &world.info.cluster).await.unwrap() {
            if t.live() {
                by.entry(t.family).or_default().push(t.arn);
            }
        }
        by
    })
}

/// The ARNs of the live tasks, sorted (to compare before and after a fault).
pub fn live_arns(world: &World) -> Vec<String> {
    let mut arns: Vec<String> = live_by_family(world).into_values().flatten().collect();
    arns.sort();
    arns
}

/// One family, one live task each: the steady state of a node.
pub fn three_once(by: &BTreeMap<String, Vec<String>>) -> bool {
    by.len() == 3 && by.values().all(|a| a.len() == 1)
}

// ---------------------------------------------------------------- the invariants, continuously

/// What one look at the node found.
#[derive(Default)]
pub struct Sample {
    /// Running copies per task; `None` when the look failed (an engine that is down).
    pub counts: Option<BTreeMap<String, usize>>,
    /// Anything else wrong (a torn file).
    pub problems: Vec<String>,
}

#[derive(Default)]
struct Seen {
    samples: u64,
    failed: u64,
    violations: Vec<String>,
}

/// Checks the invariants in the background every `every` until dropped: at most one running
/// copy of any task, and whatever else the sampler reports.
pub struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

impl Watch {
    pub fn start(every: Duration, mut sample: impl FnMut() -> Sample + Send + 'static) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let started = Instant::now();
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let s = sample();
                    let at = started.elapsed();
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    seen.samples += 1;
                    match s.counts {
                        Some(counts) => {
                            for (task, n) in counts.iter().filter(|(_, n)| **n > 1) {
                                seen.violations
                                    .push(format!("{at:.1?}: {n} running copies of {task}"));
                            }
                        }
                        None => seen.failed += 1,
                    }
                    for p in s.problems {
                        seen.violations.push(format!("{at:.1?}: {p}"));
                    }
                    drop(seen);
                    std::thread::sleep(every);
                }
            })
        };
        Watch {
            stop,
            seen,
            thread: Some(thread),
            started,
        }
    }

    /// The ECS side: live tasks per family in moto (through the observer), and the rendered
    /// files under the world's root.
    pub fn ecs(world: &World) -> Watch {
        let (moto, region, cluster) = (
            world.info.moto_url.clone(),
            world.info.region.clone(),
            world.info.cluster.clone(),
        );
        let root = world.root.path().to_path_buf();
        let mut rt: Option<(tokio::runtime::Runtime, aws_sdk_ecs::Client)> = None;
        Watch::start(Duration::from_millis(200), move || {
            let (rt, ecs) = rt.get_or_insert_with(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let ecs = aws_sdk_ecs::Client::new(&rt.block_on(observer_sdk_at(&moto, &region)));
                (rt, ecs)
            });
            let counts = rt.block_on(moto_tasks(ecs, &cluster)).ok().map(|tasks| {
                let mut counts = BTreeMap::new();
                for t in tasks.iter().filter(|t| t.live()) {
                    *counts.entry(t.family.clone()).or_insert(0) += 1;
                }
                counts
            });
            Sample {
                counts,
                problems: torn_files(&root),
            }
        })
    }

    /// The Docker side: running containers per task (label `io.nodeagent.task`) of node
    /// `instance` on the engine at `socket`, and the rendered files under `root`.
    pub fn docker(socket: &str, instance: &str, root: &Path) -> Watch {
        let (socket, instance, root) =
            (socket.to_string(), instance.to_string(), root.to_path_buf());
        Watch::start(Duration::from_millis(250), move || {
            let out = Command::new("docker")
                .args(["-H", &socket, "ps", "--filter"])
                .arg(format!("label=io.nodeagent.node={instance}"))
                .args(["--format", "{{.Label \"io.nodeagent.task\"}}"])
                .output();
            let counts = match out {
                Ok(o) if o.status.success() => {
                    let mut counts = BTreeMap::new();
                    for task in String::from_utf8_lossy(&o.stdout).lines() {
                        *counts.entry(task.trim().to_string()).or_insert(0) += 1;
                    }
                    Some(counts)
                }
                _ => None, // the engine is down or frozen
            };
            Sample {
                counts,
                problems: torn_files(&root),
            }
        })
    }

    pub fn samples(&self) -> u64 {
        self.seen.lock().unwrap().samples
    }

    /// Waits for `n` more looks (so a state the test just made has been seen).
    pub fn settle(&self, n: u64) {
        let want = self.samples() + n;
        super::wait_for(Duration::from_secs(30), "the watch to look again", || {
            self.samples() >= want
        });
    }

    /// No violation so far, and the watch did look (at least `min_samples` looks that saw the
    /// tasks: a look that failed checked nothing).
    pub fn assert_clean(&self, min_samples: u64) {
        let (violations, samples, failed) = {
            let seen = self.seen.lock().unwrap();
            (seen.violations.clone(), seen.samples, seen.failed)
        };
        assert!(
            violations.is_empty(),
            "invariants broken during the fault:\n{}",
            violations.join("\n")
        );
        assert!(
            samples - failed >= min_samples,
            "the watch looked only {samples} times in {:?} ({failed} failed looks)",
            self.started.elapsed(),
        );
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- the rendered files

/// The default tasks' rendered files and how each must parse.
pub const RENDERED: &[&str] = &[
    "/opt/consul/config/consul-agent.json",
    "/opt/consul-registrator/bin/start.sh",
    "/etc/linkerd/linkerd.yaml",
];

/// Why the file at `path` (a rendered file) does not parse, if it does not.
pub fn parse_problem(path: &Path) -> Option<String> {
    let text = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let name = path.to_string_lossy();
    let shown = || format!("{} ({} bytes)", path.display(), text.len());
    if name.ends_with(".json") {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&text) {
            return Some(format!("{} is not JSON: {e}", shown()));
        }
    } else if name.ends_with(".yaml") {
        if text.is_empty() {
            return Some(format!("{} is empty", shown()));
        }
        if let Err(e) = serde_yaml::from_slice::<serde_yaml::Value>(&text) {
            return Some(format!("{} is not YAML: {e}", shown()));
        }
    } else if name.ends_with(".sh") {
        let ok = Command::new("sh")
            .arg("-n")
            .arg(path)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok || !text.starts_with(b"#!") || !text.ends_with(b"\n") {
            return Some(format!("{} is not a whole shell script", shown()));
        }
    }
    None
}

/// Every rendered file under `root` that exists and does not parse.
pub fn torn_files(root: &Path) -> Vec<String> {
    RENDERED
        .iter()
        .filter_map(|p| parse_problem(&root.join(p.trim_start_matches('/'))))
        .collect()
}

/// nodeagent's temporary files (`.nodeagent-*`, renamed into place by an atomic write) left
/// under `root`.
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    super::files_under(root)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".nodeagent-"))
        })
        .collect()
}

// ---------------------------------------------------------------- the world, synchronously

/// A call to the world's control API from a synchronous test.
pub fn control(
    world: &World,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    super::block_on(world.control(method, path, body))
}

/// `POST /faults` with these rules (`[]` clears them).
pub fn faults(world: &World, rules: serde_json::Value) {
    control(
        world,
        "POST",
        "/faults",
        serde_json::json!({ "rules": rules }),
    );
}

pub fn stats(world: &World) -> serde_json::Value {
    control(world, "GET", "/stats", serde_json::Value::Null)
}

/// How many calls of `op` the world received (faulted ones included).
pub fn calls(world: &World, op: &str) -> u64 {
    stats(world)["aws"]["by_operation"][op]
        .as_u64()
        .unwrap_or(0)
}

/// `StartTask` calls of one family (from the world's sequence of calls).
pub fn start_calls_of(world: &World, family: &str) -> usize {
    stats(world)["aws"]["sequence"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == "ecs:StartTask" && e["params"]["taskDefinition"] == family)
        .count()
}

/// `nodeagent status --json --root ROOT` (the default socket under the root): `None` when no
/// agent answers.
pub fn status(root: &Path) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["status", "--json", "--root"])
        .arg(root)
        .output()
        .unwrap();
    matches!(out.status.code(), Some(0 | 1))
        .then(|| serde_json::from_slice(&out.stdout).expect("status --json is JSON"))
}

/// The status document says every task is healthy.
pub fn healthy(root: &Path) -> bool {
    status(root).is_some_and(|s| s["healthy"] == true)
}

// ---------------------------------------------------------------- ECS's placement check

/// moto's `StartTask` places a task whatever the container instance has left: it books the host
/// ports of the task definition (`remainingResources` `PORTS`, released by `StopTask`) but
/// never refuses a start for them. ECS does: a task whose host ports are taken is not placed,
/// and `StartTask` answers `failures: [{"arn": <container instance>, "reason":
/// "RESOURCE:PORTS"}]`. This proxy, put between nodeagent and the world's endpoint, adds
/// exactly that check — from moto's own bookkeeping, read through the unfaulted observer — and
/// passes every other request (and every fault of the world's layer) through unchanged.
pub struct PlacementCheck {
    pub url: String,
    pub refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl PlacementCheck {
    pub fn start(world: &World) -> PlacementCheck {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = world
            .info
            .moto_url
            .trim_start_matches("http://")
            .to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (moto, region) = (world.info.moto_url.clone(), world.info.region.clone());
        {
            let (stop, refused) = (stop.clone(), refused.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (upstream, moto, region, refused) = (
                        upstream.clone(),
                        moto.clone(),
                        region.clone(),
                        refused.clone(),
                    );
                    std::thread::spawn(move || {
                        let _ = proxy_connection(conn, &upstream, &moto, &region, &refused);
                    });
                }
            });
        }
        PlacementCheck {
            url: format!("http://127.0.0.1:{port}"),
            refused,
            stop,
            port,
        }
    }

    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for PlacementCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

/// One HTTP/1.1 request: its head (request line and headers, as received) and body.
struct Request {
    head: Vec<String>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if head.is_empty() {
                continue;
            }
            break;
        }
        head.push(line);
    }
    let mut req = Request {
        head,
        body: Vec::new(),
    };
    let len: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    req.body = vec![0; len];
    r.read_exact(&mut req.body)?;
    Ok(Some(req))
}

fn proxy_connection(
    client: TcpStream,
    upstream: &str,
    moto: &str,
    region: &str,
    refused: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    while let Some(req) = read_request(&mut reader)? {
        let start_task = req
            .header("x-amz-target")
            .is_some_and(|t| t.ends_with(".StartTask"));
        if start_task {
            if let Some(answer) = ports_taken(&req.body, moto, region) {
                refused.fetch_add(1, Ordering::SeqCst);
                let body = answer.to_string();
                write!(
                    client,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: placement-check\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                continue;
            }
        }
        // Passed on as it came, on a connection of its own.
        let mut up = TcpStream::connect(upstream)?;
        let mut out = String::new();
        out.push_str(&req.head[0]);
        out.push_str("\r\n");
        for h in req.head.iter().skip(1) {
            if !h.to_ascii_lowercase().starts_with("connection:") {
                out.push_str(h);
                out.push_str("\r\n");
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        up.write_all(out.as_bytes())?;
        up.write_all(&req.body)?;
        let mut answer = Vec::new();
        let _ = up.read_to_end(&mut answer);
        if answer.is_empty() {
            // The world's `lose`: the connection goes before a byte of the answer.
            let _ = client.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        client.write_all(&answer)?;
        // moto closes after the answer (Connection: close): so does the client's connection.
        let _ = client.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    Ok(())
}

/// ECS's answer to a `StartTask` whose task definition needs a host port the container
/// instance has booked already; `None` when it may be placed.
fn ports_taken(body: &[u8], moto: &str, region: &str) -> Option<serde_json::Value> {
    let req: serde_json::Value = serde_json::from_slice(body).ok()?;
    let cluster = req["cluster"].as_str().unwrap_or("default").to_string();
    let family = req["taskDefinition"].as_str()?.to_string();
    let ci = req["containerInstances"][0].as_str()?.to_string();
    let taken = super::block_on(async {
        let ecs = aws_sdk_ecs::Client::new(&observer_sdk_at(moto, region).await);
        let td = ecs
            .describe_task_definition()
            .task_definition(&family)
            .send()
            .await
            .ok()?;
        let needs: Vec<String> = td
            .task_definition()?
            .container_definitions()
            .iter()
            .flat_map(|c| c.port_mappings())
            .filter_map(|p| p.host_port())
            .map(|p| p.to_string())
            .collect();
        let out = ecs
            .describe_container_instances()
            .cluster(&cluster)
            .container_instances(&ci)
            .send()
            .await
            .ok()?;
        let booked: Vec<String> = out
            .container_instances()
            .first()?
            .remaining_resources()
            .iter()
            .filter(|r| r.name() == Some("PORTS"))
            .flat_map(|r| r.string_set_value().to_vec())
            .collect();
        Some(needs.iter().any(|p| booked.contains(p)))
    });
    taken.unwrap_or(false).then(|| {
        serde_json::json!({
            "tasks": [],
            "failures": [{"arn": ci, "reason": "RESOURCE:PORTS"}],
        })
    })
}
