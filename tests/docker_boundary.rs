//! The Docker boundary (`nodeagent::docker`) against real Docker engines: each test starts its
//! own private engine with `tests/world/dockerd.sh` (Debian's docker.io 20.10, API 1.41) and
//! stops it by PID when it ends. An engine that cannot be started fails the test loudly:
//! nothing here skips, and nothing is mocked.

use crate::support;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::CommitContainerOptions;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use nodeagent::docker::{BollardDocker, ContainerSpec, Docker, DockerEvent};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::docker::{free_port, Engine};

const LABEL: &str = "nodeagent.test";

fn labels(value: &str) -> (BTreeMap<String, String>, Vec<(String, String)>) {
    let map = BTreeMap::from([(LABEL.to_string(), value.to_string())]);
    let list = vec![(LABEL.to_string(), value.to_string())];
    (map, list)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The next `Died` event, within 10 s.
async fn next_death(events: &mut BoxStream<'static, anyhow::Result<DockerEvent>>) -> DockerEvent {
    wait_event(events, Duration::from_secs(10), |e| {
        matches!(e, DockerEvent::Died { .. })
    })
    .await
}

/// The next event satisfying `wanted`, within `limit`; panics with what came instead.
async fn wait_event(
    events: &mut BoxStream<'static, anyhow::Result<DockerEvent>>,
    limit: Duration,
    wanted: impl Fn(&DockerEvent) -> bool,
) -> DockerEvent {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(event))) if wanted(&event) => return event,
            Ok(Some(Ok(event))) => seen.push(event),
            Ok(Some(Err(e))) => panic!("event stream failed: {e:#} (seen: {seen:?})"),
            Ok(None) => panic!("event stream ended (seen: {seen:?})"),
            Err(_) => panic!("no wanted event within {limit:?} (seen: {seen:?})"),
        }
    }
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[tokio::test]
async fn runs_lists_inspects_follows_and_removes_a_server() {
    let engine = Engine::start();
    let docker = engine.client().await;
    docker.ping().await.expect("ping");

    let (label_map, label_list) = labels("httpd");
    let port = free_port();
    let mut events = docker.events(&label_list);
    let spec = ContainerSpec {
        image: engine.image.clone(),
        command: vec![
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            format!("127.0.0.1:{port}"),
            "-h".into(),
            "/var/www".into(),
        ],
        labels: label_map.clone(),
        ..Default::default()
    };
    let id = docker.run(&spec).await.expect("run httpd");
    assert_eq!(
        wait_event(&mut events, Duration::from_secs(10), |_| true).await,
        DockerEvent::Started { id: id.clone() }
    );

    // Found by its label, and only by its label.
    let listed = docker.list(&label_list).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let info = &listed[0];
    assert_eq!(info.id, id);
    assert!(info.running);
    assert_eq!(info.exit_code, None);
    assert_eq!(info.labels.get(LABEL).map(String::as_str), Some("httpd"));
    assert!(
        info.started_at.is_some() && info.finished_at.is_none(),
        "{info:?}"
    );
    assert!(docker
        .list(&[(LABEL.to_string(), "other".to_string())])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(docker.inspect(&id).await.unwrap().as_ref(), Some(info));

    // Host network: the server answers on the host's loopback.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match http_get(port) {
            Ok(answer) => break answer,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("httpd on 127.0.0.1:{port} does not answer: {e}"),
        }
    };
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    assert!(
        answer.contains("nodeagent-test busybox httpd ok"),
        "{answer}"
    );

    // Killed behind our back: the stream says so, with the exit code.
    engine
        .raw()
        .kill_container(&id, None)
        .await
        .expect("docker kill");
    assert_eq!(
        wait_event(&mut events, Duration::from_secs(10), |_| true).await,
        DockerEvent::Died {
            id: id.clone(),
            exit_code: Some(137)
        }
    );
    let info = docker.inspect(&id).await.unwrap().expect("still there");
    assert!(!info.running);
    assert_eq!(info.exit_code, Some(137));
    assert!(info.finished_at.is_some());

    docker
        .stop_and_remove(&id, Duration::from_secs(5))
        .await
        .expect("stop_and_remove");
    assert_eq!(docker.inspect(&id).await.unwrap(), None);
    assert_eq!(
        wait_event(&mut events, Duration::from_secs(10), |_| true).await,
        DockerEvent::Destroyed { id: id.clone() }
    );
    // Gone is fine.
    docker
        .stop_and_remove(&id, Duration::from_secs(5))
        .await
        .expect("stop_and_remove of a missing container");
    assert!(docker.list(&label_list).await.unwrap().is_empty());
}

#[tokio::test]
async fn stop_is_graceful_thanks_to_init() {
    let engine = Engine::start();
    let docker = engine.client().await;
    let (label_map, label_list) = labels("sleeper");
    let spec = ContainerSpec {
        image: engine.image.clone(),
        // As PID 1 without init, sleep would ignore SIGTERM and cost the whole grace period.
        command: strings(&["sleep", "600"]),
        labels: label_map,
        ..Default::default()
    };
    let id = docker.run(&spec).await.expect("run sleep");
    let mut events = docker.events(&label_list);
    let started = Instant::now();
    docker
        .stop_and_remove(&id, Duration::from_secs(20))
        .await
        .expect("stop_and_remove");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    // SIGTERM reached sleep through init: 143 = 128 + SIGTERM.
    assert_eq!(
        next_death(&mut events).await,
        DockerEvent::Died {
            id: id.clone(),
            exit_code: Some(143)
        }
    );
    assert_eq!(docker.inspect(&id).await.unwrap(), None);
}

#[tokio::test]
async fn reports_exit_code_and_logs_of_a_failing_command() {
    let engine = Engine::start();
    let docker = engine.client().await;
    let (label_map, label_list) = labels("failing");
    let mut events = docker.events(&label_list);
    let spec = ContainerSpec {
        image: engine.image.clone(),
        command: strings(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
        labels: label_map,
        ..Default::default()
    };
    let id = docker.run(&spec).await.expect("run sh");
    assert_eq!(
        next_death(&mut events).await,
        DockerEvent::Died {
            id: id.clone(),
            exit_code: Some(3)
        }
    );
    let info = docker.inspect(&id).await.unwrap().expect("inspect");
    assert!(!info.running);
    assert_eq!(info.exit_code, Some(3));
    assert!(!info.oom_killed);
    assert!(
        info.started_at.is_some() && info.finished_at.is_some(),
        "{info:?}"
    );
    assert_eq!(docker.list(&label_list).await.unwrap(), vec![info]);

    let logs = docker.logs_tail(&id, 10).await.expect("logs");
    assert!(logs.contains("hello") && logs.contains("oops"), "{logs:?}");
    let last = docker.logs_tail(&id, 1).await.expect("logs");
    assert_eq!(last.lines().count(), 1, "{last:?}");

    docker
        .stop_and_remove(&id, Duration::ZERO)
        .await
        .expect("remove");
    assert_eq!(docker.inspect(&id).await.unwrap(), None);
    let err = docker.logs_tail(&id, 10).await.unwrap_err();
    eprintln!("logs of a removed container: {err:#}");
    assert!(format!("{err:#}").contains(&id), "{err:#}");
}

#[tokio::test]
async fn a_missing_image_is_an_error_naming_it() {
    let engine = Engine::start();
    let docker = engine.client().await;
    let (label_map, label_list) = labels("missing");
    let spec = ContainerSpec {
        image: "nodeagent-test/not-here:7".into(),
        labels: label_map,
        ..Default::default()
    };
    let err = docker.run(&spec).await.unwrap_err();
    let message = format!("{err:#}");
    eprintln!("missing image: {message}");
    assert!(message.contains("nodeagent-test/not-here:7"), "{message}");
    assert!(
        message.contains("docker pull nodeagent-test/not-here:7"),
        "{message}"
    );
    assert!(message.contains("docker load"), "{message}");
    // Nothing was pulled or left behind.
    assert!(docker.list(&label_list).await.unwrap().is_empty());
    assert!(engine
        .raw()
        .inspect_image("nodeagent-test/not-here:7")
        .await
        .is_err());
}

#[tokio::test]
async fn host_config_memory_env_binds_and_entrypoint() {
    let engine = Engine::start();
    let docker = engine.client().await;
    let raw = engine.raw();

    // An image whose entrypoint fails, to see `entrypoint: Some(vec![])` reset it.
    let base = raw
        .create_container(
            None,
            ContainerCreateBody {
                image: Some(engine.image.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("create a base container");
    raw.commit_container(
        CommitContainerOptions {
            container: Some(base.id.clone()),
            repo: Some("nodeagent-test/entrypoint-false".into()),
            tag: Some("1".into()),
            changes: Some(r#"ENTRYPOINT ["/bin/false"]"#.into()),
            ..Default::default()
        },
        bollard::models::ContainerConfig::default(),
    )
    .await
    .expect("commit an image with an entrypoint");
    let image = "nodeagent-test/entrypoint-false:1".to_string();

    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("x"), "from the host\n").unwrap();
    let (label_map, label_list) = labels("config");
    let mut events = docker.events(&label_list);
    let spec = ContainerSpec {
        image: image.clone(),
        command: strings(&["sh", "-c", "echo FOO=$FOO; cat /data/x; touch /data/y"]),
        entrypoint: Some(vec![]),
        env: BTreeMap::from([("FOO".into(), "bar baz".into())]),
        binds: vec![format!("{}:/data:ro", data.path().display())],
        memory_bytes: Some(64 << 20),
        labels: label_map.clone(),
    };
    let id = docker.run(&spec).await.expect("run");
    let died = next_death(&mut events).await;
    // `touch` fails on the read-only bind, so the shell exits 1.
    assert_eq!(
        died,
        DockerEvent::Died {
            id: id.clone(),
            exit_code: Some(1)
        }
    );
    let logs = docker.logs_tail(&id, 10).await.unwrap();
    assert!(logs.contains("FOO=bar baz"), "{logs:?}");
    assert!(logs.contains("from the host"), "{logs:?}");
    assert!(!data.path().join("y").exists());

    let inspected = raw.inspect_container(&id, None).await.unwrap();
    let host = inspected.host_config.expect("HostConfig");
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.network_mode.as_deref(), Some("host"));
    assert_eq!(host.init, Some(true));
    let restart = host
        .restart_policy
        .and_then(|p| p.name)
        .map(|n| n.to_string());
    assert_eq!(restart.as_deref(), Some("no"));
    let config = inspected.config.expect("Config");
    // The engine keeps the reset as an empty list.
    assert_eq!(config.entrypoint.unwrap_or_default(), Vec::<String>::new());
    docker.stop_and_remove(&id, Duration::ZERO).await.unwrap();

    // Without the reset, the image's entrypoint runs (with the command as its arguments).
    let id = docker
        .run(&ContainerSpec {
            entrypoint: None,
            command: strings(&["ignored"]),
            ..spec.clone()
        })
        .await
        .expect("run with the image's entrypoint");
    assert_eq!(
        wait_event(&mut events, Duration::from_secs(10), |e| matches!(
            e,
            DockerEvent::Died { id: d, .. } if *d == id
        ))
        .await,
        DockerEvent::Died {
            id: id.clone(),
            exit_code: Some(1)
        }
    );
    let config = raw
        .inspect_container(&id, None)
        .await
        .unwrap()
        .config
        .unwrap();
    assert_eq!(config.entrypoint, Some(strings(&["/bin/false"])));
    docker.stop_and_remove(&id, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn connects_while_the_engine_is_down_and_reports_it_going_away() {
    let mut engine = Engine::stopped();
    // Nothing listens yet: connecting still works, calls fail naming the socket.
    let docker = BollardDocker::connect_to(&engine.socket)
        .await
        .expect("connect while the engine is down");
    let err = docker.ping().await.unwrap_err();
    eprintln!("engine down: {err:#}");
    assert!(
        format!("{err:#}").contains(&format!("{}/docker.sock", engine.path().display())),
        "{err:#}"
    );
    let mut early = docker.events(&[]);
    match tokio::time::timeout(Duration::from_secs(15), early.next()).await {
        Ok(Some(Err(_))) => {}
        other => panic!("events without an engine: {other:?}"),
    }
    assert!(early.next().await.is_none(), "nothing after the error");

    // The engine comes up: the same client works.
    engine.up();
    docker.ping().await.expect("ping once the engine is up");
    assert!(docker.list(&[]).await.unwrap().is_empty());

    // The engine goes away: the stream ends (or fails, then ends).
    let mut events = docker.events(&[]);
    let (label_map, _) = labels("doomed");
    docker
        .run(&ContainerSpec {
            image: engine.image.clone(),
            command: strings(&["sleep", "600"]),
            labels: label_map,
            ..Default::default()
        })
        .await
        .expect("run");
    assert!(matches!(
        wait_event(&mut events, Duration::from_secs(10), |_| true).await,
        DockerEvent::Started { .. }
    ));
    engine.down();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(_))) => {} // the container dying with the engine
            Ok(Some(Err(e))) => {
                eprintln!("stream failed as the engine went away: {e:#}");
                assert!(events.next().await.is_none(), "nothing after the error");
                break;
            }
            Ok(None) => break,
            Err(_) => panic!("the event stream outlived the engine by 30 s"),
        }
    }
    assert!(docker.ping().await.is_err());
}
