//! Lifecycle: owns the node's standing in its cluster beyond running its tasks — the
//! readiness gate ([`ready`]: application tasks must not land before the foundational tasks
//! are healthy), the ordered drain ([`drain`]), self-healing ([`heal`]) and the secrets'
//! rotation ([`rotate`]).

pub mod drain;
pub mod heal;
pub mod ready;
pub mod rotate;

/// Sleeps until `at`; forever when there is nothing to wake for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
