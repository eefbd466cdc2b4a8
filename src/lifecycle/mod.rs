//! Lifecycle: owns the node's standing in its cluster beyond running its tasks — for now the
//! readiness gate ([`ready`]): application tasks must not land on the node before its
//! foundational tasks are healthy.

pub mod ready;
