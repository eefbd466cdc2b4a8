//! Supervision benchmark (prints figures, asserts nothing): `cargo bench --bench supervise`.
//!
//! 1. Restart latency, docker runtime: a supervised container is killed 50 times; latency is
//!    its `die` to its replacement's `start`, both on the Docker engine's clock.
//! 2. Restart latency, ECS runtime: 50 times the container of an ECS task dies (and moto is told
//!    the task stopped, as ECS would); latency is `die` (engine clock) to nodeagent's log line
//!    saying `StartTask` answered (same machine clock).
//! 3. Idle cost over 60 s with three healthy supervised containers (docker runtime): RSS and CPU
//!    of nodeagent; and ECS API calls per minute of an idle ECS-runtime nodeagent.
//!
//! The docker-runtime figures are those of a whole node (`tests/support/node.rs`: the default
//! configuration on the stand-in images), so the benchmark runs in a network namespace of its
//! own (`tests/support/netns.rs`), where the stand-ins listen on their real ports.

#[path = "../tests/support/mod.rs"]
mod support;

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::agent::Agent;
use support::docker::Engine;
use support::node::Node;
use support::{netns, World};

const KILLS: usize = 50;
const IDLE: Duration = Duration::from_secs(60);
/// Reset the backoff quickly so every kill gets the immediate first restart.
const FAST_RESET: &str = "backoff_reset_after = \"100ms\"\ncrash_loop_restarts = 1000";

fn main() {
    if !netns::enter_program() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        docker_restart_latency().await;
        ecs_restart_latency().await;
        tokio::join!(docker_idle_cost(), ecs_idle_calls());
    });
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// (action, container id, epoch seconds) of container events with `label`.
fn events(
    engine: &Engine,
    label: &str,
) -> futures_util::stream::BoxStream<'static, (String, String, f64)> {
    // From now on, not from the first poll (the stream is lazy).
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let options = EventsOptions {
        since: Some(format!("{}.{:09}", now.as_secs(), now.subsec_nanos())),
        filters: Some(HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "event".to_string(),
                vec!["die".to_string(), "start".to_string()],
            ),
            ("label".to_string(), vec![label.to_string()]),
        ])),
        ..Default::default()
    };
    engine
        .raw()
        .events(Some(options))
        .filter_map(|m| async move {
            let m = m.ok()?;
            let id = m.actor?.id?;
            Some((m.action?, id, m.time_nano? as f64 / 1e9))
        })
        .boxed()
}

fn task_container(node: &Node, task: &str) -> String {
    node.container(task).unwrap_or_default()
}

fn report(title: &str, ms: &[f64]) {
    println!(
        "{title} ({} kills): p50 {:.0} ms  p99 {:.0} ms  min {:.0} ms  max {:.0} ms",
        ms.len(),
        percentile(ms, 0.5),
        percentile(ms, 0.99),
        percentile(ms, 0.0),
        percentile(ms, 1.0)
    );
}

async fn docker_restart_latency() {
    let node = Node::start(&[]);
    node.conf_d("50-bench.toml", &format!("[supervision]\n{FAST_RESET}\n"));
    let agent = node.run("bench");
    let engine = &node.engine;
    let mut stream = events(engine, "io.nodeagent.task=consul-registrator");
    while task_container(&node, "consul-registrator").is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut latencies, mut reactions) = (Vec::new(), Vec::new());
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let victim = task_container(&node, "consul-registrator");
        engine.cli(&["kill", &victim]);
        let mut died = None;
        while let Some((action, id, at)) = stream.next().await {
            match action.as_str() {
                "die" if id.starts_with(&victim) => died = Some(at),
                "start" if died.is_some() => {
                    let died = died.unwrap();
                    latencies.push((at - died) * 1e3);
                    // nodeagent logs "consul-registrator: died …; restarting in …" as it sends
                    // the create request.
                    let log = agent.log();
                    let noticed = log
                        .lines()
                        .rfind(|l| {
                            l.contains(RESTARTING_REGISTRATOR) && l.contains("; restarting in")
                        })
                        .map(log_time)
                        .unwrap_or_else(|| panic!("no restart line in nodeagent's log:\n{log}"));
                    reactions.push((noticed - died) * 1e3);
                    break;
                }
                _ => {}
            }
        }
    }
    report(
        "restart latency, docker runtime: die -> replacement started",
        &latencies,
    );
    report(
        "  of which nodeagent noticing it: die -> restart decided (log)",
        &reactions,
    );
}

async fn ecs_restart_latency() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let config = world.config(&format!(
        "[supervision]\nreconcile_interval = \"10m\"\n{FAST_RESET}\n"
    ));
    let agent = Agent::start_with_docker(&world, &engine.socket, &config, "bench");
    let linkerd = || async {
        world
            .running_tasks()
            .await
            .into_iter()
            .find(|(family, _, _)| family == "linkerd")
            .map(|(_, _, arn)| arn)
    };
    let cluster_label = format!("com.amazonaws.ecs.cluster={}", world.info.cluster);
    let mut stream = events(&engine, &cluster_label);
    let mut latencies = Vec::new();
    let mut current = None;
    for _ in 0..KILLS {
        // The replacement is running (and past the backoff reset) before the next kill.
        loop {
            if let Some(arn) = linkerd().await {
                if Some(&arn) != current.as_ref() {
                    current = Some(arn);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let arn = current.clone().unwrap();
        // What the ECS agent runs for that task.
        let container = engine.run_ecs_container(&arn, &world.info.cluster);
        world.stop_ecs_task(&arn).await;
        let restarts = agent.log().matches(STARTED_LINKERD).count();
        engine.cli(&["kill", &container]);
        let died = loop {
            let (action, id, at) = stream.next().await.unwrap();
            if action == "die" && id.starts_with(&container[..12]) {
                break at;
            }
        };
        // nodeagent logs "linkerd: started ARN" once StartTask has answered.
        let answered = loop {
            let log = agent.log();
            if log.matches(STARTED_LINKERD).count() > restarts {
                let line = log.lines().rfind(|l| l.contains(STARTED_LINKERD)).unwrap();
                break log_time(line);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        latencies.push((answered - died) * 1e3);
        engine.cli(&["rm", "-f", &container]);
    }
    report(
        "restart latency, ECS runtime: die -> StartTask answered",
        &latencies,
    );
}

/// nodeagent's log line for a started linkerd task (`linkerd: started ID`).
const STARTED_LINKERD: &str = "linkerd: started ";
/// nodeagent's log line for registrator's restart begins so (`consul-registrator: died …`).
const RESTARTING_REGISTRATOR: &str = "consul-registrator: ";

/// The epoch seconds of a log line's RFC 3339 timestamp ("2026-11-23T16:17:02.165889Z ...").
fn log_time(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap();
    let t = humantime::parse_rfc3339(stamp).unwrap();
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

async fn docker_idle_cost() {
    // The default configuration: health checks every 5 s, a reconcile every 60 s.
    let node = Node::start(&[]);
    let agent = node.run("idle");
    let pid = agent.child.id();
    while !node.healthy() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(IDLE).await;
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    println!(
        "idle, docker runtime, 3 healthy containers over {}s: RSS {:.1} MB, CPU {:.3} % of one core",
        IDLE.as_secs(),
        rss_kib(pid) as f64 / 1024.0,
        cpu
    );
}

async fn ecs_idle_calls() {
    let world = World::start(&[]);
    let config = world.config("");
    let agent =
        Agent::start_with_docker(&world, "unix:///nonexistent/docker.sock", &config, "idle");
    while !agent.log().contains(STARTED_LINKERD) && !agent.log().contains("adopted") {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    world
        .control("POST", "/stats/reset", serde_json::json!({}))
        .await;
    let pid = agent.child.id();
    tokio::time::sleep(IDLE).await;
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    println!(
        "idle, ECS runtime over {}s: {} ECS/EC2 API calls ({}), RSS {:.1} MB",
        IDLE.as_secs(),
        stats["aws"]["total"],
        stats["aws"]["by_operation"],
        rss_kib(pid) as f64 / 1024.0
    );
}
