//! The drain on a paused clock, its peers in memory: a spot notice's two minutes budget every
//! step, a long drain keeps the lifecycle hook alive, ECS's managed-draining hook is never
//! completed.

use super::*;
use crate::asg::AutoScaling;
use crate::consul::ConsulAgent;
use crate::ecs::{ContainerInstance, EcsTask};
use crate::runtime::{Instance, Runtime, RuntimeEvent};
use crate::supervisor::health::{Probe, Prober};
use crate::supervisor::{Supervisor, TaskSpec, Until};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use std::sync::Mutex;

/// Everything the drain asks, in order, with when.
#[derive(Default)]
struct Peers {
    log: Mutex<Vec<(Instant, String)>>,
    /// The application tasks never stop.
    stubborn_app: bool,
    heartbeat: Option<Duration>,
    /// These operations are throttled this many times before they answer.
    throttled: Mutex<std::collections::BTreeMap<&'static str, u32>>,
}

impl Peers {
    fn say(&self, what: impl Into<String>) {
        self.log.lock().unwrap().push((Instant::now(), what.into()));
    }
    fn said(&self) -> Vec<(Instant, String)> {
        self.log.lock().unwrap().clone()
    }
    /// Fails `op` as AWS throttles it, while it has throttles left.
    fn throttle(&self, op: &'static str) -> anyhow::Result<()> {
        let mut left = self.throttled.lock().unwrap();
        match left.get_mut(op).filter(|n| **n > 0) {
            Some(n) => {
                *n -= 1;
                self.say(format!("throttled {op}"));
                Err(crate::aws::AwsError {
                    op,
                    kind: crate::aws::FailureKind::Throttled,
                    code: Some("ThrottlingException".into()),
                    what: "the node".into(),
                    message: "Rate exceeded".into(),
                }
                .into())
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ContainerInstance for Peers {
    async fn set_draining(&self, _: &str, _: &str) -> anyhow::Result<()> {
        self.throttle("ecs:UpdateContainerInstancesState")?;
        self.say("DRAINING");
        Ok(())
    }
    async fn tasks_not_stopped(&self, _: &str, _: &str) -> anyhow::Result<Vec<EcsTask>> {
        self.throttle("ecs:ListTasks")?;
        Ok(if self.stubborn_app {
            vec![EcsTask {
                arn: "arn:app".into(),
                family: "app".into(),
                revision: Some(1),
                overridden: false,
                started_by: Some("ecs-svc/1".into()),
                last_status: "RUNNING".into(),
                desired_status: "STOPPED".into(),
                container_instance_arn: None,
            }]
        } else {
            Vec::new()
        })
    }
    async fn put_attribute(&self, _: &str, _: &str, _: &str, _: &str) -> anyhow::Result<()> {
        Ok(())
    }
    async fn delete_attribute(&self, _: &str, _: &str, _: &str, _: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

#[async_trait]
impl ConsulAgent for Peers {
    async fn maintenance(&self, _: bool, _: &str) -> anyhow::Result<()> {
        self.say("maintenance");
        Ok(())
    }
    async fn leave(&self) -> anyhow::Result<()> {
        self.say("leave");
        Ok(())
    }
}

#[async_trait]
impl AutoScaling for Peers {
    async fn group_of(&self, _: &str) -> anyhow::Result<Option<String>> {
        self.throttle("autoscaling:DescribeAutoScalingInstances")?;
        Ok(Some("g".into()))
    }
    async fn complete_lifecycle_action(&self, _: &str, hook: &str, _: &str) -> anyhow::Result<()> {
        self.throttle("autoscaling:CompleteLifecycleAction")?;
        self.say(format!("complete {hook}"));
        Ok(())
    }
    async fn record_heartbeat(&self, _: &str, hook: &str, _: &str) -> anyhow::Result<()> {
        self.throttle("autoscaling:RecordLifecycleActionHeartbeat")?;
        self.say(format!("heartbeat {hook}"));
        Ok(())
    }
    async fn heartbeat_timeout(&self, _: &str, _: &str) -> anyhow::Result<Option<Duration>> {
        Ok(self.heartbeat)
    }
    async fn set_unhealthy(&self, _: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A runtime whose tasks run until stopped.
#[derive(Default)]
struct Tasks(Mutex<Vec<Instance>>);

#[async_trait]
impl Runtime for Tasks {
    async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        Ok(self.0.lock().unwrap().clone())
    }
    async fn start(&self, task: &str) -> anyhow::Result<Instance> {
        let i = Instance {
            task: task.into(),
            id: format!("{task}-1"),
            running: true,
            exit: None,
        };
        self.0.lock().unwrap().push(i.clone());
        Ok(i)
    }
    async fn stop(&self, instance: &Instance) -> anyhow::Result<()> {
        self.0.lock().unwrap().retain(|i| i.id != instance.id);
        Ok(())
    }
    async fn output_tail(&self, _: &Instance, _: usize) -> anyhow::Result<String> {
        Ok(String::new())
    }
    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>> {
        Ok(Box::pin(futures_util::stream::pending()))
    }
}

struct Healthy;

#[async_trait]
impl Prober for Healthy {
    async fn check(&self, _: &str, _: &Probe, _: Duration) -> Result<(), String> {
        Ok(())
    }
}

fn spec(name: &str) -> TaskSpec {
    TaskSpec {
        name: name.into(),
        depends_on: Vec::new(),
        probe: None,
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        unhealthy_threshold: 3,
        restart_when_unhealthy: false,
        restart_with_dependencies: false,
    }
}

/// Runs a drain against `peers`: what they were asked, and the drain as it ended.
async fn drain(
    peers: Arc<Peers>,
    hook: Option<&str>,
    notice: Notice,
) -> (Vec<(Instant, String)>, DrainStatus) {
    let policy = crate::config::from_fragments(&[]).unwrap().supervision;
    let mut sup = Supervisor::new(
        Arc::new(Tasks::default()),
        Arc::new(Healthy),
        policy,
        vec![spec("consul-agent"), spec("linkerd")],
    );
    let control = sup.control();
    tokio::spawn(async move { sup.run(Until::Shutdown, std::future::pending()).await });
    let drain = Drain {
        cluster: "c".into(),
        container_instance: Some("arn:ci".into()),
        instance_id: "i-1".into(),
        started_by: "nodeagent/i-1".into(),
        ecs: peers.clone(),
        consul: peers.clone(),
        asg: peers.clone(),
        control,
        readiness: None,
        stop_order: vec!["linkerd".into(), "consul-agent".into()],
        consul_task: Some("consul-agent".into()),
        lifecycle_hook: hook.map(str::to_string),
        tasks_timeout: Duration::from_secs(300),
        step_timeout: Duration::from_secs(30),
    };
    tokio::time::sleep(Duration::from_secs(1)).await; // the tasks run
    let (progress, _seen) = watch::channel(None);
    drain.run(notice, &progress).await;
    let status = progress.borrow().clone().unwrap();
    assert!(status.done);
    (peers.said(), status)
}

/// A spot notice gives two minutes; the drain used to wait `drain_tasks_timeout` (5 min) for
/// the application tasks, and Consul never left before the instance was gone.
#[tokio::test(start_paused = true)]
async fn a_spot_notice_budgets_the_drain_so_consul_leaves_in_time() {
    let peers = Arc::new(Peers {
        stubborn_app: true,
        ..Peers::default()
    });
    let start = Instant::now();
    let notice = Notice {
        trigger: Trigger::SpotInterruption,
        gone_at: Some(SystemTime::now() + Duration::from_secs(120)),
    };
    let (said, _) = drain(peers, None, notice).await;
    let leave = said
        .iter()
        .find(|(_, w)| w == "leave")
        .expect("Consul left");
    let left_at = leave.0 - start;
    assert!(
        left_at <= Duration::from_secs(120) && left_at >= Duration::from_secs(80),
        "the application tasks got what could be spared, Consul left in time: {left_at:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_drain_keeps_the_hook_alive_and_completes_only_its_own_hook() {
    let peers = Arc::new(Peers {
        stubborn_app: true,
        heartbeat: Some(Duration::from_secs(60)),
        ..Peers::default()
    });
    let notice = Notice {
        trigger: Trigger::Terminated,
        gone_at: None,
    };
    let (said, _) = drain(peers, Some("scale-in"), notice).await;
    let words: Vec<&str> = said.iter().map(|(_, w)| w.as_str()).collect();
    let beats = words.iter().filter(|w| **w == "heartbeat scale-in").count();
    assert!(
        (9..=11).contains(&beats),
        "every 30 s of a 5-minute wait: {words:?}"
    );
    assert_eq!(words.last(), Some(&"complete scale-in"));

    // Managed draining: ECS's own hook is never nodeagent's to complete.
    let peers = Arc::new(Peers::default());
    let (said, _) = drain(peers, Some(MANAGED_DRAINING_HOOK), notice).await;
    let words: Vec<&str> = said.iter().map(|(_, w)| w.as_str()).collect();
    assert!(
        !words.iter().any(|w| w.starts_with("complete")),
        "{words:?}"
    );
    assert!(
        words.contains(&"leave"),
        "its own tasks stopped all the same: {words:?}"
    );
}

#[test]
fn the_budget_leaves_room_for_the_final_steps() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let now = Instant::now();
        let five = Duration::from_secs(300);
        assert_eq!(budget(five, None, FINAL_STEPS), five);
        let gone = Some(now + Duration::from_secs(120));
        assert_eq!(budget(five, gone, FINAL_STEPS), Duration::from_secs(90));
        assert_eq!(
            budget(Duration::from_secs(10), gone, FINAL_STEPS),
            Duration::from_secs(10)
        );
        let late = Some(now + Duration::from_secs(5));
        assert_eq!(
            budget(five, late, FINAL_STEPS),
            Duration::from_secs(1),
            "never zero"
        );
    });
}

/// A whole group scaling in is when AWS throttles: a throttled call of the drain is tried
/// again within its step's budget, never taken for the step's failure (one throttled look at
/// the application tasks used to end the wait, and Consul left while they still ran).
#[tokio::test(start_paused = true)]
async fn a_throttled_drain_call_is_retried_within_its_step() {
    let peers = Arc::new(Peers {
        heartbeat: Some(Duration::from_secs(60)),
        ..Peers::default()
    });
    peers.throttled.lock().unwrap().extend([
        ("ecs:UpdateContainerInstancesState", 3),
        ("ecs:ListTasks", 5),
        ("autoscaling:DescribeAutoScalingInstances", 2),
        ("autoscaling:CompleteLifecycleAction", 2),
    ]);
    let notice = Notice {
        trigger: Trigger::Terminated,
        gone_at: None,
    };
    let (said, status) = drain(peers, Some("scale-in"), notice).await;
    let words: Vec<&str> = said.iter().map(|(_, w)| w.as_str()).collect();
    let failed: Vec<&StepResult> = status.steps.iter().filter(|s| !s.ok).collect();
    assert!(failed.is_empty(), "{failed:?} {words:?}");
    assert_eq!(
        words.iter().filter(|w| w.starts_with("throttled")).count(),
        12,
        "{words:?}"
    );
    assert!(words.contains(&"DRAINING"), "{words:?}");
    assert_eq!(words.last(), Some(&"complete scale-in"));
}
