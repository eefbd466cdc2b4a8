//! The fault matrix: one test per fault a node meets in production, each against the test world
//! made less kind than moto (the fault layer of `tests/world/world.py`: throttling, lost
//! answers, lag, slow answers; IMDS down, slow or expiring its tokens; an ECS agent that stops
//! or restarts) or against the node itself (a Docker engine restarted, a full disk, a stepped
//! clock, SIGKILL, two agents; a frozen engine is operator.rs's watchdog test, a crash loop
//! node.rs's degraded node). The ECS runtime against moto unless the row is about Docker; Docker rows run a whole node on the stand-ins (`support::node`), each in its own
//! network namespace.
//!
//! Each row asserts what applies of: never two running copies of a task (checked every 200 ms
//! while the fault is on, by an observer the fault layer leaves alone — `support::faults`), no
//! torn or partial file (every rendered file parses: JSON, YAML, the shell script; no temporary
//! file left), a clear error (exit code, a message naming the resource) or a recovery (the
//! tasks started, the node healthy), and no hang (the wall time of what must end is bounded).
//! Row numbers follow tests/README.md's table.

use crate::support::agent::Agent;
use crate::support::faults::{
    calls, control, faults, healthy, live_arns, live_by_family, start_calls_of, stats, status,
    temp_files, three_once, torn_files, PlacementCheck, Watch,
};
use crate::support::node::Node;
use crate::support::{self, block_on, netns, transcript, wait_for, World};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A `conf.d` fragment beside the world's configuration file (`ROOT/nodeagent.toml`).
fn conf_d(world: &World, name: &str, text: &str) {
    let dir = world.root.path().join("conf.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

/// A long-running `nodeagent run` with the ECS runtime, its log in `ROOT/NAME.log`.
fn ecs_agent(world: &World, config: &Path, name: &str) -> Agent {
    Agent::start_with_docker(world, crate::support::NO_DOCKER, config, name)
}

/// Waits for a healthy node whose three tasks run once each in moto; on a timeout, says what
/// moto has, what `status` says and the end of every agent's log.
fn wait_three_healthy(world: &World, limit: Duration) {
    let done = support::eventually(limit, || {
        three_once(&live_by_family(world)) && healthy(world.root.path())
    });
    if !done {
        let mut logs = String::new();
        for entry in std::fs::read_dir(world.root.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".log") && name != "world.log" {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                logs.push_str(&format!("--- {name} (last lines)\n"));
                for l in tail.iter().rev() {
                    logs.push_str(l);
                    logs.push('\n');
                }
            }
        }
        panic!(
            "timed out after {limit:?} waiting for three tasks, one each, and a healthy node\n\
             moto: {:?}\nstatus: {:?}\n{logs}",
            live_by_family(world),
            status(world.root.path()).map(|s| s["tasks"].clone())
        );
    }
}

/// What every row ends with: each rendered file that exists parses, no temporary file is left.
fn assert_files_whole(root: &Path) {
    assert_eq!(torn_files(root), Vec::<String>::new(), "torn files");
    assert_eq!(
        temp_files(root),
        Vec::<PathBuf>::new(),
        "temporary files left"
    );
}

/// `run --once` started in the background, its stderr in `ROOT/LOG`: the child and that path.
fn spawn_once(world: &World, config: &Path, log: &str) -> (std::process::Child, PathBuf) {
    let path = world.root.path().join(log);
    let child = world
        .nodeagent(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&path).unwrap())
        .spawn()
        .unwrap();
    (child, path)
}

/// Files under the root, less the world's log, the test's configuration and the node's lock.
fn written_files(world: &World) -> Vec<PathBuf> {
    support::files_under(world.root.path())
        .into_iter()
        .filter(|p| {
            !(p.ends_with("world.log")
                || p.ends_with("nodeagent.toml")
                || p.starts_with("conf.d")
                // The node's lock: runtime state (in /run on a node), not a write.
                || (p.starts_with("run/nodeagent")
                    && p.extension().is_some_and(|e| e == "lock")))
        })
        .collect()
}

// ---------------------------------------------------------------- 1. IMDS down

#[test]
fn r01_imds_down_exits_1_naming_the_endpoint_within_its_bound_having_written_nothing() {
    let world = World::start(&[]);
    let config = world.config("");
    control(&world, "POST", "/imds", json!({"mode": "down"}));
    let t = Instant::now();
    let out = world.run_once(&config);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", transcript(&out));
    assert!(stderr.contains(&world.info.imds_url), "{stderr}");
    // aws-config's IMDS client: 4 attempts, 20 s for the whole item.
    assert!(took < Duration::from_secs(28), "bounded: took {took:?}");
    assert_eq!(
        written_files(&world),
        Vec::<PathBuf>::new(),
        "nothing written"
    );
    assert_eq!(calls(&world, "ecs:StartTask"), 0);
}

// ---------------------------------------------------------------- 2. IMDS slow

#[test]
fn r02_imds_answering_in_2_s_every_time_still_boots() {
    let world = World::start(&[]);
    let config = world.config("");
    control(&world, "POST", "/imds", json!({"delay_ms": 2000}));
    let watch = Watch::ecs(&world);
    let t = Instant::now();
    let out = world.run_once(&config);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", transcript(&out));
    let imds = stats(&world)["imds"].clone();
    let requests = imds["requests"].as_u64().unwrap();
    assert!(
        requests >= 2 && took >= Duration::from_secs(4),
        "a token and an item, each answered in 2 s: {took:?} for {imds}"
    );
    assert!(took < Duration::from_secs(120), "bounded: took {took:?}");
    assert!(three_once(&live_by_family(&world)));
    watch.assert_clean(3);
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 3. IMDS 401 mid-boot

#[test]
fn r03_imds_tokens_expiring_mid_boot_are_fetched_again_and_the_boot_completes() {
    let world = World::start(&[]);
    let config = world.config("");
    // Slow enough that the boot is still reading IMDS when the tokens expire.
    control(&world, "POST", "/imds", json!({"delay_ms": 300}));
    let (mut child, log) = spawn_once(&world, &config, "once.log");
    wait_for(Duration::from_secs(20), "the boot reading IMDS", || {
        stats(&world)["imds"]["requests"].as_u64().unwrap() >= 3
    });
    let before = stats(&world)["imds"].clone();
    control(&world, "POST", "/imds", json!({"mode": "expire-tokens"}));
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let imds = stats(&world)["imds"].clone();
    assert!(
        status.success(),
        "{stderr}\nIMDS before the tokens expired: {before}; at the end: {imds}"
    );
    assert!(
        imds["unauthorized"].as_u64().unwrap() >= 1,
        "a request met the expired token (401): {imds}"
    );
    assert!(
        imds["token_requests"].as_u64().unwrap() > before["token_requests"].as_u64().unwrap(),
        "a new token was fetched after the 401: before {before}, after {imds}"
    );
    assert!(three_once(&live_by_family(&world)));
    assert_files_whole(world.root.path());
}

/// The same expiry on a running agent: its drain triggers are read from IMDS every
/// `lifecycle.trigger_poll`, and a spot notice after the tokens expired must still drain the node.
#[test]
fn r03b_imds_tokens_expiring_under_a_running_agent_do_not_blind_its_drain_triggers() {
    let world = World::start(&[]);
    let config = world.config(&format!(
        "[consul]\napi = \"{}\"\n[lifecycle]\ntrigger_poll = \"200ms\"\ndrain_tasks_timeout = \"1s\"\n",
        world.info.consul_url
    ));
    let agent = ecs_agent(&world, &config, "agent");
    wait_three_healthy(&world, Duration::from_secs(30));
    let before = stats(&world)["imds"].clone();
    control(&world, "POST", "/imds", json!({"mode": "expire-tokens"}));
    std::thread::sleep(Duration::from_secs(2));
    control(
        &world,
        "POST",
        "/imds/items",
        json!({"spot/instance-action": "{\"action\": \"terminate\"}"}),
    );
    let drained = support::eventually(Duration::from_secs(20), || {
        agent
            .log()
            .contains("drained: the node's tasks are stopped")
    });
    let imds = stats(&world)["imds"].clone();
    assert!(
        drained,
        "no drain 20 s after the spot notice; IMDS before the expiry {before}, now {imds}\n{}",
        agent.log()
    );
    assert!(
        imds["token_requests"].as_u64() > before["token_requests"].as_u64(),
        "{imds}"
    );
}

// ---------------------------------------------------------------- 4. no Consul server for 30 s

#[test]
fn r04_no_tagged_consul_server_for_30_s_waits_and_completes_after_them() {
    let world = World::start(&["--servers", "0", "--stopped-servers", "0"]);
    let config = world.config("");
    let t = Instant::now();
    let (mut child, log) = spawn_once(&world, &config, "once.log");
    while t.elapsed() < Duration::from_secs(30) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited while waiting for a server: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(calls(&world, "ecs:StartTask"), 0, "nothing started yet");
    assert!(!world.path("/opt/consul/config/consul-agent.json").exists());
    let ip = world.run_consul_server();
    let tagged = Instant::now();
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{stderr}");
    // The discovery polls at most every 10 s (full jitter).
    assert!(
        tagged.elapsed() < Duration::from_secs(25),
        "found the server soon after: {:?}",
        tagged.elapsed()
    );
    let consul: serde_json::Value =
        serde_json::from_str(&world.read("/opt/consul/config/consul-agent.json")).unwrap();
    assert_eq!(consul["retry_join"], json!([ip]));
    assert!(three_once(&live_by_family(&world)));
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 5. DescribeInstances throttled

#[test]
fn r05_describe_instances_throttled_10_times_completes_and_counts_the_throttling() {
    let world = World::start(&[]);
    let config = world.config("");
    faults(
        &world,
        json!([{"op": "ec2:DescribeInstances", "fault": "throttle", "times": 10}]),
    );
    let watch = Watch::ecs(&world);
    let t = Instant::now();
    let agent = ecs_agent(&world, &config, "agent");
    // Waited for longer than the bound below, so the bound is what fails.
    wait_three_healthy(&world, Duration::from_secs(180));
    let took = t.elapsed();
    let s = status(world.root.path()).unwrap();
    let counted = &s["aws_calls"]["ec2:DescribeInstances"];
    assert_eq!(counted["throttled"], 10, "status counts them: {counted}");
    assert!(counted["calls"].as_u64().unwrap() >= 11, "{counted}");
    let st = stats(&world);
    assert_eq!(
        st["aws"]["throttled_by_operation"]["ec2:DescribeInstances"],
        10
    );
    assert!(
        agent
            .log()
            .contains("AWS is throttling this account's calls"),
        "{}",
        agent.log()
    );
    assert!(took < Duration::from_secs(150), "{took:?}");
    watch.assert_clean(5);
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 6. StartTask throttled

#[test]
fn r06_start_task_throttled_10_times_starts_three_tasks_once_each() {
    let world = World::start(&[]);
    let config = world.config("");
    faults(
        &world,
        json!([{"op": "ecs:StartTask", "fault": "throttle", "times": 10}]),
    );
    let watch = Watch::ecs(&world);
    let t = Instant::now();
    let out = world.run_once(&config);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", transcript(&out));
    // Full jitter from 0.2 s doubling to 10 s: ten throttled attempts wait 53 s at the most.
    assert!(took < Duration::from_secs(120), "{took:?}");
    watch.settle(2);
    assert!(three_once(&live_by_family(&world)));
    let st = stats(&world);
    assert_eq!(st["aws"]["throttled_by_operation"]["ecs:StartTask"], 10);
    assert_eq!(
        st["aws"]["by_operation"]["ecs:StartTask"], 13,
        "10 throttled + 3"
    );
    watch.assert_clean(5);
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 7. StartTask answers lost

#[test]
fn r07_start_task_answers_lost_find_the_started_task_instead_of_starting_another() {
    let world = World::start(&[]);
    let config = world.config("");
    // Every StartTask is done by moto, and its answer never arrives.
    faults(&world, json!([{"op": "ecs:StartTask", "fault": "lose"}]));
    let watch = Watch::ecs(&world);
    let t = Instant::now();
    let out = world.run_once(&config);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", transcript(&out));
    // Each lost answer costs a 2 s settle before the look, not a start timeout.
    assert!(took < Duration::from_secs(30), "{took:?}");
    watch.settle(2);
    assert!(
        three_once(&live_by_family(&world)),
        "{:?}",
        live_by_family(&world)
    );
    for family in ["consul-agent", "consul-registrator", "linkerd"] {
        assert_eq!(start_calls_of(&world, family), 1, "{family}: one StartTask");
    }
    let st = stats(&world);
    assert_eq!(st["aws"]["faults_by_operation"]["ecs:StartTask"]["lose"], 3);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("found the task the lost StartTask started")
            .count(),
        3,
        "{stderr}"
    );
    watch.assert_clean(3);
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 8. ListTasks lagging

#[test]
fn r08_list_tasks_lagging_20_s_with_a_1_s_reconcile_keeps_exactly_three_copies() {
    let world = World::start(&[]);
    let config = world.config("");
    conf_d(
        &world,
        "50-fast.toml",
        "[supervision]\nreconcile_interval = \"1s\"\n",
    );
    faults(
        &world,
        json!([{"op": "ecs:ListTasks", "fault": "lag", "lag_ms": 20000}]),
    );
    let watch = Watch::ecs(&world);
    let _agent = ecs_agent(&world, &config, "agent");
    wait_three_healthy(&world, Duration::from_secs(30));
    let arns = live_arns(&world);
    // 30 s of supervision, reconciling every second while ECS lists none of the tasks for
    // their first 20 s.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let by = live_by_family(&world);
        assert!(three_once(&by), "at {:?}: {by:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(live_arns(&world), arns, "the same three tasks");
    let st = stats(&world);
    assert_eq!(st["aws"]["by_operation"]["ecs:StartTask"], 3);
    assert!(
        st["aws"]["by_operation"].get("ecs:StopTask").is_none(),
        "{st}"
    );
    assert!(
        st["aws"]["faults_by_operation"]["ecs:ListTasks"]["lag"]
            .as_u64()
            .unwrap_or(0)
            >= 10,
        "ListTasks did leave the tasks out: {}",
        st["aws"]["faults_by_operation"]
    );
    assert!(healthy(world.root.path()));
    watch.assert_clean(50);
}

// ---------------------------------------------------------------- 9. RESOURCE:PORTS

/// What row 9 rests on: moto books a task definition's host ports on the container instance
/// but places a second copy on the same ports anyway — ECS would refuse it (`RESOURCE:PORTS`).
#[test]
fn r09a_moto_books_host_ports_but_never_refuses_a_start_for_them() {
    let world = World::start(&[]);
    std::fs::create_dir_all(world.path("/etc/ecs")).unwrap();
    std::fs::write(world.path("/etc/ecs/ecs.config"), "ECS_CLUSTER=l5d-demo\n").unwrap();
    wait_for(Duration::from_secs(10), "the container instance", || {
        block_on(world.container_instance()).is_some()
    });
    block_on(async {
        let ecs = aws_sdk_ecs::Client::new(&world.sdk().await);
        let ci = world.container_instance().await.unwrap();
        let mut placed = Vec::new();
        for _ in 0..2 {
            let out = ecs
                .start_task()
                .cluster(&world.info.cluster)
                .task_definition("linkerd")
                .container_instances(&ci)
                .started_by("test")
                .send()
                .await
                .unwrap();
            placed.push((out.tasks().len(), out.failures().len()));
        }
        let desc = ecs
            .describe_container_instances()
            .cluster(&world.info.cluster)
            .container_instances(&ci)
            .send()
            .await
            .unwrap();
        let ports: Vec<String> = desc.container_instances()[0]
            .remaining_resources()
            .iter()
            .filter(|r| r.name() == Some("PORTS"))
            .flat_map(|r| r.string_set_value().to_vec())
            .collect();
        assert_eq!(
            ports.iter().filter(|p| *p == "9990").count(),
            2,
            "9990 booked twice: {ports:?}"
        );
        assert_eq!(placed, [(1, 0), (1, 0)], "moto placed both copies");
    });
}

#[test]
fn r09_a_copy_that_already_runs_unlisted_is_adopted_without_a_start() {
    let world = World::start(&[]);
    let config = world.config("");
    // The ECS agent registers the container instance (nodeagent's ecs.config, made here).
    std::fs::create_dir_all(world.path("/etc/ecs")).unwrap();
    std::fs::write(world.path("/etc/ecs/ecs.config"), "ECS_CLUSTER=l5d-demo\n").unwrap();
    wait_for(Duration::from_secs(10), "the container instance", || {
        block_on(world.container_instance()).is_some()
    });
    faults(
        &world,
        json!([{"op": "ecs:ListTasks", "fault": "lag", "lag_ms": 20000}]),
    );
    // A linkerd of ours already runs (an earlier agent's, whose record is gone); ECS's
    // ListTasks does not list it yet.
    let running = block_on(async {
        let ecs = aws_sdk_ecs::Client::new(&world.sdk().await);
        let ci = world.container_instance().await.unwrap();
        let out = ecs
            .start_task()
            .cluster(&world.info.cluster)
            .task_definition("linkerd")
            .container_instances(ci)
            .started_by(format!("nodeagent/{}", world.info.instance_id))
            .send()
            .await
            .unwrap();
        out.tasks()[0].task_arn().unwrap().to_string()
    });
    let ports = PlacementCheck::start(&world);
    let watch = Watch::ecs(&world);
    let t = Instant::now();
    let agent = Agent::start_with(&world, crate::support::NO_DOCKER, &config, "agent", |cmd| {
        cmd.env("AWS_ENDPOINT_URL", &ports.url);
    });
    wait_three_healthy(&world, Duration::from_secs(30));
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "adopted quickly, not after minutes of retries: {took:?}\n{}",
        agent.log()
    );
    assert_eq!(
        live_by_family(&world)["linkerd"],
        std::slice::from_ref(&running),
        "one linkerd: the one that ran"
    );
    let s = status(world.root.path()).unwrap();
    let linkerd = s["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "linkerd")
        .unwrap()
        .clone();
    assert_eq!(linkerd["instance"], running.as_str(), "{linkerd}");
    // The local ECS agent's /v1/tasks shows the copy at once: adopted without a StartTask
    // (before the local agent was read with every listing: one StartTask refused for its
    // ports, then the look; a start refused for them is the unit tests' case).
    assert_eq!(ports.refusals(), 0, "no StartTask refused for its ports");
    assert_eq!(
        start_calls_of(&world, "linkerd"),
        1,
        "no StartTask of linkerd but the test's own"
    );
    watch.settle(2);
    watch.assert_clean(2);
}

// ---------------------------------------------------------------- 10. the ECS agent never registers

#[test]
fn r10_an_ecs_agent_that_never_registers_is_an_error_naming_it_within_the_timeout() {
    let world = World::start(&[]);
    let config = world.config("");
    conf_d(&world, "50-agent.toml", "[ecs]\nagent_timeout = \"3s\"\n");
    control(&world, "POST", "/agent/stop", json!({}));
    let t = Instant::now();
    let out = world.run_once(&config);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&world.info.agent_url), "{stderr}");
    assert!(
        stderr.contains("did not report a container instance within 3s")
            && stderr.contains("systemctl status ecs")
            && stderr.contains("ecs.agent_timeout"),
        "says what to do: {stderr}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(13),
        "bounded by ecs.agent_timeout: {took:?}"
    );
    assert_eq!(calls(&world, "ecs:StartTask"), 0);
}

// ---------------------------------------------------------------- 11. the ECS agent restarts

#[test]
fn r11_an_ecs_agent_restart_mid_supervision_duplicates_nothing() {
    let world = World::start(&[]);
    let config = world.config("");
    conf_d(
        &world,
        "50-fast.toml",
        "[supervision]\nreconcile_interval = \"1s\"\n",
    );
    let mut agent = ecs_agent(&world, &config, "agent");
    wait_three_healthy(&world, Duration::from_secs(30));
    let arns = live_arns(&world);
    let watch = Watch::ecs(&world);
    control(&world, "POST", "/agent/restart", json!({"down_ms": 4000}));
    std::thread::sleep(Duration::from_secs(8)); // down, up again, reconciled a few times
    assert!(agent.alive(), "{}", agent.log());
    assert_eq!(live_arns(&world), arns, "the same tasks keep running");
    assert_eq!(calls(&world, "ecs:StartTask"), 3);
    assert!(healthy(world.root.path()));
    watch.assert_clean(20);
}

// ---------------------------------------------------------------- 12. dockerd restart

#[test]
fn r12_dockerd_restart_brings_the_tasks_back_once_each() {
    if !netns::enter("r12_dockerd_restart_brings_the_tasks_back_once_each") {
        return;
    }
    let mut node = Node::start(&[]);
    let mut agent = node.run("agent");
    wait_for(Duration::from_secs(60), "a healthy node", || node.healthy());
    let before = node.containers();
    let watch = Watch::docker(
        &node.engine.socket,
        &node.world.info.instance_id,
        node.world.root.path(),
    );
    node.engine.down();
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.alive(), "{}", agent.log());
    node.engine.up();
    wait_for(
        Duration::from_secs(60),
        "the tasks back and healthy",
        || {
            let now = node.containers();
            now.len() == 3
                && now
                    .iter()
                    .all(|(t, id)| !before.contains(&(t.clone(), id.clone())))
                && node.healthy()
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = node.containers();
    assert_eq!(after.len(), 3, "one container per task: {after:?}");
    assert!(agent.alive(), "{}", agent.log());
    watch.assert_clean(10);
    assert_files_whole(node.world.root.path());
}

// ---------------------------------------------------------------- 15. SIGKILL mid-boot

#[test]
fn r15_an_agent_killed_while_waiting_for_servers_is_replaced_by_one_that_completes() {
    let world = World::start(&["--servers", "0", "--stopped-servers", "0"]);
    let config = world.config("");
    let mut first = ecs_agent(&world, &config, "first");
    wait_for(
        Duration::from_secs(20),
        "waiting for a Consul server",
        || {
            status(world.root.path()).is_some_and(|s| {
                s["phase"] == "discover"
                    && s["phase_detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("Consul server"))
            })
        },
    );
    first.sigkill();
    let watch = Watch::ecs(&world);
    world.run_consul_server();
    let _second = ecs_agent(&world, &config, "second");
    wait_three_healthy(&world, Duration::from_secs(40));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(calls(&world, "ecs:StartTask"), 3);
    watch.assert_clean(5);
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 16. SIGKILL right after StartTask

/// Kills `agent` the moment moto has a task of `family` (polled every 10 ms by the observer):
/// the task's ARN.
fn kill_once_moto_has(world: &World, agent: &mut Agent, family: &str) -> String {
    let t = Instant::now();
    loop {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {family} task in moto"
        );
        if let Some(arns) = live_by_family(world).get(family) {
            agent.sigkill();
            return arns[0].clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn r16_an_agent_killed_right_after_start_task_is_followed_by_one_that_starts_no_second_copy() {
    let world = World::start(&[]);
    let config = world.config("");
    // consul-agent is healthy once the test listens: until then its dependents wait, and the
    // one StartTask made is consul-agent's.
    let port = support::docker::free_port();
    conf_d(
        &world,
        "50-gate.toml",
        &format!("[tasks.consul-agent.health]\ntcp = \"127.0.0.1:{port}\"\ninterval = \"200ms\"\n"),
    );
    faults(
        &world,
        json!([{"op": "ecs:ListTasks", "fault": "lag", "lag_ms": 20000}]),
    );
    let watch = Watch::ecs(&world);
    let mut first = ecs_agent(&world, &config, "first");
    // Killed the moment StartTask has returned: moto has the task and the agent its ARN (the
    // record on disk; a kill while the answer is still on its way is row 16b) — or, for an
    // agent that keeps no record, 1 s after moto had it.
    let record = world.path("/var/lib/nodeagent/ecs-tasks");
    let t = Instant::now();
    let mut seen: Option<Instant> = None;
    let arn = loop {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no consul-agent task in moto"
        );
        let arns = live_by_family(&world)
            .remove("consul-agent")
            .unwrap_or_default();
        if !arns.is_empty() && seen.is_none() {
            seen = Some(Instant::now());
        }
        let recorded = std::fs::read_to_string(&record).unwrap_or_default();
        let late = seen.is_some_and(|s| s.elapsed() >= Duration::from_secs(1));
        if let Some(arn) = arns.iter().find(|a| late || recorded.contains(a.as_str())) {
            first.sigkill();
            break arn.clone();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        calls(&world, "ecs:StartTask"),
        1,
        "only consul-agent's start was made"
    );
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let _second = ecs_agent(&world, &config, "second");
    wait_three_healthy(&world, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    let by = live_by_family(&world);
    assert_eq!(
        by["consul-agent"],
        [arn],
        "the first agent's consul-agent kept"
    );
    assert_eq!(
        start_calls_of(&world, "consul-agent"),
        1,
        "no second StartTask"
    );
    watch.assert_clean(10);
    assert_files_whole(world.root.path());
}

/// The harder case: the agent dies while `StartTask`'s answer is on its way (ECS started the
/// task; the ARN never reached the agent, so its record cannot have it), `ListTasks` lagging.
/// The next agent must find the task (the local ECS agent knows it at once) rather than start a
/// second copy. ECS's placement check (`RESOURCE:PORTS`) is on, as in production: it catches a
/// task with host ports, not registrator (host network, no port mappings).
#[test]
fn r16b_an_agent_killed_while_the_start_task_answer_is_in_flight_starts_no_second_copy() {
    let world = World::start(&[]);
    let config = world.config("");
    faults(
        &world,
        json!([
            {"op": "ecs:ListTasks", "fault": "lag", "lag_ms": 20000},
            // consul-agent's start answers at once; the next ones take 3 s to answer.
            {"op": "ecs:StartTask", "fault": "slow", "delay_ms": 3000, "after": 1},
        ]),
    );
    let ports = PlacementCheck::start(&world);
    let watch = Watch::ecs(&world);
    let mut first = Agent::start_with(&world, crate::support::NO_DOCKER, &config, "first", |cmd| {
        cmd.env("AWS_ENDPOINT_URL", &ports.url);
    });
    let arn = kill_once_moto_has(&world, &mut first, "consul-registrator");
    faults(
        &world,
        json!([{"op": "ecs:ListTasks", "fault": "lag", "lag_ms": 20000}]),
    );
    let record =
        std::fs::read_to_string(world.path("/var/lib/nodeagent/ecs-tasks")).unwrap_or_default();
    assert!(
        !record.contains(&arn),
        "the answer never reached the first agent: {record}"
    );
    let second = Agent::start_with(
        &world,
        crate::support::NO_DOCKER,
        &config,
        "second",
        |cmd| {
            cmd.env("AWS_ENDPOINT_URL", &ports.url);
        },
    );
    wait_for(Duration::from_secs(30), "a healthy node", || {
        healthy(world.root.path())
    });
    std::thread::sleep(Duration::from_secs(3));
    let by = live_by_family(&world);
    assert_eq!(
        by.get("consul-registrator"),
        Some(&vec![arn.clone()]),
        "the first agent's registrator ({arn}) kept, no second copy: {by:?}\n\
         the first agent's record: {record}\n--- the second agent's log\n{}",
        second.log()
    );
    watch.assert_clean(10);
}

// ---------------------------------------------------------------- 17. disk full

/// A tmpfs mounted at a path, unmounted on drop whatever happens.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {} (root needed)", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let done = Command::new("umount").arg(&self.0).status();
        if !done.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn r17_a_full_disk_while_rendering_exits_1_naming_the_file_and_keeps_the_old_one_whole() {
    let world = World::start(&[]);
    let config = world.config("");
    let dir = world.path("/etc/linkerd");
    let _tmpfs = Tmpfs::mount(&dir, "16k");
    let old = "# the linkerd.yaml of an earlier boot\nadmin:\n  port: 9990\n";
    std::fs::write(dir.join("linkerd.yaml"), old).unwrap();
    std::fs::set_permissions(
        dir.join("linkerd.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // Fill what is left.
    {
        use std::io::Write as _;
        let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
        let chunk = [0u8; 4096];
        while filler.write_all(&chunk).is_ok() {}
        let _ = filler.sync_all();
    }
    let t = Instant::now();
    let out = world.run_once(&config);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let path = dir.join("linkerd.yaml");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("No space left on device"),
        "names the file and why: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        old,
        "the old file intact"
    );
    assert_eq!(
        temp_files(world.root.path()),
        Vec::<PathBuf>::new(),
        "no temporary file left"
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["filler", "linkerd.yaml"]);
    assert_eq!(
        calls(&world, "ecs:StartTask"),
        0,
        "no task started on a half-rendered node"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(torn_files(world.root.path()), Vec::<String>::new());
}

// ---------------------------------------------------------------- 18. the clock stepped

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Debian's libfaketime, installed with apt-get when missing.
fn libfaketime() -> &'static str {
    if !Path::new(LIBFAKETIME).exists() {
        let install = || {
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "faketime",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            assert!(install(), "apt-get install faketime (libfaketime) failed");
        }
    }
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} after installing faketime"
    );
    LIBFAKETIME
}

/// The agent's wall clock: the timestamp of the first line it logs after byte `from` of its log
/// (with `nodeagent=debug` an ECS-runtime agent without Docker logs "runtime still
/// unavailable" at least every 5 s).
fn agent_clock(log: &Path, from: usize) -> Option<std::time::SystemTime> {
    let text = std::fs::read_to_string(log).ok()?;
    text.get(from..)?
        .lines()
        .find_map(|l| humantime::parse_rfc3339(l.split_whitespace().next()?).ok())
}

#[test]
fn r18_the_clock_stepped_an_hour_forward_and_back_changes_nothing() {
    let lib = libfaketime();
    let world = World::start(&["--asg", "g"]);
    let config = world.config("");
    conf_d(
        &world,
        "50-clock.toml",
        "[supervision]\nreconcile_interval = \"1s\"\n[lifecycle]\nunhealthy_after = \"2s\"\ndegraded_grace = \"2s\"\n",
    );
    let offset = world.root.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let mut agent = Agent::start_with(&world, crate::support::NO_DOCKER, &config, "agent", |cmd| {
        cmd.env("LD_PRELOAD", lib)
            .env("FAKETIME_TIMESTAMP_FILE", &offset)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("RUST_LOG", "nodeagent=debug");
    });
    wait_three_healthy(&world, Duration::from_secs(30));
    let arns = live_arns(&world);
    let watch = Watch::ecs(&world);
    for (step, hours) in [("+1h", 1i64), ("+0", 0), ("-1h", -1), ("+0", 0)] {
        std::fs::write(&offset, format!("{step}\n")).unwrap();
        let from = agent.log().len();
        let mut theirs = None;
        wait_for(Duration::from_secs(15), "a log line after the step", || {
            theirs = agent_clock(&agent.log, from);
            theirs.is_some()
        });
        let ours = std::time::SystemTime::now();
        let skew = match theirs.unwrap().duration_since(ours) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        assert!(
            (skew - hours * 3600).abs() <= 30,
            "the agent's clock is {step} ({skew} s off ours)"
        );
        std::thread::sleep(Duration::from_secs(3));
        let s = status(world.root.path()).expect("status answers");
        assert_eq!(s["healthy"], true, "{step}: {s}");
        for t in s["tasks"].as_array().unwrap() {
            assert_eq!(t["restarts"], 0, "{step}: {t}");
            assert_eq!(t["state"], "healthy", "{step}: {t}");
        }
        assert!(agent.alive(), "{}", agent.log());
    }
    assert_eq!(live_arns(&world), arns, "the same tasks");
    let st = stats(&world);
    let ops = &st["aws"]["by_operation"];
    assert_eq!(ops["ecs:StartTask"], 3, "{ops}");
    assert!(ops.get("ecs:StopTask").is_none(), "{ops}");
    assert!(ops.get("autoscaling:SetInstanceHealth").is_none(), "{ops}");
    assert_eq!(world.instance_health().as_deref(), Some("Healthy"));
    watch.assert_clean(20);
}

// ---------------------------------------------------------------- 19. two agents at once

#[test]
fn r19_two_agents_started_at_once_on_one_node_leave_exactly_one_running() {
    let world = World::start(&[]);
    let config = world.config("");
    let watch = Watch::ecs(&world);
    let mut a = ecs_agent(&world, &config, "a");
    let mut b = ecs_agent(&world, &config, "b");
    wait_for(Duration::from_secs(10), "one of them to exit", || {
        !a.alive() || !b.alive()
    });
    let (loser, winner) = if a.alive() {
        (&mut b, &mut a)
    } else {
        (&mut a, &mut b)
    };
    let code = loser.child.wait().unwrap().code();
    assert_eq!(code, Some(1), "{}", loser.log());
    wait_three_healthy(&world, Duration::from_secs(30));
    assert!(winner.alive());

    // A third one told another status socket is refused too: the lock is the node's.
    let other = world.root.path().join("other.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &other,
        format!("{text}\n[status]\nsocket = \"/run/nodeagent/other.sock\"\n"),
    )
    .unwrap();
    let mut third = ecs_agent(&world, &other, "third");
    wait_for(Duration::from_secs(10), "the third to exit", || {
        !third.alive()
    });
    assert_eq!(
        third.child.wait().unwrap().code(),
        Some(1),
        "{}",
        third.log()
    );
    for refused in [&*loser, &third] {
        assert!(
            refused
                .log()
                .contains("another nodeagent runs on this node"),
            "{}",
            refused.log()
        );
    }
    assert!(!world.path("/run/nodeagent/other.sock").exists());
    assert!(
        status(world.root.path()).is_some(),
        "the first still answers"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(calls(&world, "ecs:StartTask"), 3);
    assert!(three_once(&live_by_family(&world)));
    watch.assert_clean(5);
    assert_files_whole(world.root.path());
}

// ---------------------------------------------------------------- 20. a drain while a task restarts

#[test]
fn r20_a_drain_while_a_task_restarts_completes_and_starts_nothing_after_its_hold() {
    if !netns::enter(
        "r20_a_drain_while_a_task_restarts_completes_and_starts_nothing_after_its_hold",
    ) {
        return;
    }
    let node = Node::start(&[]);
    let mut agent = node.run("agent");
    wait_for(Duration::from_secs(60), "a healthy node", || node.healthy());
    let watch = Watch::docker(
        &node.engine.socket,
        &node.world.info.instance_id,
        node.world.root.path(),
    );
    // The engine's own record of every start and death, with its time.
    let events_log = node.path("/events.log");
    let mut events = Command::new("docker")
        .args([
            "-H",
            &node.engine.socket,
            "events",
            "--filter",
            "event=start",
            "--filter",
        ])
        .arg("event=die")
        .args(["--filter"])
        .arg(format!(
            "label=io.nodeagent.node={}",
            node.world.info.instance_id
        ))
        .args(["--format"])
        .arg("{{index .Actor.Attributes \"io.nodeagent.task\"}} {{.Action}} {{.TimeNano}}")
        .stdout(std::fs::File::create(&events_log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let linkerd = node.container("linkerd").unwrap();
    let mut drain = Command::new(env!("CARGO_BIN_EXE_nodeagent"));
    drain
        .args(["drain", "--timeout", "2s", "--root"])
        .arg(node.world.root.path())
        .stdout(Stdio::piped());
    node.world.wire(&mut drain);
    let t = Instant::now();
    let drain = drain.spawn().unwrap();
    node.engine.cli(&["kill", &linkerd]);
    let out = drain.wait_with_output().unwrap();
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("drained (requested)"),
        "{stdout}\n{}",
        agent.log()
    );
    assert!(took < Duration::from_secs(90), "{took:?}");
    let drained_at = std::time::SystemTime::now();
    // Held: nothing comes back, whatever the killed linkerd's restart was doing.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        node.containers(),
        Vec::<(String, String)>::new(),
        "nothing runs"
    );
    let _ = events.kill();
    let _ = events.wait();
    let text = std::fs::read_to_string(&events_log).unwrap();
    let drained_ns = drained_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[1] == "start" {
            let at: u128 = f[2].parse().unwrap();
            assert!(at < drained_ns, "a start after the drain: {line}\n{text}");
        }
    }
    println!("events:\n{text}\ndrain:\n{stdout}");
    // Every task's last event is its death.
    for task in ["consul-agent", "consul-registrator", "linkerd"] {
        let last = text
            .lines()
            .rfind(|l| l.starts_with(&format!("{task} ")))
            .unwrap_or_default();
        assert!(last.contains(" die "), "{task}: {last}\n{text}");
    }
    let s = node.status().unwrap();
    assert_eq!(s["phase"], "drained", "{s}");
    assert!(agent.alive(), "{}", agent.log());
    watch.assert_clean(10);
}
