//! Fleet benchmark (prints figures, asserts nothing):
//!
//! ```text
//! cargo bench --bench fleet -- --nodes N [--scale F] [--steady SECONDS]
//! cargo bench --bench fleet -- --simulate [N] [--nodes N] [--scale F] [--steady SECONDS]
//! ```
//!
//! `--nodes N` (default 300): N real `nodeagent run` processes (ECS runtime, health checks
//! off, each under its own `--root`), released at once by a start barrier (each reads its
//! configuration file from a FIFO, and they all get it at once), against one world of N
//! nodes (`world.py serve --nodes N`: N instances in moto, an IMDS and an ECS agent fixture per
//! node) whose fault layer applies AWS's documented token buckets (`support::fleet::BUCKETS`);
//! `--scale F` runs the buckets at F of AWS's numbers (stderr says so); real agents run at
//! [`EMULATOR_SCALE`] (half) unless told: the emulator cannot keep up with more. `--simulate`
//! (N nodes, or `--nodes`): the agents' own code on a virtual clock against the same bucket
//! model (`support::sim`). Either prints one line on stdout:
//!
//! ```text
//! fleet: nodes=300 converged=300 in 34.2 s (throttle floor 27.5 s, x1.24) boot calls/node p50=6 max=8 steady calls/node/min=1.0 throttled=412 duplicates=0 give-ups=0
//! ```
//!
//! converged: nodes whose three tasks were started or adopted (their `status --json`), the time
//! from the barrier's opening to the last's; the floor: what the buckets allow for the calls
//! every node must make; boot calls: the calls AWS served a node until its readiness attribute
//! was set (its throttled attempts are in `throttled`, the run's total); steady: calls per node
//! per minute, counted by the world, over `--steady` (120 s) after every node converged and set
//! its attribute; duplicates: families with more than one running task on a container instance
//! (moto's own answer); give-ups: agents that exited or gave a task up. Details go to stderr.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;
use support::fleet::{floor, quantile, Fleet, Summary};

/// The buckets' scale for real agents when `--scale` is not given. The emulator is one Python
/// process (moto, the fault layer and every node's fixtures under one interpreter lock): on
/// this project's 2-core machine, with 300 nodes, it keeps up with half of AWS's numbers (50
/// calls a second served), not with AWS's own, where moto's filtered `DescribeInstances` over
/// 300 instances outlives the SDK's attempt timeout (README, "Fleet"). The simulation has no
/// such limit: AWS's own numbers.
const EMULATOR_SCALE: f64 = 0.5;

struct Args {
    nodes: usize,
    simulate: Option<usize>,
    scale: Option<f64>,
    steady: Duration,
}

fn args() -> Args {
    let mut args = Args {
        nodes: 300,
        simulate: None,
        scale: None,
        steady: Duration::from_secs(120),
    };
    let mut it = std::env::args().skip(1).peekable();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => args.nodes = value("--nodes").parse().expect("--nodes N"),
            // `--simulate` alone simulates `--nodes`; `--simulate N` simulates N.
            "--simulate" => {
                args.simulate = Some(0);
                if let Some(n) = it.peek().and_then(|v| v.parse().ok()) {
                    args.simulate = Some(n);
                    it.next();
                }
            }
            "--scale" => args.scale = Some(value("--scale").parse().expect("--scale F")),
            "--steady" => {
                args.steady =
                    Duration::from_secs(value("--steady").parse().expect("--steady SECONDS"))
            }
            _ => {} // cargo's own (--bench)
        }
    }
    args
}

fn details(s: &Summary) {
    if let Some(note) = &s.note {
        eprintln!("fleet: {note}");
    }
    eprintln!(
        "fleet: boot calls/node p10={} p90={}; throttled attempts/node until ready p50={} p90={} max={}",
        quantile(&s.boot_calls, 0.1),
        quantile(&s.boot_calls, 0.9),
        quantile(&s.boot_throttled, 0.5),
        quantile(&s.boot_throttled, 0.9),
        quantile(&s.boot_throttled, 1.0),
    );
    eprintln!(
        "fleet: calls by operation (served, throttled): {:?}",
        s.by_operation
    );
}

fn main() {
    let args = args();
    if let Some(simulate) = args.simulate {
        let nodes = if simulate == 0 { args.nodes } else { simulate };
        let dir = support::sim::scratch();
        let started = std::time::Instant::now();
        let s = support::sim::simulate(nodes, args.scale.unwrap_or(1.0), args.steady, dir.path());
        println!("{}", s.line());
        details(&s);
        eprintln!(
            "fleet: simulated in {:.1} s of wall time",
            started.elapsed().as_secs_f64()
        );
        return;
    }
    support::block_on(async {
        let scale = args.scale.unwrap_or(EMULATOR_SCALE);
        let mut fleet = Fleet::start(args.nodes, scale).await;
        eprintln!(
            "fleet: {} agents waited at the start barrier (their configuration file a FIFO); every one had its configuration {:.3} s after it opened{}",
            args.nodes,
            fleet.spawned_in.as_secs_f64(),
            if fleet.spawned_in > Duration::from_secs(1) {
                " (not within a second)"
            } else {
                ""
            }
        );
        let limit = Duration::from_secs_f64(floor(args.nodes, scale) * 4.0 + 300.0);
        fleet.watch(Duration::from_millis(500), limit).await;
        let s = fleet.summary(args.steady).await;
        println!("{}", s.line());
        details(&s);
    });
}
