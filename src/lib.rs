//! nodeagent: boots an Amazon ECS node's foundational tasks (Consul agent, proxy, registrator)
//! from EC2 instance metadata, replacing the user-data script that used to do it.
//!
//! Data flows one way: facts → config → render → runtime → supervisor → status, with the CLI
//! on top. The boundary modules (`imds`, `ec2`, `ecs`, `asg`, `agent`, `consul`, `docker`, `hostfs`, `systemd`)
//! each hide one external system behind a small trait and never import each other.

pub mod agent;
pub mod asg;
pub mod aws;
pub mod boot;
pub mod cli;
pub mod config;
pub mod consul;
pub mod daemon;
pub mod docker;
pub mod ec2;
pub mod ecs;
pub mod ecs_config;
pub mod facts;
pub mod hostfs;
pub mod http;
pub mod image;
pub mod imds;
pub mod lifecycle;
pub mod logging;
pub mod phase;
pub mod render;
pub mod retry;
pub mod runtime;
pub mod secrets;
pub mod status;
pub mod supervisor;
pub mod systemd;
