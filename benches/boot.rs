//! Boot benchmark (prints figures, asserts nothing): `cargo bench --bench boot`.
//!
//! 1. Everything ready at t = 0 (ECS agent up, servers tagged, moto warmed): wall time from
//!    process start to the three tasks started, the per-phase breakdown nodeagent logs, the AWS
//!    API calls the emulator served, and the agent's own overhead (wall time minus the time
//!    moto spent answering).
//! 2. ECS agent ready only at t = 3 s: the lag between the agent coming up and nodeagent's first
//!    successful introspection request, both timed by the agent fixture's clock.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::World;

const BOOT_RUNS: usize = 20;
const LAG_RUNS: usize = 8;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        boot_with_everything_ready().await;
        agent_detection_lag().await;
    });
}

/// Starts a world whose ECS agent is already up (ecs.config written before nodeagent runs).
async fn ready_world(args: &[&str]) -> World {
    let world = World::start(args);
    std::fs::create_dir_all(world.path("/etc/ecs")).unwrap();
    std::fs::write(world.path("/etc/ecs/ecs.config"), "ECS_CLUSTER=l5d-demo\n").unwrap();
    world
}

async fn wait_agent_up(world: &World) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let stats = world
            .control("GET", "/stats", serde_json::Value::Null)
            .await;
        if stats["agent"]["ready_at"].is_number() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the ECS agent fixture never came up");
}

/// Stops the node's tasks so the next boot starts three again.
async fn stop_tasks(world: &World) {
    for (_, _, arn) in world.running_tasks().await {
        world.stop_ecs_task(&arn).await;
    }
}

/// The `phases=` of nodeagent's "node prepared" line: name → milliseconds.
fn phases(stderr: &str) -> BTreeMap<String, f64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("node prepared"))
        .expect("a node prepared line");
    let after = line.split("phases=").nth(1).unwrap();
    after
        .split_whitespace()
        .filter_map(|t| {
            let (name, ms) = t.split_once('=')?;
            Some((name.to_string(), ms.trim_end_matches("ms").parse().ok()?))
        })
        .collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

async fn boot_with_everything_ready() {
    let world = ready_world(&[]).await;
    wait_agent_up(&world).await;
    let config = world.config("");
    // Warm-up: moto loads its backends lazily; the first boot pays for it.
    let out = world.run_once(&config);
    assert!(out.status.success(), "{}", support::transcript(&out));
    stop_tasks(&world).await;

    let mut walls = Vec::new();
    let mut moto_ms = Vec::new();
    let mut calls = Vec::new();
    let mut by_phase: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ops = serde_json::Value::Null;
    for _ in 0..BOOT_RUNS {
        world
            .control("POST", "/stats/reset", serde_json::json!({}))
            .await;
        let t = Instant::now();
        let out = world.run_once(&config);
        let wall = t.elapsed().as_secs_f64() * 1e3;
        assert!(out.status.success(), "{}", support::transcript(&out));
        let stats = world
            .control("GET", "/stats", serde_json::Value::Null)
            .await;
        walls.push(wall);
        moto_ms.push(stats["aws"]["seconds"].as_f64().unwrap() * 1e3);
        calls.push(stats["aws"]["total"].as_u64().unwrap());
        ops = stats["aws"]["by_operation"].clone();
        for (phase, ms) in phases(&String::from_utf8_lossy(&out.stderr)) {
            by_phase.entry(phase).or_default().push(ms);
        }
        stop_tasks(&world).await;
    }
    let overhead: Vec<f64> = walls.iter().zip(&moto_ms).map(|(w, m)| w - m).collect();
    println!("boot, everything ready at t=0 ({BOOT_RUNS} runs, moto warmed)");
    println!(
        "  wall, process start to 3 tasks started: p50 {:.1} ms  p90 {:.1} ms  min {:.1} ms  max {:.1} ms",
        percentile(&walls, 0.5),
        percentile(&walls, 0.9),
        percentile(&walls, 0.0),
        percentile(&walls, 1.0)
    );
    println!(
        "  time moto spent answering:             p50 {:.1} ms",
        percentile(&moto_ms, 0.5)
    );
    println!(
        "  nodeagent overhead (wall - moto):       p50 {:.1} ms  p90 {:.1} ms",
        percentile(&overhead, 0.5),
        percentile(&overhead, 0.9)
    );
    println!(
        "  AWS API calls per boot: max {} ({ops})",
        calls.iter().max().unwrap()
    );
    println!("  phases (p50, as nodeagent logs them; discover and agent overlap):");
    for (phase, ms) in &by_phase {
        println!("    {phase:9} {:.1} ms", percentile(ms, 0.5));
    }
}

async fn agent_detection_lag() {
    let world = ready_world(&["--agent-ready-after", "3"]).await;
    wait_agent_up(&world).await;
    let config = world.config("");
    let mut lags = Vec::new();
    for _ in 0..LAG_RUNS {
        // The agent goes down now and comes back 3 s later; nodeagent starts at once.
        world
            .control("POST", "/agent/restart", serde_json::json!({"down_ms": 0}))
            .await;
        let out = world.run_once(&config);
        assert!(out.status.success(), "{}", support::transcript(&out));
        let stats = world
            .control("GET", "/stats", serde_json::Value::Null)
            .await;
        let ready = stats["agent"]["ready_at"].as_f64().unwrap();
        let first_ok = stats["agent"]["first_ok_at"].as_f64().unwrap();
        lags.push((first_ok - ready) * 1e3);
    }
    println!("ECS agent ready at t=3 s ({LAG_RUNS} runs)");
    println!(
        "  lag, agent up -> first successful /v1/metadata: p50 {:.1} ms  max {:.1} ms",
        percentile(&lags, 0.5),
        percentile(&lags, 1.0)
    );
}
