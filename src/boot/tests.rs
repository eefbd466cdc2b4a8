//! The boot's waits on a paused clock: the Consul servers and the ECS agent from fakes that
//! come up when the test says, so minutes of waiting pass in milliseconds.

use super::*;
use crate::agent::AgentMetadata;
use crate::config::{from_fragments, Fragment};
use crate::hostfs::RootedFs;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A store no secret is asked of (the default configuration has none).
struct NoSecrets;

#[async_trait]
impl SecretStore for NoSecrets {
    async fn parameters(
        &self,
        _names: &[String],
    ) -> anyhow::Result<BTreeMap<String, crate::secrets::Fetched>> {
        anyhow::bail!("no parameter was configured")
    }
    async fn secret_value(&self, _id: &str) -> anyhow::Result<crate::secrets::Fetched> {
        anyhow::bail!("no secret was configured")
    }
}

/// Servers that appear at `servers_at` (clock time from the start); every call recorded.
struct Servers {
    start: Instant,
    servers_at: Option<Duration>,
    calls: Mutex<Vec<Instant>>,
    /// The first calls are throttled (AWS's RequestLimitExceeded).
    throttled: Mutex<u32>,
}

#[async_trait]
impl Ec2 for Servers {
    async fn running_private_ips(&self, _key: &str, _value: &str) -> anyhow::Result<Vec<String>> {
        self.calls.lock().unwrap().push(Instant::now());
        let mut throttled = self.throttled.lock().unwrap();
        if *throttled > 0 {
            *throttled -= 1;
            return Err(crate::aws::AwsError {
                op: "ec2:DescribeInstances",
                kind: crate::aws::FailureKind::Throttled,
                code: Some("RequestLimitExceeded".into()),
                what: String::new(),
                message: "Request limit exceeded.".into(),
            }
            .into());
        }
        let up = self.servers_at.is_some_and(|t| self.start.elapsed() >= t);
        Ok(if up {
            vec!["10.0.0.6".into(), "10.0.0.5".into(), "10.0.0.5".into()]
        } else {
            Vec::new()
        })
    }
    async fn instance_tags(
        &self,
        _: &str,
        _: &str,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        Ok(Some(Vec::new()))
    }
}

/// An ECS agent that answers from `up_at`, registered in `cluster`.
struct Agent {
    start: Instant,
    up_at: Option<Duration>,
    cluster: String,
    polls: Mutex<Vec<Instant>>,
}

#[async_trait]
impl EcsAgent for Agent {
    async fn metadata(&self) -> anyhow::Result<AgentMetadata> {
        self.polls.lock().unwrap().push(Instant::now());
        if self.up_at.is_none_or(|t| self.start.elapsed() < t) {
            anyhow::bail!("connection refused");
        }
        Ok(AgentMetadata {
            cluster: format!("arn:aws:ecs:us-east-1:1:cluster/{}", self.cluster),
            container_instance_arn: Some("arn:aws:ecs:us-east-1:1:container-instance/c/ci".into()),
            version: None,
        })
    }
    async fn tasks(&self) -> anyhow::Result<Vec<crate::agent::AgentTask>> {
        Ok(Vec::new())
    }
    fn url(&self) -> &str {
        "http://agent"
    }
}

#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl Progress for Seen {
    fn phase(&self, phase: Phase) {
        self.0.lock().unwrap().push(format!("phase {phase}"));
    }
    fn waiting(&self, on: &'static str, waited: Option<Duration>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{on}: {:?}", waited.map(|w| w.as_secs())));
    }
}

fn facts() -> InstanceFacts {
    InstanceFacts {
        instance_id: "i-0123456789abcdef0".into(),
        local_ipv4: "10.0.1.7".into(),
        region: "us-east-1".into(),
        availability_zone: "us-east-1a".into(),
        instance_type: "m5.large".into(),
        ami_id: "ami-1".into(),
    }
}

struct Run {
    result: anyhow::Result<BootReport>,
    took: Duration,
    servers: Servers,
    agent: Agent,
    seen: Seen,
    _root: tempfile::TempDir,
}

async fn boot(servers_at: Option<Duration>, agent_up_at: Option<Duration>, cluster: &str) -> Run {
    boot_throttled(servers_at, agent_up_at, cluster, 0).await
}

async fn boot_throttled(
    servers_at: Option<Duration>,
    agent_up_at: Option<Duration>,
    cluster: &str,
    throttled: u32,
) -> Run {
    let settings =
        from_fragments(&[Fragment::file("test", "[ecs]\nagent_timeout = \"5m\"\n")]).unwrap();
    let root = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(root.path());
    let start = Instant::now();
    let servers = Servers {
        start,
        servers_at,
        calls: Mutex::default(),
        throttled: Mutex::new(throttled),
    };
    let agent = Agent {
        start,
        up_at: agent_up_at,
        cluster: cluster.into(),
        polls: Mutex::default(),
    };
    let seen = Seen::default();
    let secrets = NoSecrets;
    let node = Node {
        fs: &fs,
        ec2: &servers,
        agent: &agent,
        secrets: &secrets,
    };
    let result = run(&settings, &facts(), &node, &seen).await;
    Run {
        result,
        took: start.elapsed(),
        servers,
        agent,
        seen,
        _root: root,
    }
}

#[tokio::test(start_paused = true)]
async fn servers_that_boot_later_and_a_late_agent_are_waited_for_together() {
    let r = boot(
        Some(Duration::from_secs(40)),
        Some(Duration::from_secs(25)),
        "l5d-demo",
    )
    .await;
    let report = r.result.unwrap();
    assert_eq!(
        report.consul_servers,
        ["10.0.0.5", "10.0.0.6"],
        "sorted, unique"
    );
    assert!(report.container_instance_arn.is_some());
    assert!(
        r.took >= Duration::from_secs(40) && r.took <= Duration::from_secs(50),
        "together, not one after the other: {:?}",
        r.took
    );
    let phases: Vec<Phase> = report.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [Phase::Join, Phase::Discover, Phase::Agent, Phase::Render]
    );
    // Polls: the EC2 calls back off with full jitter (at most 10 s apart), the agent is
    // polled every 50–100 ms (its readiness is noticed at once).
    let calls = r.servers.calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g <= crate::retry::WAIT_POLL.1),
        "{gaps:?}"
    );
    assert!(
        calls.len() < 20,
        "{} DescribeInstances in 40 s",
        calls.len()
    );
    let polls = r.agent.polls.lock().unwrap().clone();
    let last_gap = polls[polls.len() - 1] - polls[polls.len() - 2];
    assert!(last_gap <= Duration::from_millis(100), "{last_gap:?}");
    let seen = r.seen.0.lock().unwrap().clone();
    let counted = seen
        .iter()
        .filter_map(|l| l.strip_prefix("a Consul server: Some("))
        .filter_map(|n| n.trim_end_matches(')').parse::<u64>().ok())
        .max();
    assert!(counted >= Some(30), "a live count: {seen:?}");
    assert!(
        seen.contains(&"the ECS agent: None".to_string()),
        "the agent's wait ended: {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_server_within_the_discovery_timeout_is_an_error_naming_the_filter() {
    let r = boot(None, Some(Duration::ZERO), "l5d-demo").await;
    let err = format!("{:#}", r.result.unwrap_err());
    assert!(err.contains("no Consul server found within 600s"), "{err}");
    assert!(
        err.contains("tag:Name=l5d-demo-consul-server and instance-state-name=running"),
        "{err}"
    );
    assert!(
        r.took >= Duration::from_secs(600) && r.took < Duration::from_secs(606),
        "{:?}",
        r.took
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_registers_or_joined_another_cluster_is_an_error() {
    let r = boot(Some(Duration::ZERO), None, "l5d-demo").await;
    let err = format!("{:#}", r.result.unwrap_err());
    assert!(
        err.contains("did not report a container instance within 300s"),
        "{err}"
    );
    assert!(err.contains("ecs.agent_timeout"), "what to do: {err}");

    let r = boot(Some(Duration::ZERO), Some(Duration::ZERO), "other").await;
    let err = format!("{:#}", r.result.unwrap_err());
    assert!(
        err.contains("registered into cluster") && err.contains("\"l5d-demo\""),
        "{err}"
    );
}

/// A throttled DescribeInstances used to end the boot (exit 1, and systemd restarting every
/// 2 s: a thundering herd at scale-out). It is asked again, with jitter, until the deadline.
#[tokio::test(start_paused = true)]
async fn a_throttled_describe_instances_is_asked_again_not_fatal() {
    let r = boot_throttled(Some(Duration::ZERO), Some(Duration::ZERO), "l5d-demo", 10).await;
    let report = r.result.unwrap();
    assert_eq!(report.consul_servers.len(), 2);
    assert_eq!(r.servers.calls.lock().unwrap().len(), 11);

    let r = boot_throttled(
        Some(Duration::ZERO),
        Some(Duration::ZERO),
        "l5d-demo",
        u32::MAX,
    )
    .await;
    let err = format!("{:#}", r.result.unwrap_err());
    assert!(
        err.contains("no Consul server found within 600s") && err.contains("RequestLimitExceeded"),
        "{err}"
    );
}
