//! Runtimes: own how the node's foundational tasks are made to run. Today: as ECS tasks on this
//! node's container instance ([`ecs`]), or as containers through the Docker API ([`docker`]).

pub mod docker;
pub mod ecs;
