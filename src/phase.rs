//! Phases: owns the names of what the node is doing, from the first instance-metadata read to
//! the drain. The boot enters its phases, the daemon and the drain the later ones; status,
//! notify, metrics, logs and the journal all speak of them through [`Phase`], so a misspelt
//! phase is a compile error, not a silently missing `READY=1`.

use serde::{Deserialize, Serialize};

/// What the node is doing. Serialized as its [`Phase::as_str`] (the status document's
/// `phase`, `phases[].phase`, the `NODEAGENT_PHASE` journal field, the `phase` metric label).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Reading the instance facts and the configuration layers the instance carries.
    #[default]
    Imds,
    /// Writing ecs.config.
    Join,
    /// Looking for the Consul servers (while the ECS agent registers).
    Discover,
    /// Waiting for the ECS agent's container instance (timed beside `discover`).
    Agent,
    /// Writing the tasks' config files.
    Render,
    /// Running the tasks.
    Supervise,
    /// Taking the node out of service.
    Draining,
    /// Out of service; the tasks are stopped.
    Drained,
    /// The agent is exiting; the tasks keep running.
    Stopping,
}

impl Phase {
    /// The phase's name everywhere it is shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Imds => "imds",
            Phase::Join => "join",
            Phase::Discover => "discover",
            Phase::Agent => "agent",
            Phase::Render => "render",
            Phase::Supervise => "supervise",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
            Phase::Stopping => "stopping",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_names_are_the_shown_names() {
        for phase in [
            Phase::Imds,
            Phase::Join,
            Phase::Discover,
            Phase::Agent,
            Phase::Render,
            Phase::Supervise,
            Phase::Draining,
            Phase::Drained,
            Phase::Stopping,
        ] {
            let json = serde_json::to_string(&phase).unwrap();
            assert_eq!(json, format!("\"{phase}\""));
            assert_eq!(serde_json::from_str::<Phase>(&json).unwrap(), phase);
        }
    }
}
