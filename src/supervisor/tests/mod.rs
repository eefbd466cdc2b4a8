//! The supervision rules on a paused clock: an in-memory runtime and prober, tokio's test clock
//! advancing only when every task waits, so minutes of backoff and crash-loop windows pass in
//! milliseconds.

mod fake;

use super::health::Probe;
use super::*;
use fake::{Fake, Health};

fn policy() -> Supervision {
    crate::config::from_fragments(&[])
        .expect("defaults")
        .supervision
}

fn spec(name: &str, depends_on: &[&str], checked: bool) -> TaskSpec {
    TaskSpec {
        name: name.into(),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
        probe: checked.then(|| Probe::Tcp(format!("{name}:1"))),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        unhealthy_threshold: 3,
        restart_when_unhealthy: false,
        restart_with_dependencies: false,
    }
}

/// The guide's three tasks: consul-agent (checked), then linkerd (checked) and registrator.
fn three() -> Vec<TaskSpec> {
    vec![
        spec("consul-agent", &[], true),
        spec("consul-registrator", &["consul-agent"], false),
        spec("linkerd", &["consul-agent"], true),
    ]
}

struct Running {
    fake: Arc<Fake>,
    health: Arc<Health>,
    tasks: watch::Receiver<Vec<TaskStatus>>,
    control: Control,
    liveness: Liveness,
    _loop: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn supervise(
    fake: Arc<Fake>,
    health: Arc<Health>,
    policy: Supervision,
    specs: Vec<TaskSpec>,
) -> Running {
    let mut sup = Supervisor::new(fake.clone(), health.clone(), policy, specs);
    let (tasks, control, liveness) = (sup.watch(), sup.control(), sup.liveness());
    let run = tokio::spawn(async move { sup.run(Until::Shutdown, std::future::pending()).await });
    Running {
        fake,
        health,
        tasks,
        control,
        liveness,
        _loop: run,
    }
}

impl Running {
    fn task(&self, name: &str) -> TaskStatus {
        self.tasks
            .borrow()
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .unwrap()
    }

    /// Waits (on the paused clock: instantly) until `cond` holds for the tasks; `limit` of
    /// clock time at most.
    async fn until(&mut self, limit: Duration, what: &str, cond: impl Fn(&[TaskStatus]) -> bool) {
        let tasks = &mut self.tasks;
        let waited = tokio::time::timeout(limit, async {
            loop {
                if cond(&tasks.borrow_and_update()) {
                    return;
                }
                tasks.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{what} did not happen within {limit:?}: {:#?}",
            self.tasks.borrow()
        );
    }

    async fn state(&mut self, task: &str, state: State) {
        let what = format!("{task} {}", state.as_str());
        self.until(Duration::from_secs(3600), &what, |ts| {
            ts.iter().any(|t| t.name == task && t.state == state)
        })
        .await;
    }

    async fn all_healthy(&mut self) {
        self.until(Duration::from_secs(600), "every task healthy", |ts| {
            ts.iter().all(|t| t.state == State::Healthy)
        })
        .await;
    }
}

fn fresh() -> (Arc<Fake>, Arc<Health>) {
    (Arc::new(Fake::default()), Arc::new(Health::default()))
}

#[tokio::test(start_paused = true)]
async fn dependents_start_only_once_their_dependency_is_healthy() {
    let (fake, health) = fresh();
    health.set("consul-agent", false);
    let mut r = supervise(fake, health, policy(), three());
    r.state("consul-agent", State::Starting).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(r.fake.starts_of("consul-agent").len(), 1);
    assert!(
        r.fake.starts_of("linkerd").is_empty(),
        "linkerd waits for consul-agent"
    );
    assert!(r.fake.starts_of("consul-registrator").is_empty());
    r.health.set("consul-agent", true);
    r.all_healthy().await;
    let consul_healthy = r.fake.starts_of("consul-agent")[0] + Duration::from_secs(120);
    assert!(r.fake.starts_of("linkerd")[0] >= consul_healthy);
    assert!(r.fake.starts_of("consul-registrator")[0] >= consul_healthy);
}

#[tokio::test(start_paused = true)]
async fn the_backoff_grows_to_its_cap_and_resets_after_a_healthy_run() {
    let (fake, health) = fresh();
    let mut p = policy();
    p.crash_loop_restarts = 100; // backoff alone here
    let mut r = supervise(fake, health, p.clone(), vec![spec("linkerd", &[], false)]);
    r.all_healthy().await;
    for n in 1..=8 {
        r.fake.kill("linkerd", 1);
        r.until(Duration::from_secs(60), "a restart", |ts| {
            ts[0].restarts == n && ts[0].instance.is_some()
        })
        .await;
    }
    let starts = r.fake.starts_of("linkerd");
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps[0],
        Duration::ZERO,
        "the first restart after a healthy run is immediate"
    );
    // Then 0.5 s, 1 s, 2 s, … jittered into [d/2, d], capped at backoff_max (30 s).
    for (i, gap) in gaps.iter().enumerate().skip(1) {
        let d = crate::retry::exponential(p.backoff_initial, p.backoff_max, i as u32 - 1);
        assert!(
            *gap >= d / 2 && *gap <= d,
            "restart {i}: {gap:?} not in [{:?}, {d:?}]",
            d / 2
        );
    }
    // Healthy for backoff_reset_after: the next death restarts at once again.
    tokio::time::sleep(p.backoff_reset_after + Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    r.fake.kill("linkerd", 1);
    r.until(Duration::from_secs(60), "a restart", |ts| {
        ts[0].restarts == 9 && ts[0].instance.is_some()
    })
    .await;
    assert_eq!(
        r.fake.starts_of("linkerd")[9],
        killed_at,
        "reset: at once again"
    );
}

#[tokio::test(start_paused = true)]
async fn restarts_within_the_window_make_a_crash_loop_that_ages_out() {
    let (fake, health) = fresh();
    let p = policy(); // 5 restarts within 5 min
    let mut r = supervise(fake, health, p.clone(), vec![spec("linkerd", &[], false)]);
    r.all_healthy().await;
    for n in 1..=5 {
        r.fake.kill("linkerd", 3);
        r.until(Duration::from_secs(120), "a restart", |ts| {
            ts[0].restarts == n && ts[0].instance.is_some()
        })
        .await;
    }
    r.state("linkerd", State::CrashLoop).await;
    let t = r.task("linkerd");
    assert_eq!(t.last_exit.as_ref().and_then(|e| e.code), Some(3));
    r.until(Duration::from_secs(5), "its last output", |ts| {
        ts[0]
            .last_output
            .as_deref()
            .is_some_and(|o| o.starts_with("the last words of linkerd-"))
    })
    .await;
    // Running since: once its restarts are older than the window, a reconcile says healthy.
    r.state("linkerd", State::Healthy).await;
    let out_at = Instant::now();
    let first_restart = r.fake.starts_of("linkerd")[1];
    assert!(
        out_at - first_restart >= p.crash_loop_window,
        "{:?}",
        out_at - first_restart
    );
}

/// The three tasks healthy, linkerd asking to go with consul-agent; linkerd's and
/// registrator's instances.
async fn linkerd_restarts_with_its_dependency() -> (Running, Option<String>, Option<String>) {
    let (fake, health) = fresh();
    let mut specs = three();
    specs[2].restart_with_dependencies = true; // linkerd
    let mut r = supervise(fake, health, policy(), specs);
    r.all_healthy().await;
    let (linkerd, registrator) = (
        r.task("linkerd").instance,
        r.task("consul-registrator").instance,
    );
    (r, linkerd, registrator)
}

#[tokio::test(start_paused = true)]
async fn a_dependent_that_asks_is_restarted_with_its_dependency() {
    let (mut r, linkerd, registrator) = linkerd_restarts_with_its_dependency().await;
    r.health.set("consul-agent", false);
    r.fake.kill("consul-agent", 1);
    r.state("linkerd", State::Restarting).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        r.fake.starts_of("linkerd").len(),
        1,
        "not before consul-agent is healthy again"
    );
    r.health.set("consul-agent", true);
    r.all_healthy().await;
    assert_ne!(r.task("linkerd").instance, linkerd, "linkerd went with it");
    assert_eq!(
        r.task("consul-registrator").instance,
        registrator,
        "registrator did not ask"
    );
    assert!(r.fake.with(|s| s.stops.contains(linkerd.as_ref().unwrap())));
}

#[tokio::test(start_paused = true)]
async fn a_restart_on_request_takes_the_dependents_that_ask_with_it() {
    let (mut r, linkerd, registrator) = linkerd_restarts_with_its_dependency().await;
    r.control
        .restart("consul-agent", "secret rotated")
        .await
        .unwrap();
    r.until(Duration::from_secs(60), "linkerd replaced", |ts| {
        ts.iter()
            .any(|t| t.name == "linkerd" && t.state == State::Healthy && t.instance != linkerd)
    })
    .await;
    r.all_healthy().await;
    assert_eq!(r.fake.starts_of("linkerd").len(), 2, "linkerd went with it");
    assert_eq!(
        r.task("consul-registrator").instance,
        registrator,
        "registrator did not ask"
    );
}

#[tokio::test(start_paused = true)]
async fn a_held_task_stays_stopped_and_a_suspended_one_is_not_restarted() {
    let (fake, health) = fresh();
    let mut r = supervise(fake, health, policy(), three());
    r.all_healthy().await;
    r.control.hold("linkerd").await.unwrap();
    assert!(r.fake.running_ids("linkerd").is_empty());
    assert_eq!(r.task("linkerd").state, State::Stopped);
    r.control.suspend("consul-agent").await.unwrap();
    r.fake.kill("consul-agent", 0); // it left the cluster and exited, as asked
    r.state("consul-agent", State::Stopped).await;
    tokio::time::sleep(Duration::from_secs(3600)).await; // reconciles come and go
    assert_eq!(r.fake.starts_of("linkerd").len(), 1);
    assert_eq!(r.fake.starts_of("consul-agent").len(), 1);
    assert_eq!(r.task("linkerd").state, State::Stopped);
    assert!(r.control.hold("nonesuch").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn running_instances_are_adopted_and_duplicates_and_strays_stopped() {
    let (fake, health) = fresh();
    fake.running("consul-agent", "consul-old");
    fake.running("consul-agent", "consul-twin");
    fake.running("retired", "retired-1");
    let mut r = supervise(
        fake,
        health,
        policy(),
        vec![spec("consul-agent", &[], true)],
    );
    r.all_healthy().await;
    let t = r.task("consul-agent");
    assert!(t.adopted);
    assert!(
        r.fake.starts_of("consul-agent").is_empty(),
        "nothing started"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stops = r.fake.with(|s| s.stops.clone());
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(
        stops.contains(&"retired-1".to_string()),
        "a task no longer configured"
    );
    let kept = t.instance.unwrap();
    let twin = if kept == "consul-old" {
        "consul-twin"
    } else {
        "consul-old"
    };
    assert!(stops.contains(&twin.to_string()), "the duplicate");
}

/// After an agent restart the first listing may fail (AWS throttles, the engine is not up):
/// starting anyway would start a second copy of what runs. Nothing starts until a listing
/// succeeds; it is retried soon (backoff), not at the next reconcile interval.
#[tokio::test(start_paused = true)]
async fn nothing_starts_before_the_first_listing_and_what_runs_is_adopted() {
    let (fake, health) = fresh();
    fake.running("consul-agent", "consul-old");
    fake.with(|s| s.failing_lists = 4);
    let mut r = supervise(
        fake,
        health,
        policy(),
        vec![spec("consul-agent", &[], true)],
    );
    r.all_healthy().await;
    assert!(r.task("consul-agent").adopted);
    assert!(
        r.fake.starts_of("consul-agent").is_empty(),
        "no second copy"
    );
    let lists = r.fake.with(|s| s.lists.clone());
    let first_ok = lists.iter().find(|(_, ok)| *ok).unwrap().0;
    assert_eq!(
        lists.iter().take_while(|(_, ok)| !ok).count(),
        4,
        "{lists:?}"
    );
    assert!(
        first_ok - lists[0].0 < policy().reconcile_interval,
        "retried sooner than the reconcile interval: {lists:?}"
    );
}

/// An idle node is listed at most once per `reconcile_interval` (the fleet's steady state: one
/// `ListTasks` a minute per node at most); jittered, never sooner than the interval.
#[tokio::test(start_paused = true)]
async fn an_idle_node_is_listed_at_most_once_per_reconcile_interval() {
    let (fake, health) = fresh();
    let mut r = supervise(fake, health, policy(), three());
    r.all_healthy().await;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let lists: Vec<Instant> = r.fake.with(|s| s.lists.iter().map(|(at, _)| *at).collect());
    let gaps: Vec<Duration> = lists.windows(2).map(|w| w[1] - w[0]).collect();
    let interval = policy().reconcile_interval;
    assert!(
        gaps.iter().all(|g| *g >= interval),
        "every gap at least {interval:?}: {gaps:?}"
    );
    let in_the_hour = lists.iter().filter(|at| **at >= start).count();
    assert!(
        (48..=60).contains(&in_the_hour),
        "{in_the_hour} listings in an hour"
    );
}

#[tokio::test(start_paused = true)]
async fn an_exit_reported_before_its_start_is_claimed_when_the_start_lands() {
    let (fake, health) = fresh();
    fake.with(|s| s.dies_at_start.insert("linkerd".into()));
    let mut r = supervise(fake, health, policy(), vec![spec("linkerd", &[], false)]);
    r.until(Duration::from_secs(60), "the death noticed", |ts| {
        ts[0].restarts == 1
    })
    .await;
    r.all_healthy().await;
    assert_eq!(r.fake.starts_of("linkerd").len(), 2, "started again");
    assert_eq!(r.task("linkerd").last_exit.unwrap().code, Some(7));
}

#[tokio::test(start_paused = true)]
async fn a_stop_that_hangs_blocks_neither_the_loop_nor_the_watchdog() {
    let (fake, health) = fresh();
    fake.running("retired", "stuck");
    fake.with(|s| s.hanging_stops.insert("stuck".into()));
    let mut r = supervise(fake, health, policy(), vec![spec("linkerd", &[], false)]);
    r.all_healthy().await;
    // Reconciles come (every minute) while the stop still hangs: it is not asked again.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        r.liveness.responsive(Duration::from_millis(100)).await,
        "the loop answers"
    );
    r.fake.kill("linkerd", 1);
    r.until(Duration::from_secs(60), "linkerd restarted", |ts| {
        ts[0].restarts == 1 && ts[0].state == State::Healthy
    })
    .await;
    let stops = r
        .fake
        .with(|s| s.stops.iter().filter(|id| *id == "stuck").count());
    assert_eq!(stops, 1, "one stop of the stray, still under way");
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_task_is_reported_and_restarted_only_when_asked() {
    let (fake, health) = fresh();
    let mut specs = vec![spec("consul-agent", &[], true), spec("linkerd", &[], true)];
    specs[1].restart_when_unhealthy = true;
    let mut r = supervise(fake, health, policy(), specs);
    r.all_healthy().await;
    r.health.set("consul-agent", false);
    r.health.set("linkerd", false);
    r.state("consul-agent", State::Unhealthy).await;
    r.until(Duration::from_secs(120), "linkerd restarted", |ts| {
        ts[1].restarts == 1
    })
    .await;
    assert_eq!(r.fake.starts_of("consul-agent").len(), 1, "reported only");
    assert!(r
        .task("linkerd")
        .last_exit
        .unwrap()
        .reason
        .starts_with("unhealthy: "));
    r.health.set("linkerd", true);
    r.state("linkerd", State::Healthy).await;
}

#[tokio::test(start_paused = true)]
async fn a_start_that_fails_is_retried_with_backoff() {
    let (fake, health) = fresh();
    fake.with(|s| s.failing_starts.insert("linkerd".into(), 3));
    let mut r = supervise(fake, health, policy(), vec![spec("linkerd", &[], false)]);
    r.all_healthy().await;
    let starts = r.fake.starts_of("linkerd");
    assert_eq!(starts.len(), 4);
    assert!(
        starts.windows(2).all(|w| w[1] > w[0]),
        "never in a busy loop: {starts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn until_all_started_returns_once_every_task_runs_and_fails_on_a_start_error() {
    let (fake, health) = fresh();
    let mut sup = Supervisor::new(fake.clone(), health.clone(), policy(), three());
    // A check that never passes: dependents never start, so this would never return…
    health.set("consul-agent", false);
    let done = tokio::time::timeout(
        Duration::from_secs(600),
        sup.run(Until::AllStarted, std::future::pending()),
    )
    .await;
    assert!(
        done.is_err(),
        "dependents wait for a healthy dependency even at bootstrap"
    );

    let (fake, health) = fresh();
    fake.with(|s| s.failing_starts.insert("consul-agent".into(), 1));
    let mut sup = Supervisor::new(fake, health, policy(), three());
    let err = sup
        .run(Until::AllStarted, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("starting task consul-agent"),
        "{err:#}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restart_on_request_replaces_only_that_task_outside_the_crash_loop_counters() {
    let (fake, health) = fresh();
    let mut r = supervise(fake, health, policy(), three());
    r.all_healthy().await;
    let before = r.task("consul-agent").instance.unwrap();
    // More restarts than a crash loop allows: each asked for, none a failure.
    for _ in 0..6 {
        r.control
            .restart("consul-agent", "secret rotated")
            .await
            .unwrap();
        r.until(Duration::from_secs(60), "consul-agent back", |ts| {
            ts.iter().any(|t| {
                t.name == "consul-agent"
                    && t.state == State::Healthy
                    && t.instance.as_deref() != Some(before.as_str())
            })
        })
        .await;
        r.all_healthy().await;
    }
    assert_eq!(r.fake.starts_of("consul-agent").len(), 7);
    assert_eq!(r.fake.starts_of("linkerd").len(), 1, "the others untouched");
    assert_eq!(r.fake.starts_of("consul-registrator").len(), 1);
    let consul = r.task("consul-agent");
    assert_eq!(consul.restarts, 6);
    assert_eq!(consul.state, State::Healthy, "no crash-loop");
    assert_eq!(
        r.fake.running_ids("consul-agent").len(),
        1,
        "the old one stopped"
    );
    let err = r.control.signal("linkerd", "SIGHUP").await.unwrap_err();
    assert!(format!("{err:#}").contains("cannot send SIGHUP"), "{err:#}");
}
