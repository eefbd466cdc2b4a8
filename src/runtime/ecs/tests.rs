//! The ECS runtime against an in-memory ECS that can be as unkind as a real region: lagging
//! `ListTasks`/`DescribeTasks` (eventual consistency), lost answers, throttling, ports held by
//! a copy that runs already.

use super::*;
use crate::aws::AwsError;
use crate::ecs::PlacementFailure;
use crate::hostfs::RootedFs;

/// An ECS that records calls. `lag`: a task started less than this ago is neither listed nor
/// described (ECS's eventual consistency); `refuse`: placement failures returned first;
/// `lose`: StartTask answers lost (the task is started all the same); `throttle`: calls
/// throttled first.
#[derive(Default)]
struct FakeEcs {
    tasks: Mutex<Vec<(EcsTask, Instant)>>,
    lag: Duration,
    refuse: Mutex<Vec<&'static str>>,
    lose: Mutex<u32>,
    throttle: Mutex<u32>,
    calls: Mutex<Vec<String>>,
    next: Mutex<u32>,
}

impl FakeEcs {
    fn call(&self, what: String) -> anyhow::Result<()> {
        self.calls.lock().unwrap().push(what.clone());
        let mut throttle = self.throttle.lock().unwrap();
        if *throttle > 0 {
            *throttle -= 1;
            return Err(AwsError {
                op: "ecs:ListTasks",
                kind: FailureKind::Throttled,
                code: Some("ThrottlingException".into()),
                what,
                message: "Rate exceeded".into(),
            }
            .into());
        }
        Ok(())
    }

    /// Tasks ECS shows (the lag hides the young ones).
    fn visible(&self) -> Vec<EcsTask> {
        self.tasks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| at.elapsed() >= self.lag)
            .map(|(t, _)| t.clone())
            .collect()
    }

    fn running(&self, family: &str) -> usize {
        self.tasks
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.family == family && t.desired_status == "RUNNING")
            .count()
    }

    fn starts(&self) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("StartTask"))
            .count()
    }
}

#[async_trait]
impl Ecs for FakeEcs {
    async fn list_running_tasks(&self, _: &str, _: &str) -> anyhow::Result<Vec<String>> {
        self.call("ListTasks".into())?;
        Ok(self
            .visible()
            .into_iter()
            .filter(|t| t.desired_status == "RUNNING")
            .map(|t| t.arn)
            .collect())
    }
    async fn running_tasks_of(
        &self,
        _: &str,
        _: &str,
        family: &str,
        by: &str,
    ) -> anyhow::Result<Vec<String>> {
        self.call(format!("ListTasks {family}"))?;
        Ok(self
            .visible()
            .into_iter()
            .filter(|t| {
                t.desired_status == "RUNNING"
                    && t.family == family
                    && t.started_by.as_deref() == Some(by)
            })
            .map(|t| t.arn)
            .collect())
    }
    async fn describe_tasks(&self, _: &str, arns: &[String]) -> anyhow::Result<Vec<EcsTask>> {
        self.call("DescribeTasks".into())?;
        Ok(self
            .visible()
            .into_iter()
            .filter(|t| arns.contains(&t.arn))
            .collect())
    }
    async fn stop_task(&self, _: &str, arn: &str, _: &str) -> anyhow::Result<()> {
        self.call("StopTask".into())?;
        for (t, _) in self
            .tasks
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|(t, _)| t.arn == arn)
        {
            t.desired_status = "STOPPED".into();
        }
        Ok(())
    }
    async fn start_task(
        &self,
        _: &str,
        family: &str,
        ci: &str,
        by: &str,
    ) -> anyhow::Result<StartOutcome> {
        self.call(format!("StartTask {family}"))?;
        if let Some(reason) = self.refuse.lock().unwrap().pop() {
            return Ok(StartOutcome::NotPlaced(vec![PlacementFailure {
                reason: reason.into(),
                detail: None,
            }]));
        }
        let n = {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            *next
        };
        let task = task(&format!("arn:task/{family}/{n}"), family, by, ci);
        self.tasks
            .lock()
            .unwrap()
            .push((task.clone(), Instant::now()));
        let mut lose = self.lose.lock().unwrap();
        if *lose > 0 {
            *lose -= 1;
            return Err(AwsError {
                op: "ecs:StartTask",
                kind: FailureKind::Lost,
                code: None,
                what: family.into(),
                message: "connection closed before message completed".into(),
            }
            .into());
        }
        Ok(StartOutcome::Started(task))
    }
}

fn task(arn: &str, family: &str, by: &str, ci: &str) -> EcsTask {
    EcsTask {
        arn: arn.into(),
        family: family.into(),
        revision: Some(1),
        overridden: false,
        started_by: Some(by.into()),
        last_status: "RUNNING".into(),
        desired_status: "RUNNING".into(),
        container_instance_arn: Some(ci.into()),
    }
}

fn context(ecs: Arc<FakeEcs>) -> Context {
    Context {
        ecs,
        agent: None,
        docker: None,
        fs: None,
        cluster: "c".into(),
        container_instance: "ci".into(),
        instance_id: "i-1".into(),
        tasks: [("consul-agent", "consul-agent"), ("linkerd", "linkerd")]
            .map(|(n, f)| (n.to_string(), f.to_string()))
            .to_vec(),
        start_timeout: Duration::from_secs(300),
    }
}

fn runtime(ecs: Arc<FakeEcs>, fs: Option<Arc<dyn HostFs>>) -> EcsRuntime {
    EcsRuntime::new(Context { fs, ..context(ecs) })
}

#[tokio::test(start_paused = true)]
async fn finds_ours_and_describes_each_task_once() {
    let ecs = Arc::new(FakeEcs::default());
    let now = Instant::now();
    ecs.tasks.lock().unwrap().extend([
        (task("arn:ours", "consul-agent", "nodeagent/i-1", "ci"), now),
        (task("arn:app", "hello-world", "ecs-svc/123", "ci"), now),
        (task("arn:old", "retired", "nodeagent/i-1", "ci"), now),
    ]);
    let rt = runtime(ecs.clone(), None);
    let found = rt.instances().await.unwrap();
    let mut names: Vec<&str> = found.iter().map(|i| i.task.as_str()).collect();
    names.sort();
    assert_eq!(names, ["consul-agent", "family:retired"]);
    rt.instances().await.unwrap();
    assert_eq!(
        *ecs.calls.lock().unwrap(),
        ["ListTasks", "DescribeTasks", "ListTasks"],
        "a steady state costs one call"
    );
}

/// ECS is eventually consistent: right after StartTask, ListTasks does not list the task and
/// DescribeTasks answers it MISSING. A reconcile then used to take it for gone and start a
/// second copy; now it is ours and starting until it shows.
#[tokio::test(start_paused = true)]
async fn a_task_that_listtasks_does_not_show_yet_is_not_taken_for_gone() {
    let ecs = Arc::new(FakeEcs {
        lag: Duration::from_secs(20),
        ..FakeEcs::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn HostFs> = Arc::new(RootedFs::new(dir.path()));
    let rt = runtime(ecs.clone(), Some(fs.clone()));
    let started = rt.start("linkerd").await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let found = rt.instances().await.unwrap();
        assert_eq!(
            found.iter().map(|i| &i.id).collect::<Vec<_>>(),
            [&started.id],
            "still ours"
        );
    }
    // An agent restarted meanwhile knows it from the record, before ECS lists it.
    let rt2 = runtime(ecs.clone(), Some(fs));
    let found = rt2.instances().await.unwrap();
    assert_eq!(
        found.iter().map(|i| &i.id).collect::<Vec<_>>(),
        [&started.id]
    );
    assert_eq!(ecs.starts(), 1);
    assert_eq!(ecs.running("linkerd"), 1, "never two copies");
}

#[tokio::test(start_paused = true)]
async fn a_start_whose_answer_was_lost_finds_the_task_instead_of_starting_another() {
    let ecs = Arc::new(FakeEcs::default());
    *ecs.lose.lock().unwrap() = 1;
    let rt = runtime(ecs.clone(), None);
    let started = rt.start("consul-agent").await.unwrap();
    assert_eq!(ecs.starts(), 1, "not started twice");
    assert_eq!(ecs.running("consul-agent"), 1);
    assert_eq!(started.id, "arn:task/consul-agent/1");
}

#[tokio::test(start_paused = true)]
async fn ports_held_by_a_copy_of_ours_adopt_that_copy() {
    let ecs = Arc::new(FakeEcs::default());
    ecs.tasks.lock().unwrap().push((
        task("arn:running", "linkerd", "nodeagent/i-1", "ci"),
        Instant::now(),
    ));
    ecs.refuse.lock().unwrap().push("RESOURCE:PORTS");
    let started = runtime(ecs.clone(), None).start("linkerd").await.unwrap();
    assert_eq!(
        started.id, "arn:running",
        "adopted at once, not retried for minutes"
    );
    assert_eq!(ecs.running("linkerd"), 1);
}

#[tokio::test(start_paused = true)]
async fn throttling_and_placement_failures_are_retried_until_the_start_timeout() {
    let ecs = Arc::new(FakeEcs::default());
    *ecs.throttle.lock().unwrap() = 10;
    ecs.refuse
        .lock()
        .unwrap()
        .extend(["RESOURCE:MEMORY", "RESOURCE:MEMORY"]);
    let started = runtime(ecs.clone(), None)
        .start("consul-agent")
        .await
        .unwrap();
    assert_eq!(started.id, "arn:task/consul-agent/1");
    assert_eq!(ecs.starts(), 13);

    let ecs = Arc::new(FakeEcs::default());
    ecs.refuse
        .lock()
        .unwrap()
        .extend(vec!["RESOURCE:MEMORY"; 10_000]);
    let begun = Instant::now();
    let err = runtime(ecs, None)
        .start("linkerd")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("RESOURCE:MEMORY") && err.contains("ecs.start_timeout"),
        "{err}"
    );
    assert!(begun.elapsed() <= Duration::from_secs(300));
}

/// `startedBy` is not proof: anyone with ecs:StartTask can claim it. A task of ours with
/// command/env overrides, or another revision than the one pinned, is not adopted.
#[tokio::test(start_paused = true)]
async fn a_task_claiming_our_started_by_with_overrides_is_not_ours() {
    let ecs = Arc::new(FakeEcs::default());
    let mut evil = task("arn:evil", "linkerd", "nodeagent/i-1", "ci");
    evil.overridden = true;
    let mut old = task("arn:old", "consul-agent", "nodeagent/i-1", "ci");
    old.revision = Some(2);
    ecs.tasks
        .lock()
        .unwrap()
        .extend([(evil, Instant::now()), (old, Instant::now())]);
    let rt = EcsRuntime::new(Context {
        tasks: vec![
            ("consul-agent".into(), "consul-agent:3".into()),
            ("linkerd".into(), "linkerd".into()),
        ],
        ..context(ecs)
    });
    let found = rt.instances().await.unwrap();
    let mut names: Vec<&str> = found.iter().map(|i| i.task.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "consul-agent (not ours: revision Some(2) of consul-agent, not the configured Some(3))",
            "linkerd (not ours: started with overrides nodeagent never makes)"
        ]
    );
}

/// A local agent that runs what it is given.
struct FakeAgent(Vec<crate::agent::AgentTask>);

#[async_trait]
impl EcsAgent for FakeAgent {
    async fn metadata(&self) -> anyhow::Result<crate::agent::AgentMetadata> {
        anyhow::bail!("not asked")
    }
    async fn tasks(&self) -> anyhow::Result<Vec<crate::agent::AgentTask>> {
        Ok(self.0.clone())
    }
    fn url(&self) -> &str {
        "http://agent"
    }
}

/// An agent killed while StartTask's answer was on its way leaves a task no record names, that
/// ECS neither lists nor describes yet: the local agent runs it, so the next agent counts it as
/// ours (starting) and starts no second copy; once ECS describes it, it is classified as usual.
#[tokio::test(start_paused = true)]
async fn a_task_only_the_local_agent_knows_is_not_started_again() {
    let ecs = Arc::new(FakeEcs {
        lag: Duration::from_secs(20),
        ..FakeEcs::default()
    });
    let arn = "arn:task/linkerd/orphan";
    ecs.tasks
        .lock()
        .unwrap()
        .push((task(arn, "linkerd", "nodeagent/i-1", "ci"), Instant::now()));
    let local = crate::agent::AgentTask {
        arn: arn.into(),
        family: "linkerd".into(),
        desired_status: "RUNNING".into(),
        known_status: "PENDING".into(),
    };
    let rt = EcsRuntime::new(Context {
        agent: Some(Arc::new(FakeAgent(vec![local]))),
        ..context(ecs.clone())
    });
    for _ in 0..6 {
        let found = rt.instances().await.unwrap();
        assert_eq!(
            found.iter().map(|i| (&*i.task, &*i.id)).collect::<Vec<_>>(),
            [("linkerd", arn)]
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(ecs.starts(), 0);
    let calls = ecs.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|c| *c == "DescribeTasks").count(),
        5,
        "described until ECS knew it (20 s), then remembered: {calls:?}"
    );
}
