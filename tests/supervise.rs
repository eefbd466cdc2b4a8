//! Supervision as a whole node sees it, and the ECS runtime's. The supervision rules (backoff,
//! crash-loop, dependency order, restart_with_dependencies, restart_when_unhealthy, adoption of
//! strays and duplicates) are unit tests on a paused clock (`src/supervisor/tests/`); here:
//! - a whole node (the Node harness: the docker runtime, the default configuration on the
//!   stand-in images, in a network namespace of its own) whose Docker engine stops and starts
//!   again;
//! - the ECS runtime against moto: tasks stopped in ECS, adoption of ECS tasks, a dead
//!   container of an ECS task.

use crate::support;

use std::time::{Duration, Instant};
use support::agent::Agent;
use support::docker::Engine;
use support::node::Node;
use support::{netns, wait_for, wait_for_async, World};

const BOOT: Duration = Duration::from_secs(60);

/// Every task healthy, with exactly one running container, the one status names.
fn one_healthy_container_each(node: &Node) -> bool {
    let Some(s) = node.status() else {
        return false;
    };
    let running = node.containers();
    let tasks = s["tasks"].as_array().unwrap();
    s["healthy"] == true
        && running.len() == tasks.len()
        && tasks.iter().all(|t| {
            running
                .iter()
                .any(|(task, id)| t["name"] == task.as_str() && t["instance"] == id.as_str())
        })
}

#[test]
fn the_agent_survives_a_docker_engine_restart() {
    if !netns::enter("the_agent_survives_a_docker_engine_restart") {
        return;
    }
    let mut node = Node::start(&[]);
    let mut agent = node.run("agent");
    wait_for(BOOT, "a healthy node", || one_healthy_container_each(&node));

    // The engine stops, and every container with it: the agent stays up and says so.
    node.engine.down();
    wait_for(
        Duration::from_secs(30),
        "the node reported degraded",
        || node.status().is_some_and(|s| s["healthy"] == false),
    );
    assert!(agent.alive(), "nodeagent keeps running without its engine");

    // Back: every task again, once, healthy, under the same agent.
    node.engine.up();
    wait_for(BOOT, "the tasks back, one container each", || {
        one_healthy_container_each(&node)
    });
    assert!(agent.alive());
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

#[tokio::test]
async fn ecs_a_stopped_task_is_started_again_by_the_reconcile_and_adopted_after_a_restart() {
    let world = World::start(&[]);
    let config = world.config("[supervision]\nreconcile_interval = \"1s\"\n");
    let mut agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "first");
    wait_for_async(Duration::from_secs(30), "three ECS tasks", async || {
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
    wait_for_async(
        Duration::from_secs(20),
        "consul-agent started again",
        async || {
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
    let second = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "second");
    wait_for_async(Duration::from_secs(20), "adoption", async || {
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
    wait_for_async(Duration::from_secs(30), "three ECS tasks", async || {
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
    wait_for_async(
        Duration::from_secs(10),
        "linkerd started again",
        async || {
            ecs_tasks(&world)
                .await
                .iter()
                .any(|(f, arn)| f == "linkerd" && *arn != linkerd_arn)
        },
    )
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
