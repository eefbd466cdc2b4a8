//! Supervision with the docker runtime, against a real, private Docker engine per test
//! (`tests/world/dockerd.sh`) and the test world for IMDS and EC2.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::agent::{consul_http, docker_config, Agent, Ports};
use support::docker::{free_port, Engine, IMAGE};
use support::World;

const SLEEPER: &str = r#"["sleep", "100000"]"#;

fn ports() -> Ports {
    Ports {
        consul: free_port(),
        linkerd: free_port(),
    }
}

/// Running containers of this node: task → ids.
fn running(engine: &Engine, world: &World) -> BTreeMap<String, Vec<String>> {
    let out = engine.cli(&[
        "ps",
        "--filter",
        &format!("label=io.nodeagent.node={}", world.info.instance_id),
        "--format",
        "{{.Label \"io.nodeagent.task\"}} {{.ID}}",
    ]);
    let mut tasks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        if let Some((task, id)) = line.split_once(' ') {
            tasks
                .entry(task.to_string())
                .or_default()
                .push(id.to_string());
        }
    }
    tasks
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    assert!(
        support::eventually(limit, &mut cond),
        "timed out waiting for {what}"
    );
}

fn http_ok(port: u16) -> bool {
    support::http_get(port, "/")
        .is_some_and(|a| a.starts_with("HTTP/1.0 200") || a.starts_with("HTTP/1.1 200"))
}

fn all_three_once(engine: &Engine, world: &World) -> bool {
    let r = running(engine, world);
    r.len() == 3 && r.values().all(|ids| ids.len() == 1)
}

#[test]
fn a_killed_removed_or_crashed_container_is_replaced() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let p = ports();
    let agent = Agent::start(
        &world,
        &engine,
        &docker_config(&world, &p, SLEEPER, &consul_http(&p), ""),
        "agent",
    );
    wait_for(Duration::from_secs(30), "three healthy tasks", || {
        all_three_once(&engine, &world) && http_ok(p.consul) && http_ok(p.linkerd)
    });

    for (task, how) in [
        ("consul-agent", "kill"),
        ("linkerd", "rm"),
        ("consul-registrator", "inside"),
    ] {
        let before = running(&engine, &world)[task][0].clone();
        match how {
            "kill" => engine.cli(&["kill", &before]),
            "rm" => engine.cli(&["rm", "-f", &before]),
            _ => engine.cli(&["exec", &before, "sh", "-c", "kill -9 $(pidof sleep)"]),
        };
        wait_for(
            Duration::from_secs(15),
            &format!("{task} replaced after {how}"),
            || {
                let r = running(&engine, &world);
                r.get(task)
                    .is_some_and(|ids| ids.len() == 1 && ids[0] != before)
            },
        );
    }
    wait_for(Duration::from_secs(15), "all healthy again", || {
        all_three_once(&engine, &world) && http_ok(p.consul) && http_ok(p.linkerd)
    });
    let mut agent = agent;
    let log = agent.log();
    assert!(log.contains("; restarting in"), "{log}");

    // SIGTERM stops nodeagent alone: the node keeps its tasks.
    let before = running(&engine, &world);
    assert!(agent.sigterm().success());
    assert!(agent.log().contains("stopping; the tasks keep running"));
    assert_eq!(running(&engine, &world), before);
}

#[test]
fn a_restarted_agent_adopts_its_containers_and_removes_strays() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let p = ports();
    let config = docker_config(&world, &p, SLEEPER, &consul_http(&p), "");
    let mut first = Agent::start(&world, &engine, &config, "first");
    wait_for(Duration::from_secs(30), "three healthy tasks", || {
        all_three_once(&engine, &world) && http_ok(p.linkerd)
    });
    let before = running(&engine, &world);
    first.sigkill();
    // The line the second agent must not write (checked below) is the first one's.
    assert_eq!(
        first.log().matches(": started ").count(),
        3,
        "{}",
        first.log()
    );

    // A container of ours for a task that is not configured (any more).
    engine.cli(&[
        "run",
        "-d",
        "--network",
        "host",
        "--label",
        &format!("io.nodeagent.node={}", world.info.instance_id),
        "--label",
        "io.nodeagent.task=retired",
        IMAGE,
        "sleep",
        "100000",
    ]);
    let second = Agent::start(&world, &engine, &config, "second");
    wait_for(
        Duration::from_secs(20),
        "adoption and the stray removed",
        || {
            let log = second.log();
            log.matches("adopted running instance").count() == 3
                && running(&engine, &world) == before
        },
    );
    let log = second.log();
    assert!(!log.contains(": started "), "nothing started anew: {log}");
    assert!(log.contains("task=retired"), "the stray is named: {log}");
}

#[test]
fn a_crash_looping_task_backs_off_to_the_cap_and_is_reported() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let p = ports();
    let config = docker_config(
        &world,
        &p,
        r#"["sh", "-c", "echo boom from registrator; exit 3"]"#,
        &consul_http(&p),
        "",
    );
    let agent = Agent::start(&world, &engine, &config, "agent");
    let started = Instant::now();
    wait_for(
        Duration::from_secs(40),
        "crash-loop with the last output",
        || {
            let log = agent.log();
            log.contains("crash-loop") && log.contains("boom from registrator")
        },
    );
    // Keep it going a little: restarts continue at the cap, never in a busy loop.
    std::thread::sleep(Duration::from_secs(4));
    let log = agent.log();
    let delays: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("task=consul-registrator") && l.contains("restart_in="))
        .filter_map(|l| l.split("restart_in=").nth(1))
        .filter_map(|v| humantime::parse_duration(v.split_whitespace().next()?).ok())
        .map(|d| d.as_secs_f64())
        .collect();
    assert!(delays.len() >= 4, "{log}");
    assert_eq!(delays[0], 0.0, "the first restart is immediate");
    assert!(
        delays[1..].iter().all(|d| *d >= 0.1),
        "never a busy loop: {delays:?}"
    );
    assert!(
        delays.iter().all(|d| *d <= 2.0),
        "capped at backoff_max: {delays:?}"
    );
    assert!(
        delays[delays.len() - 1] >= 1.0 && delays[delays.len() - 1] > delays[1],
        "grows toward the cap: {delays:?}\n{log}"
    );
    let restarts = log.matches("task=consul-registrator id=").count();
    let elapsed = started.elapsed().as_secs_f64();
    assert!((restarts as f64) < elapsed * 20.0, "bounded restart rate");
    assert!(log.contains("code=Some(3)"), "{log}");
}

#[test]
fn dependents_start_in_order_and_wait_for_a_healthy_dependency() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let p = ports();
    // consul-agent's check points at a port nothing listens on: never healthy.
    let dead_port = free_port();
    let config = docker_config(
        &world,
        &p,
        SLEEPER,
        &format!("http = \"\"\ntcp = \"127.0.0.1:{dead_port}\""),
        "",
    );
    let agent = Agent::start(&world, &engine, &config, "blocked");
    wait_for(Duration::from_secs(20), "consul-agent running", || {
        running(&engine, &world).contains_key("consul-agent")
    });
    std::thread::sleep(Duration::from_secs(3));
    let r = running(&engine, &world);
    assert_eq!(
        r.keys().collect::<Vec<_>>(),
        ["consul-agent"],
        "dependents wait: {}",
        agent.log()
    );
    drop(agent);
    drop(engine);

    // Healthy this time: consul-agent's container is created before the others.
    let world = World::start(&[]);
    let engine2 = Engine::start();
    let p = ports();
    let config = docker_config(&world, &p, SLEEPER, &consul_http(&p), "");
    let _agent = Agent::start(&world, &engine2, &config, "ordered");
    wait_for(Duration::from_secs(30), "three tasks", || {
        all_three_once(&engine2, &world)
    });
    let r = running(&engine2, &world);
    let created = |task: &str| engine2.cli(&["inspect", "-f", "{{.Created}}", &r[task][0]]);
    assert!(created("consul-agent") < created("linkerd"));
    assert!(created("consul-agent") < created("consul-registrator"));
}

#[test]
fn the_agent_survives_a_docker_engine_restart() {
    let world = World::start(&[]);
    let mut engine = Engine::start();
    let p = ports();
    let mut agent = Agent::start(
        &world,
        &engine,
        &docker_config(&world, &p, SLEEPER, &consul_http(&p), ""),
        "agent",
    );
    wait_for(Duration::from_secs(30), "three healthy tasks", || {
        all_three_once(&engine, &world) && http_ok(p.linkerd)
    });
    engine.down();
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.alive(), "nodeagent keeps running without its engine");
    engine.up();
    wait_for(Duration::from_secs(40), "tasks back, one each", || {
        all_three_once(&engine, &world) && http_ok(p.consul) && http_ok(p.linkerd)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        all_three_once(&engine, &world),
        "no duplicates: {:?}",
        running(&engine, &world)
    );
    assert!(agent.alive());
    assert!(agent.log().contains("reconnected"), "{}", agent.log());
}

#[test]
fn opt_in_restarts_with_a_dependency_and_when_unhealthy() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let p = ports();
    // registrator's check is a listener the test owns, so the test can make it fail.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = docker_config(&world, &p, SLEEPER, &consul_http(&p), "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[tasks.linkerd]\nrestart_with_dependencies = true\n\
         [tasks.consul-registrator.health]\ntcp = \"{}\"\ninterval = \"300ms\"\n\
         unhealthy_threshold = 2\nrestart_when_unhealthy = true\n",
        target.local_addr().unwrap()
    ));
    std::fs::write(&config, text).unwrap();
    let agent = Agent::start(&world, &engine, &config, "agent");
    wait_for(Duration::from_secs(30), "three healthy tasks", || {
        all_three_once(&engine, &world) && http_ok(p.linkerd)
    });

    // consul-agent restarts: linkerd (opted in) follows, registrator (not opted in) stays.
    let before = running(&engine, &world);
    engine.cli(&["kill", &before["consul-agent"][0]]);
    wait_for(
        Duration::from_secs(20),
        "linkerd restarted with consul-agent",
        || {
            let now = running(&engine, &world);
            now.len() == 3
                && now["consul-agent"] != before["consul-agent"]
                && now["linkerd"] != before["linkerd"]
                && http_ok(p.linkerd)
        },
    );
    assert_eq!(
        running(&engine, &world)["consul-registrator"],
        before["consul-registrator"]
    );

    // registrator's check starts failing: after 2 failures it is restarted.
    let before = running(&engine, &world);
    drop(target);
    wait_for(
        Duration::from_secs(20),
        "the unhealthy registrator restarted",
        || {
            running(&engine, &world)
                .get("consul-registrator")
                .is_some_and(|ids| ids.len() == 1 && ids != &before["consul-registrator"])
        },
    );
    let log = agent.log();
    assert!(log.contains("restarting with its dependency"), "{log}");
    assert!(log.contains("restarting the unhealthy task"), "{log}");
}

// ---- ECS runtime: tasks in the emulated ECS (moto) ----

/// `(family, ARN)` of this node's RUNNING tasks.
async fn ecs_tasks(world: &World) -> Vec<(String, String)> {
    world
        .running_tasks()
        .await
        .into_iter()
        .map(|(family, _, arn)| (family, arn))
        .collect()
}

async fn wait_async<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// An engine address where nothing listens: the ECS runtime then relies on its reconcile.
const NO_DOCKER: &str = "unix:///nonexistent/docker.sock";

#[tokio::test]
async fn ecs_a_stopped_task_is_started_again_by_the_reconcile_and_adopted_after_a_restart() {
    let world = World::start(&[]);
    let config = world.config("[supervision]\nreconcile_interval = \"1s\"\n");
    let mut agent = Agent::start_with_docker(&world, NO_DOCKER, &config, "first");
    wait_async(Duration::from_secs(30), "three ECS tasks", || async {
        ecs_tasks(&world).await.len() == 3
    })
    .await;
    let before = ecs_tasks(&world).await;
    let (_, consul_arn) = before
        .iter()
        .find(|(f, _)| f == "consul-agent")
        .unwrap()
        .clone();
    world.stop_ecs_task(&consul_arn).await;
    wait_async(
        Duration::from_secs(20),
        "consul-agent started again",
        || async {
            let now = ecs_tasks(&world).await;
            now.len() == 3
                && now
                    .iter()
                    .any(|(f, arn)| f == "consul-agent" && *arn != consul_arn)
        },
    )
    .await;
    assert!(agent.log().contains("; restarting in"), "{}", agent.log());

    // nodeagent SIGKILLed and started again: the same tasks, adopted, nothing started.
    let running = ecs_tasks(&world).await;
    agent.sigkill();
    world
        .control("POST", "/stats/reset", serde_json::json!({}))
        .await;
    let second = Agent::start_with_docker(&world, NO_DOCKER, &config, "second");
    wait_async(Duration::from_secs(20), "adoption", || async {
        second.log().matches("adopted running instance").count() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ecs_tasks(&world).await, running);
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    assert!(
        stats["aws"]["by_operation"].get("ecs:StartTask").is_none(),
        "{stats}"
    );
}

#[tokio::test]
async fn ecs_a_dead_container_triggers_a_check_and_a_new_start_without_waiting_for_the_reconcile() {
    let world = World::start(&[]);
    let engine = Engine::start();
    let config = world.config("[supervision]\nreconcile_interval = \"10m\"\n");
    let agent = Agent::start_with_docker(&world, &engine.socket, &config, "agent");
    wait_async(Duration::from_secs(30), "three ECS tasks", || async {
        ecs_tasks(&world).await.len() == 3
    })
    .await;
    let (_, linkerd_arn) = ecs_tasks(&world)
        .await
        .into_iter()
        .find(|(f, _)| f == "linkerd")
        .unwrap();
    // What the ECS agent would run for that task.
    let container = engine.run_ecs_container(&linkerd_arn, &world.info.cluster);
    // The container dies and ECS stops the task, as it does when an essential container exits.
    world.stop_ecs_task(&linkerd_arn).await;
    let killed = Instant::now();
    engine.cli(&["kill", &container]);
    wait_async(Duration::from_secs(10), "linkerd started again", || async {
        ecs_tasks(&world)
            .await
            .iter()
            .any(|(f, arn)| f == "linkerd" && *arn != linkerd_arn)
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "long before the 10 min reconcile"
    );
    assert_eq!(ecs_tasks(&world).await.len(), 3);
    assert!(
        agent.log().contains("container died; ECS task stopped"),
        "{}",
        agent.log()
    );
}
