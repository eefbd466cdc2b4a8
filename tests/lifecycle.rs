//! The node's standing in its cluster. Against the emulated ECS (moto), the ECS runtime: the
//! readiness attribute follows the tasks' health (one health check the test controls); drains
//! (scale-in, spot, at shutdown) in order, their calls on the world's clock, its Consul API the
//! world's fixture. On a whole node (the Node harness: the docker runtime, the default
//! configuration on the stand-in images, in a network namespace of its own): a drain's order
//! on the engine's clock around the Consul stand-in's leave, and a drained node that stays
//! drained when its agent restarts.

use crate::support;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;
use support::agent::Agent;
use support::docker::stamp;
use support::node::Node;
use support::{netns, wait_for, wait_for_async, World};

const BOOT: Duration = Duration::from_secs(60);

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
    let agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "agent");
    wait_for_async(Duration::from_secs(30), "the three tasks", async || {
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
    wait_for_async(
        Duration::from_secs(10),
        "nodeagent.ready=true",
        async || ready(&world).await.as_deref() == Some("true"),
    )
    .await;

    // linkerd's check fails from now on: after the 2 s grace the attribute goes.
    drop(listener);
    wait_for_async(
        Duration::from_secs(10),
        "the attribute removed",
        async || ready(&world).await.is_none(),
    )
    .await;
    let log = agent.log();
    assert!(log.contains("removed nodeagent.ready"), "{log}");

    let _listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    wait_for_async(
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
    // Once when linkerd failed, and once more if the start-up stayed degraded past the grace
    // (clearing what an earlier agent may have left) before the test listened.
    let deletes = stats["aws"]["by_operation"]["ecs:DeleteAttributes"]
        .as_u64()
        .unwrap();
    assert!((1..=2).contains(&deletes), "{stats}");
}

/// An ECS-runtime node in an autoscaling group `g` with the terminating hook `h`, its Consul
/// API the world's fixture; drains poll IMDS every 200 ms.
fn drain_world() -> (World, std::path::PathBuf) {
    let world = World::start(&["--asg", "g", "--lifecycle-hook", "h"]);
    let config = world.config(&format!(
        "[consul]\napi = \"{}\"\n[lifecycle]\ntrigger_poll = \"200ms\"\ndrain_tasks_timeout = \"3s\"\n\
         drain_step_timeout = \"10s\"\nlifecycle_hook = \"h\"\ndegraded_grace = \"1s\"\n",
        world.info.consul_url
    ));
    (world, config)
}

/// Registers the `app` task definition and starts it on this node, as an ECS service would.
async fn start_app_task(world: &World) -> String {
    let ecs = aws_sdk_ecs::Client::new(&world.sdk().await);
    ecs.register_task_definition()
        .family("app")
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name("app")
                .image("app:1")
                .memory(64)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let ci = world.container_instance().await.unwrap();
    let out = ecs
        .start_task()
        .cluster(&world.info.cluster)
        .task_definition("app")
        .container_instances(ci)
        .started_by("ecs-svc/app")
        .send()
        .await
        .unwrap();
    out.tasks()[0].task_arn().unwrap().to_string()
}

async fn container_instance_status(world: &World) -> String {
    let ecs = aws_sdk_ecs::Client::new(&world.sdk().await);
    let ci = world.container_instance().await.unwrap();
    let out = ecs
        .describe_container_instances()
        .cluster(&world.info.cluster)
        .container_instances(ci)
        .send()
        .await
        .unwrap();
    out.container_instances()[0]
        .status()
        .unwrap_or_default()
        .to_string()
}

/// Everything nodeagent asked of AWS and of Consul, in time order: ("ecs:StopTask", its
/// parameters), ("consul:leave", {}), …
async fn timeline(world: &World) -> Vec<(String, serde_json::Value)> {
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    let consul = world
        .control("GET", "/consul", serde_json::Value::Null)
        .await;
    let mut events: Vec<(f64, String, serde_json::Value)> = stats["aws"]["sequence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["at"].as_f64().unwrap(),
                e["op"].as_str().unwrap().to_string(),
                e["params"].clone(),
            )
        })
        .chain(consul["calls"].as_array().unwrap().iter().map(|c| {
            (
                c["at"].as_f64().unwrap(),
                format!("consul:{}", c["call"].as_str().unwrap()),
                c.clone(),
            )
        }))
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    events.into_iter().map(|(_, e, p)| (e, p)).collect()
}

/// The drain's part of the timeline: what it changes, in order (an SDK's retries of one call
/// count once).
fn drain_calls(timeline: &[(String, serde_json::Value)]) -> Vec<&str> {
    let wanted = [
        "ecs:DeleteAttributes",
        "ecs:UpdateContainerInstancesState",
        "consul:maintenance",
        "ecs:StopTask",
        "consul:leave",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:SetInstanceHealth",
    ];
    // From the drain on: after the readiness attribute was last put.
    let from = timeline
        .iter()
        .rposition(|(op, _)| op == "ecs:PutAttributes")
        .map_or(0, |i| i + 1);
    let mut calls: Vec<&str> = Vec::new();
    for (op, _) in &timeline[from..] {
        // moto answers CompleteLifecycleAction with a 500, which the SDK retries.
        let retry =
            op == "autoscaling:CompleteLifecycleAction" && calls.last() == Some(&op.as_str());
        if wanted.contains(&op.as_str()) && !retry {
            calls.push(op);
        }
    }
    calls
}

/// The order nodeagent stopped its tasks in, from its log.
fn stop_order(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("stopping, and holding it stopped"))
        .filter_map(|l| l.split("task=").nth(1))
        .map(|t| t.split_whitespace().next().unwrap().to_string())
        .collect()
}

async fn ready_to_drain(world: &World) {
    wait_for_async(
        Duration::from_secs(30),
        "nodeagent.ready=true",
        async || ready(world).await.as_deref() == Some("true"),
    )
    .await;
}

/// Sets IMDS items (a spot notice, a scale-in) in the world's fixture.
async fn set_imds(world: &World, items: serde_json::Value) {
    world.control("POST", "/imds/items", items).await;
}

/// Waits until the agent says its drain is done.
async fn drained(agent: &Agent, what: &str) {
    wait_for_async(Duration::from_secs(30), what, async || {
        agent
            .log()
            .contains("drained: the node's tasks are stopped")
    })
    .await;
}

#[tokio::test]
async fn scale_in_drains_in_order_and_completes_the_lifecycle_action() {
    let (world, config) = drain_world();
    let mut agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "agent");
    ready_to_drain(&world).await;
    let tasks_before = world.running_tasks().await;
    let app = start_app_task(&world).await;

    // The group terminates the instance; it waits in Terminating:Wait for the hook.
    set_imds(
        &world,
        serde_json::json!({"autoscaling/target-lifecycle-state": "Terminated"}),
    )
    .await;
    wait_for_async(
        Duration::from_secs(10),
        "DRAINING and Consul maintenance",
        async || {
            let consul = world
                .control("GET", "/consul", serde_json::Value::Null)
                .await;
            container_instance_status(&world).await == "DRAINING" && consul["maintenance"] == true
        },
    )
    .await;
    // ECS moves the service's task elsewhere: it stops here.
    world.stop_ecs_task(&app).await;
    drained(&agent, "the drain").await;

    let t = timeline(&world).await;
    assert_eq!(
        drain_calls(&t),
        [
            "ecs:DeleteAttributes",
            "ecs:UpdateContainerInstancesState",
            "consul:maintenance",
            "ecs:StopTask", // the app task, stopped by "ECS" (the test)
            "ecs:StopTask",
            "ecs:StopTask",
            "consul:leave",
            "ecs:StopTask",
            "autoscaling:CompleteLifecycleAction",
        ],
        "{t:#?}"
    );
    // Which task each StopTask stopped: registrator, the proxy, then (after leave) Consul.
    let family = |arn: &str| {
        tasks_before
            .iter()
            .find(|(_, _, a)| a == arn)
            .map(|(f, _, _)| f.clone())
            .unwrap_or_else(|| "app".into())
    };
    let stopped: Vec<String> = t
        .iter()
        .filter(|(op, _)| op == "ecs:StopTask")
        .map(|(_, p)| family(p["task"].as_str().unwrap()))
        .collect();
    assert_eq!(
        stopped,
        ["app", "consul-registrator", "linkerd", "consul-agent"]
    );
    assert_eq!(
        stop_order(&agent.log()),
        ["consul-registrator", "linkerd", "consul-agent"]
    );
    let (_, complete) = t
        .iter()
        .find(|(op, _)| op == "autoscaling:CompleteLifecycleAction")
        .unwrap();
    assert_eq!(complete["AutoScalingGroupName"], "g");
    assert_eq!(complete["LifecycleHookName"], "h");
    assert_eq!(complete["InstanceId"], world.info.instance_id.as_str());
    assert_eq!(complete["LifecycleActionResult"], "CONTINUE");
    assert!(
        world.running_tasks().await.is_empty(),
        "nothing runs on the node"
    );
    assert!(ready(&world).await.is_none());
    let consul = world
        .control("GET", "/consul", serde_json::Value::Null)
        .await;
    assert_eq!(consul["maintenance"], true);
    assert!(consul["calls"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("autoscaling-terminated"));

    // status shows the drain; the agent stays up, drained, until stopped.
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["status", "--json", "--root"])
        .arg(world.root.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "drained is not healthy");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["phase"], "drained");
    assert_eq!(s["drain"]["trigger"], "autoscaling-terminated");
    assert_eq!(s["drain"]["done"], true);
    let steps: Vec<(&str, bool)> = s["drain"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["step"].as_str().unwrap(), x["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("withdraw readiness attribute", true),
            ("container instance DRAINING", true),
            ("consul maintenance", true),
            ("application tasks stopped", true),
            ("stop consul-registrator", true),
            ("stop linkerd", true),
            ("consul leave", true),
            ("stop consul-agent", true),
            // moto does not implement CompleteLifecycleAction (it answers 500 "not
            // implemented"): the call is made, with the right parameters (above), and the step
            // reports the emulator's refusal.
            ("complete lifecycle action", false),
        ]
    );
    let detail = s["drain"]["steps"][8]["detail"].as_str().unwrap();
    assert!(
        detail.contains("autoscaling:CompleteLifecycleAction (group g, hook h) failed"),
        "{detail}"
    );
    let world_log = std::fs::read_to_string(world.root.path().join("world.log")).unwrap();
    assert!(
        world_log
            .contains("moto raised on autoscaling:CompleteLifecycleAction: NotImplementedError"),
        "{world_log}"
    );
    assert!(agent.sigterm().success());
}

/// An agent killed in the middle of a scale-in drain (waiting for an application task) is
/// replaced by one that resumes it as a scale-in: it keeps the group's lifecycle hook alive with
/// heartbeats, and completes the hook at the end. (It used to resume it as "resumed": no
/// heartbeats, so a drain longer than the hook's heartbeat timeout lost the hook.)
#[tokio::test]
async fn a_scale_in_drain_resumed_by_a_new_agent_keeps_the_hook_alive() {
    let (world, _) = drain_world();
    let config = world.config(&format!(
        "[consul]\napi = \"{}\"\n[lifecycle]\ntrigger_poll = \"200ms\"\ndrain_tasks_timeout = \"2m\"\n\
         drain_step_timeout = \"10s\"\nlifecycle_hook = \"h\"\n",
        world.info.consul_url
    ));
    // AWS's shortest heartbeat timeout: a heartbeat every 15 s.
    let asg = aws_sdk_autoscaling::Client::new(&world.sdk().await);
    asg.put_lifecycle_hook()
        .auto_scaling_group_name("g")
        .lifecycle_hook_name("h")
        .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
        .heartbeat_timeout(30)
        .send()
        .await
        .unwrap();
    let mut first = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "first");
    ready_to_drain(&world).await;
    let app = start_app_task(&world).await;
    set_imds(
        &world,
        serde_json::json!({"autoscaling/target-lifecycle-state": "Terminated"}),
    )
    .await;
    wait_for_async(Duration::from_secs(10), "DRAINING", async || {
        container_instance_status(&world).await == "DRAINING"
    })
    .await;
    first.sigkill();
    let killed = timeline(&world).await.len();

    let second = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "second");
    wait_for_async(
        Duration::from_secs(40),
        "a heartbeat from the agent that resumed the drain",
        async || {
            timeline(&world).await[killed..]
                .iter()
                .any(|(op, _)| op == "autoscaling:RecordLifecycleActionHeartbeat")
        },
    )
    .await;
    world.stop_ecs_task(&app).await;
    drained(&second, "the resumed drain").await;
    let t = timeline(&world).await;
    let (_, beat) = t[killed..]
        .iter()
        .find(|(op, _)| op == "autoscaling:RecordLifecycleActionHeartbeat")
        .unwrap();
    assert_eq!(beat["LifecycleHookName"], "h", "{beat}");
    assert!(
        t[killed..]
            .iter()
            .any(|(op, _)| op == "autoscaling:CompleteLifecycleAction"),
        "{t:#?}"
    );
    let s: serde_json::Value = serde_json::from_slice(
        &Command::new(env!("CARGO_BIN_EXE_nodeagent"))
            .args(["status", "--json", "--root"])
            .arg(world.root.path())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(s["drain"]["trigger"], "autoscaling-terminated", "{s}");
    assert!(world.running_tasks().await.is_empty(), "nothing runs");
}

#[tokio::test]
async fn a_spot_interruption_drains_and_an_app_task_that_never_stops_only_costs_the_timeout() {
    let (world, config) = drain_world();
    let mut agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "agent");
    ready_to_drain(&world).await;
    let _app = start_app_task(&world).await; // never stops

    // Two minutes from now, as AWS gives them: the 3 s tasks timeout is the tighter bound.
    let at =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(120));
    let notice = serde_json::json!({"action": "terminate", "time": at.to_string()}).to_string();
    set_imds(&world, serde_json::json!({"spot/instance-action": notice})).await;
    let asked = std::time::Instant::now();
    drained(&agent, "the drain").await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "the 3 s timeout was waited: {took:?}"
    );
    let log = agent.log();
    assert!(
        log.contains("trigger=\"spot-interruption\"") || log.contains("trigger=spot-interruption"),
        "{log}"
    );
    assert!(
        log.contains("drain step timed out after 3s; going on"),
        "{log}"
    );
    let t = timeline(&world).await;
    assert_eq!(
        drain_calls(&t),
        [
            "ecs:DeleteAttributes",
            "ecs:UpdateContainerInstancesState",
            "consul:maintenance",
            "ecs:StopTask",
            "ecs:StopTask",
            "consul:leave",
            "ecs:StopTask",
        ],
        "no lifecycle action for a spot interruption: {t:#?}"
    );
    assert_eq!(container_instance_status(&world).await, "DRAINING");
    assert!(agent.sigterm().success());
}

#[tokio::test]
async fn drain_at_shutdown_then_sigterm_and_a_plain_restart_keeps_every_task() {
    let (world, config) = drain_world();
    let mut agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "agent");
    ready_to_drain(&world).await;

    // A plain restart (systemctl restart nodeagent): SIGTERM alone leaves every task running,
    // and the next agent adopts them.
    let before = world.running_tasks().await;
    assert_eq!(before.len(), 3);
    assert!(agent.sigterm().success());
    assert_eq!(world.running_tasks().await, before);
    let mut agent = Agent::start_with_docker(&world, crate::support::NO_DOCKER, &config, "second");
    ready_to_drain(&world).await;
    assert_eq!(
        world.running_tasks().await,
        before,
        "adopted, not restarted"
    );

    // At system shutdown the unit's ExecStop runs `nodeagent drain`, then systemd sends
    // SIGTERM.
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["drain", "--timeout", "1s", "--root"])
        .arg(world.root.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok     consul leave"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("drained (requested)"),
        "{stdout}"
    );
    assert!(agent.sigterm().success());
    assert!(world.running_tasks().await.is_empty());
    assert_eq!(container_instance_status(&world).await, "DRAINING");
    let t = timeline(&world).await;
    let calls = drain_calls(&t);
    let leave = calls.iter().position(|c| *c == "consul:leave").unwrap();
    assert_eq!(
        calls[leave + 1],
        "ecs:StopTask",
        "the Consul agent stops after leave: {calls:?}"
    );
    assert_eq!(calls[leave - 2..leave], ["ecs:StopTask", "ecs:StopTask"]);
}

#[test]
fn drain_without_an_agent_says_so() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["drain", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nodeagent is not running"));
}

/// The node's drain, as `status --json` shows it, once it is done.
fn drained_node(node: &Node) -> Option<serde_json::Value> {
    node.status()
        .filter(|s| s["phase"] == "drained" && s["drain"]["done"] == true)
}

#[test]
fn a_docker_node_drains_its_containers_in_order_around_consul_leave() {
    if !netns::enter("a_docker_node_drains_its_containers_in_order_around_consul_leave") {
        return;
    }
    let node = Node::start(&[]);
    let mut agent = node.run("agent");
    wait_for(BOOT, "a healthy node", || node.healthy());
    // The drain's Consul calls go to the default `consul.api`: the Consul stand-in, which logs
    // every request. Followed from its first line until it ends (the drain removes it).
    let consul = node.engine.follow_logs(
        &node.container("consul-agent").unwrap(),
        &node.path("/consul-agent.log"),
    );
    let since = stamp();

    let out = node.nodeagent(&["drain"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for step in [
        "container instance DRAINING",
        "consul maintenance",
        "stop consul-registrator",
        "stop linkerd",
        "consul leave",
        "stop consul-agent",
    ] {
        assert!(
            stdout.contains(&format!("ok     {step} (")),
            "{step}: {stdout}"
        );
    }

    // The engine's own record of the deaths, on its clock.
    let deaths = node.engine.events(
        &since,
        &[
            "event=die",
            &format!("label=io.nodeagent.node={}", node.world.info.instance_id),
        ],
    );
    let order: Vec<&str> = deaths.iter().map(|d| d.task.as_str()).collect();
    assert_eq!(
        order,
        ["consul-registrator", "linkerd", "consul-agent"],
        "{deaths:?}"
    );
    assert_eq!(deaths[2].exit_code, Some(0), "Consul left and exited 0");
    // What the Consul stand-in was asked, with the engine's time of each line.
    let requests: Vec<(f64, String)> = consul
        .lines(Duration::from_secs(10))
        .into_iter()
        .filter_map(|(at, l)| Some((at, l.split_once("agent: http: Request ")?.1.to_string())))
        .filter(|(_, r)| !r.starts_with("GET /v1/status/leader"))
        .collect();
    let asked = |what: &str| -> Vec<f64> {
        requests
            .iter()
            .filter(|(_, r)| r.starts_with(what))
            .map(|(at, _)| *at)
            .collect()
    };
    let maintenance = asked("PUT /v1/agent/maintenance?enable=true&reason=");
    let leave = asked("PUT /v1/agent/leave");
    assert_eq!(maintenance.len(), 1, "{requests:?}");
    assert_eq!(leave.len(), 1, "{requests:?}");
    assert!(
        maintenance[0] < deaths[0].at,
        "maintenance before the first stop: {requests:?} {deaths:?}"
    );
    assert!(
        deaths[1].at < leave[0] && leave[0] < deaths[2].at,
        "leave between linkerd's and consul's deaths: {deaths:?} {requests:?}"
    );

    // Held: the node stays drained, its tasks stopped, no container left.
    let s = drained_node(&node).expect("drained");
    assert_eq!(s["drain"]["trigger"], "requested");
    for t in s["tasks"].as_array().unwrap() {
        assert_eq!(t["state"], "stopped", "{t}");
    }
    assert_eq!(node.containers(), []);
    assert!(agent.sigterm().success());
}

#[test]
fn a_drained_node_stays_drained_when_its_agent_restarts() {
    if !netns::enter("a_drained_node_stays_drained_when_its_agent_restarts") {
        return;
    }
    let node = Node::start(&[]);
    node.conf_d("50-drain.toml", "[lifecycle]\ntrigger_poll = \"200ms\"\n");
    let mut agent = node.run("agent");
    wait_for(BOOT, "a healthy node", || node.healthy());
    let before = node.containers();

    // The unit's ExecStop on a restart: not at shutdown, so no drain.
    let out = node.nodeagent(&["drain", "--if-shutting-down"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not shutting down: no drain"));
    let s = node.status().unwrap();
    assert!(s["phase"] == "supervise" && s["drain"].is_null(), "{s}");
    assert_eq!(node.containers(), before);

    support::block_on(node.world.control(
        "POST",
        "/imds/items",
        serde_json::json!({"spot/instance-action": "{\"action\": \"stop\"}"}),
    ));
    wait_for(BOOT, "the drain done", || drained_node(&node).is_some());
    let drain = drained_node(&node).unwrap()["drain"].clone();
    assert_eq!(drain["trigger"], "spot-interruption");
    assert!(agent.sigterm().success());
    let recorded: serde_json::Value =
        serde_json::from_str(&node.world.read("/run/nodeagent/drain")).unwrap();
    assert_eq!(recorded, drain, "the drain is recorded as it ended");
    assert_eq!(node.containers(), []);

    // A new agent (a watchdog restart, an upgrade): it reports the drain as it ended, runs no
    // step again (Consul is gone: a maintenance or leave would fail) and starts nothing.
    let since = stamp();
    let _second = node.run("second");
    wait_for(BOOT, "the drained node reported", || {
        drained_node(&node).is_some()
    });
    let again = drained_node(&node).unwrap();
    assert_eq!(again["drain"], drain, "{again}");
    let steps = again["drain"]["steps"].as_array().unwrap();
    assert!(
        !steps.is_empty() && steps.iter().all(|s| s["ok"] == true),
        "{again}"
    );
    let created = node.engine.events(
        &since,
        &[
            "event=create",
            &format!("label=io.nodeagent.node={}", node.world.info.instance_id),
        ],
    );
    assert_eq!(created, [], "no container created");
    assert_eq!(node.containers(), []);
    assert!(
        support::block_on(ready(&node.world)).is_none(),
        "no readiness attribute"
    );
}
