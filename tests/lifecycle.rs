//! The node's standing in its cluster, against the emulated ECS (moto): the readiness
//! attribute follows the tasks' health (ECS runtime, one health check the test controls).

mod support;

use std::net::TcpListener;
use std::time::Duration;
use support::agent::Agent;
use support::World;

/// The attributes of this node's container instance: name → value.
async fn attributes(world: &World) -> Vec<(String, Option<String>)> {
    let ecs = aws_sdk_ecs::Client::new(&world.sdk().await);
    let Some(ci) = world.container_instance().await else {
        return Vec::new();
    };
    let out = ecs
        .list_attributes()
        .cluster(&world.info.cluster)
        .target_type(aws_sdk_ecs::types::TargetType::ContainerInstance)
        .send()
        .await
        .unwrap();
    out.attributes()
        .iter()
        .filter(|a| a.target_id() == Some(ci.as_str()))
        .map(|a| (a.name().to_string(), a.value().map(str::to_string)))
        .collect()
}

async fn ready(world: &World) -> Option<String> {
    attributes(world)
        .await
        .into_iter()
        .find(|(n, _)| n == "nodeagent.ready")
        .map(|(_, v)| v.unwrap_or_default())
}

async fn eventually(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_readiness_attribute_follows_the_tasks_health() {
    let world = World::start(&[]);
    let config = world.config("[lifecycle]\ndegraded_grace = \"2s\"\n");
    // linkerd is healthy while the test listens on this port.
    let port = support::docker::free_port();
    let conf_d = world.root.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::write(
        conf_d.join("50-check.toml"),
        format!("[tasks.linkerd.health]\ntcp = \"127.0.0.1:{port}\"\ninterval = \"200ms\"\nunhealthy_threshold = 1\n"),
    )
    .unwrap();
    let agent = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "agent");
    eventually(Duration::from_secs(30), "the three tasks", async || {
        world.running_tasks().await.len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ready(&world).await,
        None,
        "absent while linkerd is not healthy"
    );

    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    eventually(
        Duration::from_secs(10),
        "nodeagent.ready=true",
        async || ready(&world).await.as_deref() == Some("true"),
    )
    .await;

    // linkerd's check fails from now on: after the 2 s grace the attribute goes.
    drop(listener);
    eventually(
        Duration::from_secs(10),
        "the attribute removed",
        async || ready(&world).await.is_none(),
    )
    .await;
    let log = agent.log();
    assert!(log.contains("removed nodeagent.ready"), "{log}");

    let _listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    eventually(
        Duration::from_secs(10),
        "nodeagent.ready=true again",
        async || ready(&world).await.as_deref() == Some("true"),
    )
    .await;
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    assert_eq!(
        stats["aws"]["by_operation"]["ecs:PutAttributes"], 2,
        "{stats}"
    );
    // Once when the start-up stayed degraded past the grace (clearing what an earlier agent
    // may have left), once when linkerd failed.
    assert_eq!(
        stats["aws"]["by_operation"]["ecs:DeleteAttributes"], 2,
        "{stats}"
    );
}
