//! Docker runtime: owns running the tasks as containers through the local Docker engine, with no
//! ECS involved (laptops, nodes that must not depend on the ECS control plane, the local main
//! job). Each container carries two labels — the node's instance id and the task's name — which
//! is how instances are found again after nodeagent restarts, and how containers of other nodes
//! sharing an engine (tests) are left alone. nodeagent, not Docker's restart policy, restarts
//! them.

use super::{Exit, Instance, Runtime, RuntimeEvent};
use crate::config::{Container, Settings};
use crate::docker::{ContainerInfo, ContainerSpec, Docker, DockerEvent, Made};
use crate::hostfs::RootedFs;
use anyhow::Context;
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Label holding the instance id of the node whose nodeagent owns the container.
pub const LABEL_NODE: &str = "io.nodeagent.node";
/// Label holding the task's name.
pub const LABEL_TASK: &str = "io.nodeagent.task";

pub struct DockerRuntime {
    docker: Arc<dyn Docker>,
    node: String,
    specs: BTreeMap<String, ContainerSpec>,
    stop_grace: Duration,
}

impl DockerRuntime {
    /// The containers of every enabled task; bind-mount host paths are placed under `fs`'s root.
    pub fn new(docker: Arc<dyn Docker>, settings: &Settings, node: &str, fs: &RootedFs) -> Self {
        let specs = settings
            .enabled_tasks()
            .map(|t| {
                let spec = container_spec(&settings.tasks[t.name].container, t.name, node, fs);
                (t.name.to_string(), spec)
            })
            .collect();
        DockerRuntime {
            docker,
            node: node.to_string(),
            specs,
            stop_grace: settings.supervision.stop_grace,
        }
    }

    fn ours(&self) -> Vec<(String, String)> {
        vec![(LABEL_NODE.to_string(), self.node.clone())]
    }
}

fn container_spec(c: &Container, task: &str, node: &str, fs: &RootedFs) -> ContainerSpec {
    let binds = c
        .mounts
        .iter()
        .map(|m| match m.split_once(':') {
            Some((host, rest)) => format!("{}:{rest}", fs.resolve(host).display()),
            None => m.clone(),
        })
        .collect();
    ContainerSpec {
        image: c.image.clone(),
        command: c.command.clone(),
        entrypoint: c.entrypoint.clone(),
        env: c.env.clone(),
        binds,
        memory_bytes: c.memory_mb.map(|mb| (mb * 1024 * 1024) as i64),
        labels: BTreeMap::from([
            (LABEL_NODE.to_string(), node.to_string()),
            (LABEL_TASK.to_string(), task.to_string()),
        ]),
    }
}

/// Whether a container carrying a task's labels was made as nodeagent makes that task's: the
/// same image, command, entrypoint, environment and mounts. Anyone with the Docker socket can
/// put our labels on a container; one that differs is not adopted but stopped and reported.
fn made_as(spec: &ContainerSpec, made: &Made) -> Result<(), String> {
    if made.image != spec.image {
        return Err(format!("image {} instead of {}", made.image, spec.image));
    }
    if !spec.command.is_empty() && made.command != spec.command {
        return Err(format!(
            "command {:?} instead of {:?}",
            made.command, spec.command
        ));
    }
    if let Some(entrypoint) = &spec.entrypoint {
        if &made.entrypoint != entrypoint {
            return Err(format!(
                "entrypoint {:?} instead of {entrypoint:?}",
                made.entrypoint
            ));
        }
    }
    for (k, v) in &spec.env {
        if !made.env.contains(&format!("{k}={v}")) {
            return Err(format!("environment without {k} as configured"));
        }
    }
    let (mut ours, mut theirs) = (spec.binds.clone(), made.binds.clone());
    ours.sort();
    theirs.sort();
    if ours != theirs {
        return Err(format!("mounts {theirs:?} instead of {ours:?}"));
    }
    Ok(())
}

fn instance(info: ContainerInfo) -> Instance {
    let exit = (!info.running).then(|| Exit {
        code: info.exit_code,
        reason: if info.oom_killed {
            "out of memory".into()
        } else {
            "exited".into()
        },
    });
    Instance {
        task: info.labels.get(LABEL_TASK).cloned().unwrap_or_default(),
        id: info.id,
        running: info.running,
        exit,
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        let mut found = Vec::new();
        for info in self.docker.list(&self.ours()).await? {
            let made = info.made.clone();
            let mut inst = instance(info);
            if let Some(spec) = self.specs.get(&inst.task) {
                if let Err(why) = made_as(spec, &made) {
                    // Claims our labels, was not made by us: reported, then stopped as a
                    // task that is not configured.
                    warn!(task = %inst.task, id = %inst.id, "{}: container {} carries this node's labels but was not made by nodeagent ({why}): not adopted", inst.task, inst.id);
                    inst.task = format!("{} (not ours: {why})", inst.task);
                }
            }
            found.push(inst);
        }
        Ok(found)
    }

    async fn start(&self, task: &str) -> anyhow::Result<Instance> {
        let spec = self
            .specs
            .get(task)
            .with_context(|| format!("no container configured for task {task}"))?;
        let id = self.docker.run(spec).await?;
        Ok(Instance {
            task: task.to_string(),
            id,
            running: true,
            exit: None,
        })
    }

    async fn stop(&self, instance: &Instance) -> anyhow::Result<()> {
        self.docker
            .stop_and_remove(&instance.id, self.stop_grace)
            .await
    }

    async fn output_tail(&self, instance: &Instance, lines: usize) -> anyhow::Result<String> {
        self.docker.logs_tail(&instance.id, lines).await
    }

    async fn signal(&self, instance: &Instance, signal: &str) -> anyhow::Result<()> {
        self.docker.kill(&instance.id, signal).await
    }

    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>> {
        self.docker.ping().await?;
        let stream = self
            .docker
            .events(&self.ours())
            .filter_map(|event| async move {
                match event {
                    Ok(DockerEvent::Died { id, exit_code }) => Some(Ok(RuntimeEvent::Exited {
                        id,
                        exit: Exit {
                            code: exit_code,
                            reason: "died".into(),
                        },
                    })),
                    Ok(DockerEvent::Destroyed { id }) => Some(Ok(RuntimeEvent::Exited {
                        id,
                        exit: Exit {
                            code: None,
                            reason: "removed".into(),
                        },
                    })),
                    Ok(DockerEvent::Started { .. } | DockerEvent::Oom { .. }) => None,
                    Err(e) => Some(Err(e)),
                }
            });
        Ok(stream.boxed())
    }
}
