//! Retry pacing: owns the exponential backoffs nodeagent waits with — "equal jitter"
//! ([`Backoff`]: never short, for polling a peer and restarting a task) and "full jitter"
//! ([`FullJitter`]: for AWS calls, where a fleet of nodes shares one throttling bucket and
//! must not retry in lockstep) — and the spread of periodic work ([`spread`]).

use rand::Rng;
use std::time::Duration;

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
