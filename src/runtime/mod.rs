//! Runtimes: own how the node's foundational tasks are made to run. Today: as ECS tasks on this
//! node's container instance ([`ecs`]).

pub mod ecs;
