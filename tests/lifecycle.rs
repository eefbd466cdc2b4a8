//! The node's standing in its cluster, against the emulated ECS (moto): the readiness
//! attribute follows the tasks' health (ECS runtime, one health check the test controls).

mod support;

use std::net::TcpListener;
use std::process::Command;
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
    eventually(
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
    eventually(Duration::from_secs(30), what, async || {
        agent
            .log()
            .contains("drained: the node's tasks are stopped")
    })
    .await;
}

#[tokio::test]
async fn scale_in_drains_in_order_and_completes_the_lifecycle_action() {
    let (world, config) = drain_world();
    let mut agent = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "agent");
    ready_to_drain(&world).await;
    let tasks_before = world.running_tasks().await;
    let app = start_app_task(&world).await;

    // The group terminates the instance; it waits in Terminating:Wait for the hook.
    set_imds(
        &world,
        serde_json::json!({"autoscaling/target-lifecycle-state": "Terminated"}),
    )
    .await;
    eventually(
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

#[tokio::test]
async fn a_spot_interruption_drains_and_an_app_task_that_never_stops_only_costs_the_timeout() {
    let (world, config) = drain_world();
    let mut agent = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "agent");
    ready_to_drain(&world).await;
    let _app = start_app_task(&world).await; // never stops

    // Two minutes from now, as AWS gives them: the 3 s tasks timeout is the tighter bound.
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(120));
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
    let mut agent = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "agent");
    ready_to_drain(&world).await;

    // A plain restart (systemctl restart nodeagent): SIGTERM alone leaves every task running,
    // and the next agent adopts them.
    let before = world.running_tasks().await;
    assert_eq!(before.len(), 3);
    assert!(agent.sigterm().success());
    assert_eq!(world.running_tasks().await, before);
    let mut agent = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "second");
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

#[tokio::test]
async fn a_task_crash_looping_too_long_marks_the_instance_unhealthy_once() {
    let world = World::start(&["--asg", "g"]);
    let engine = support::docker::Engine::start();
    let ports = support::agent::Ports {
        consul: support::docker::free_port(),
        linkerd: support::docker::free_port(),
    };
    let config = support::agent::docker_config(
        &world,
        &ports,
        r#"["sh", "-c", "exit 3"]"#,
        &support::agent::consul_http(&ports),
        "crash_loop_restarts = 2\n[lifecycle]\nunhealthy_after = \"1s\"",
    );
    let agent = Agent::start(&world, &engine, &config, "agent");
    eventually(Duration::from_secs(60), "SetInstanceHealth", async || {
        let stats = world
            .control("GET", "/stats", serde_json::Value::Null)
            .await;
        stats["aws"]["by_operation"]["autoscaling:SetInstanceHealth"] == 1
    })
    .await;
    let asg = aws_sdk_autoscaling::Client::new(&world.sdk().await);
    let out = asg
        .describe_auto_scaling_instances()
        .instance_ids(&world.info.instance_id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.auto_scaling_instances()[0].health_status(),
        Some("Unhealthy")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    assert_eq!(
        stats["aws"]["by_operation"]["autoscaling:SetInstanceHealth"], 1,
        "once"
    );
    let log = agent.log();
    assert!(
        log.contains("crash-looped too long: marked this instance Unhealthy"),
        "{log}"
    );
}

#[tokio::test]
async fn a_docker_node_drains_its_containers_in_order_around_consul_leave() {
    let world = World::start(&[]);
    let engine = support::docker::Engine::start();
    let ports = support::agent::Ports {
        consul: support::docker::free_port(),
        linkerd: support::docker::free_port(),
    };
    let config = support::agent::docker_config(
        &world,
        &ports,
        r#"["sleep", "100000"]"#,
        &support::agent::consul_http(&ports),
        &format!("[consul]\napi = \"{}\"", world.info.consul_url),
    );
    let mut agent = Agent::start(&world, &engine, &config, "agent");
    let status = || {
        Command::new(env!("CARGO_BIN_EXE_nodeagent"))
            .args(["status", "--root"])
            .arg(world.root.path())
            .output()
            .unwrap()
            .status
            .code()
    };
    eventually(Duration::from_secs(40), "a healthy node", async || {
        status() == Some(0)
    })
    .await;
    // The engine's own record of every container death, with its time.
    let mut events = Command::new("docker")
        .args([
            "-H",
            &engine.socket,
            "events",
            "--filter",
            "event=die",
            "--format",
        ])
        .arg("{{index .Actor.Attributes \"io.nodeagent.task\"}} {{.TimeNano}}")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["drain", "--root"])
        .arg(world.root.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for step in [
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
    assert!(
        !stdout.contains("DRAINING"),
        "no container instance on this node: {stdout}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = events.kill();
    let mut text = String::new();
    use std::io::Read;
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let _ = events.wait();
    let deaths: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, ns)| (t.to_string(), ns.parse::<f64>().unwrap() / 1e9))
        .collect();
    let order: Vec<&str> = deaths.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        order,
        ["consul-registrator", "linkerd", "consul-agent"],
        "{text}"
    );
    let consul = world
        .control("GET", "/consul", serde_json::Value::Null)
        .await;
    let leave = consul["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["call"] == "leave")
        .unwrap()["at"]
        .as_f64()
        .unwrap();
    assert!(
        deaths[1].1 < leave && leave < deaths[2].1,
        "leave between linkerd's and consul's deaths: {deaths:?} {leave}"
    );
    // Held: nothing comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let running = engine.cli(&["ps", "-q"]);
    assert!(running.is_empty(), "{running}");
    assert!(agent.sigterm().success());
}

#[tokio::test]
async fn a_drained_node_stays_drained_when_its_agent_restarts() {
    let (world, config) = drain_world();
    let mut agent = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "agent");
    ready_to_drain(&world).await;

    // The unit's ExecStop on a restart: not at shutdown, so no drain.
    let out = Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["drain", "--if-shutting-down", "--root"])
        .arg(world.root.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not shutting down: no drain"));
    assert_eq!(world.running_tasks().await.len(), 3);

    set_imds(
        &world,
        serde_json::json!({"spot/instance-action": "{\"action\": \"stop\"}"}),
    )
    .await;
    drained(&agent, "the drain").await;
    assert!(agent.sigterm().success());
    assert_eq!(world.read("/run/nodeagent/drain"), "spot-interruption");
    let starts = |stats: &serde_json::Value| {
        stats["aws"]["by_operation"]["ecs:StartTask"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = starts(
        &world
            .control("GET", "/stats", serde_json::Value::Null)
            .await,
    );

    // A new agent (a watchdog restart, an upgrade): it resumes the drain and starts nothing.
    let second = Agent::start_with_docker(&world, "unix:///nonexistent", &config, "second");
    drained(&second, "the resumed drain").await;
    assert!(second
        .log()
        .contains("resuming the drain, starting nothing"));
    let stats = world
        .control("GET", "/stats", serde_json::Value::Null)
        .await;
    assert_eq!(starts(&stats), before, "no task started again: {stats}");
    assert!(world.running_tasks().await.is_empty());
    assert!(ready(&world).await.is_none(), "no readiness attribute");
}
