//! The tasks as the supervisor is given them: their runtime (ECS tasks on this container
//! instance, or containers on the local engine), their specs in start order with their health
//! checks rendered from what the boot found, the real prober.

use super::node::Booted;
use crate::agent::HttpAgent;
use crate::aws::AwsCalls;
use crate::boot::BootReport;
use crate::config::RuntimeKind;
use crate::config::Settings;
use crate::docker::{BollardDocker, Docker};
use crate::ecs::SdkEcs;
use crate::facts::InstanceFacts;
use crate::hostfs::RootedFs;
use crate::render::render_value;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::ecs::{self, EcsRuntime};
use crate::runtime::Runtime;
use crate::supervisor::health::{NetProber, Probe};
use crate::supervisor::{Supervisor, TaskSpec};
use std::sync::Arc;
use tracing::warn;

/// The supervisor of the node's tasks, not yet running.
pub async fn supervisor(
    booted: &Booted,
    fs: &RootedFs,
    calls: &Arc<AwsCalls>,
) -> anyhow::Result<Supervisor> {
    let (settings, facts, report) = (&booted.settings, &booted.facts, &booted.report);
    let docker = BollardDocker::connect()
        .await
        .map(|d| Arc::new(d) as Arc<dyn Docker>);
    let runtime: Arc<dyn Runtime> = match settings.runtime {
        RuntimeKind::Docker => Arc::new(DockerRuntime::new(
            docker?,
            settings,
            &facts.instance_id,
            fs,
        )),
        RuntimeKind::Ecs => {
            let docker = docker
                .inspect_err(|e| warn!("no Docker engine ({e:#}): task deaths are found by the periodic reconcile only"))
                .ok();
            let tasks: Vec<(String, String)> = settings
                .enabled_tasks()
                .map(|t| (t.name.to_string(), t.family.to_string()))
                .collect();
            let agent = HttpAgent::new(&settings.ecs.introspection_url)?;
            Arc::new(EcsRuntime::new(ecs::Context {
                ecs: Arc::new(SdkEcs::new(&booted.sdk, calls.clone())),
                agent: Some(Arc::new(agent)),
                docker,
                fs: Some(Arc::new(fs.clone())),
                cluster: settings.cluster.clone(),
                container_instance: report.container_instance_arn.clone().unwrap_or_default(),
                instance_id: facts.instance_id.clone(),
                tasks,
                start_timeout: settings.ecs.start_timeout,
            }))
        }
    };
    Ok(Supervisor::new(
        runtime,
        Arc::new(NetProber::new()?),
        settings.supervision.clone(),
        task_specs(&booted.settings, &booted.facts, &booted.report)?,
    ))
}

/// The enabled tasks as the supervisor sees them, in start order, health checks rendered from
/// what the boot found.
pub fn task_specs(
    settings: &Settings,
    facts: &InstanceFacts,
    report: &BootReport,
) -> anyhow::Result<Vec<TaskSpec>> {
    let ctx = crate::render::context(
        settings,
        facts,
        &report.consul_servers,
        report.container_instance_arn.as_deref(),
    );
    let mut specs = Vec::new();
    for task in settings.start_levels().into_iter().flatten() {
        let config = &settings.tasks[task.name];
        let health = config.health.clone().unwrap_or_default();
        let probe = match (health.http(), health.tcp()) {
            (Some(url), _) => Some(Probe::Http(render_value(url, &ctx)?)),
            (None, Some(addr)) => Some(Probe::Tcp(render_value(addr, &ctx)?)),
            (None, None) => None,
        };
        specs.push(TaskSpec {
            name: task.name.to_string(),
            depends_on: task.depends_on.to_vec(),
            probe,
            interval: health.interval,
            timeout: health.timeout,
            unhealthy_threshold: health.unhealthy_threshold,
            restart_when_unhealthy: health.restart_when_unhealthy,
            restart_with_dependencies: config.restart_with_dependencies,
        });
    }
    Ok(specs)
}
