//! Retry pacing: owns the exponential backoffs nodeagent waits with — "equal jitter"
//! ([`Backoff`]: never short, for polling a peer and restarting a task) and "full jitter"
//! ([`FullJitter`]: for AWS calls, where a fleet of nodes shares one throttling bucket and
//! must not retry in lockstep) — the spread of periodic work ([`spread`]), and a boot's wait
//! for something that may not be there yet ([`wait_until`]).

use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;
use tracing::info;

/// A boot's wait tries again after a delay drawn from zero up to this range's doubling bound
/// (full jitter), from its first to its last value.
pub const WAIT_POLL: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));
/// While waiting on something outside, say so this often.
pub const WAIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Tries `attempt` until it succeeds or `deadline` passes, with full-jitter delays
/// ([`WAIT_POLL`], never past the deadline) between tries: how a boot waits for what may not
/// be there yet (the Consul servers, the secrets). `waiting` hears how long it has waited
/// (`None` once done); why it waits is logged every [`WAIT_LOG_EVERY`] as "waiting for
/// `what`: why". At the deadline: the last reason.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Instant,
    waiting: &(dyn Fn(Option<Duration>) + Sync),
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut backoff = FullJitter::new(WAIT_POLL.0, WAIT_POLL.1);
    let mut last_log: Option<Instant> = None;
    loop {
        let why = match attempt().await {
            Ok(done) => {
                waiting(None);
                return Ok(done);
            }
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            return Err(why);
        }
        waiting(Some(start.elapsed()));
        if last_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
            info!(
                waited_s = start.elapsed().as_secs(),
                "waiting for {what}: {why}"
            );
            last_log = Some(Instant::now());
        }
        tokio::time::sleep(backoff.next_delay().min(deadline - Instant::now())).await;
    }
}

/// Exponential backoff with "equal jitter": each delay is drawn from [d/2, d], where d doubles
/// from `initial` up to `cap`. Never zero, so a failing peer is never polled in a busy loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    step: u32,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Backoff {
            initial,
            cap,
            step: 0,
        }
    }

    /// The next delay to sleep.
    pub fn next_delay(&mut self) -> Duration {
        let d = exponential(self.initial, self.cap, self.step);
        self.step = self.step.saturating_add(1);
        jitter(d)
    }
}

/// Exponential backoff with "full jitter" (AWS Architecture Blog, "Exponential Backoff And
/// Jitter"): each delay is drawn from [0, d], where d doubles from `base` up to `cap` — the
/// spread that lets many clients sharing one rate limit back off without colliding again.
#[derive(Debug, Clone)]
pub struct FullJitter {
    base: Duration,
    cap: Duration,
    step: u32,
}

impl FullJitter {
    pub fn new(base: Duration, cap: Duration) -> Self {
        FullJitter { base, cap, step: 0 }
    }

    /// The next delay to sleep.
    pub fn next_delay(&mut self) -> Duration {
        let d = exponential(self.base, self.cap, self.step);
        self.step = self.step.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=d)
    }
}

/// `initial` doubled `step` times, at most `cap` (before jitter).
pub fn exponential(initial: Duration, cap: Duration, step: u32) -> Duration {
    initial.saturating_mul(1 << step.min(20)).min(cap)
}

/// A delay drawn uniformly from [d/2, d].
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// A period drawn uniformly from [d, 5d/4]: spread apart like [`jitter`]'s, but never shorter
/// than `d`, so something done "every d" is done at most once per d (the reconcile's listing:
/// an idle fleet's whole cost).
pub fn spread(d: Duration) -> Duration {
    d + rand::rng().random_range(Duration::ZERO..=d / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_period_is_never_shorter() {
        let d = Duration::from_secs(60);
        for _ in 0..1000 {
            let p = spread(d);
            assert!(p >= d && p <= d + d / 4, "{p:?}");
        }
    }

    #[test]
    fn delays_grow_to_the_cap_and_stay_in_range() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays[4..] {
            assert!(
                *d >= Duration::from_millis(500) && *d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
    }
}
