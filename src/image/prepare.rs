//! `nodeagent prepare-image`, the last step of an AMI build: refuses while anything that would
//! write the identity again runs — nodeagent itself, the ECS agent, any container — or when it
//! cannot tell, then removes the instance identity ([`super::clean`]).

use crate::agent::{EcsAgent, HttpAgent};
use crate::config::Settings;
use crate::docker::{BollardDocker, Docker, EngineAbsent};
use crate::hostfs::RootedFs;
use crate::status::client;
use anyhow::bail;
use tracing::info;

/// Refuses or cleans; `removed` hears each removal. Returns how many there were.
pub async fn prepare_image(
    settings: &Settings,
    fs: &RootedFs,
    removed: &mut dyn FnMut(String),
) -> anyhow::Result<usize> {
    let socket = fs.resolve(&settings.status.socket);
    if client::fetch(&socket).await.is_ok() {
        bail!(
            "nodeagent runs (it answers on {}): stop it first (systemctl stop nodeagent), it records the instance again",
            socket.display()
        );
    }
    if settings.ecs.join {
        let agent = HttpAgent::new(&settings.ecs.introspection_url)?;
        let refused = |e: &anyhow::Error| {
            e.chain().any(|c| {
                c.downcast_ref::<reqwest::Error>()
                    .is_some_and(|r| r.is_connect())
            })
        };
        match agent.metadata().await {
            Err(e) if refused(&e) => {}
            Ok(_) | Err(_) => bail!(
                "the ECS agent answers at {}: stop it first (systemctl stop ecs), or its state is written again",
                agent.url()
            ),
        }
    }
    let containers = match BollardDocker::connect().await {
        Ok(docker) => docker.list(&[]).await,
        Err(e) => Err(e),
    };
    match containers {
        Err(e) if e.chain().any(|c| c.is::<EngineAbsent>()) => {
            info!("no Docker engine runs: no container either")
        }
        Err(e) => {
            return Err(e.context(
                "cannot tell whether containers run: stop docker.service, or fix the access to it",
            ))
        }
        Ok(containers) => {
            let running: Vec<String> = containers
                .into_iter()
                .filter(|c| c.running)
                .map(|c| c.id.chars().take(12).collect())
                .collect();
            if !running.is_empty() {
                bail!(
                    "{} containers run ({}): stop them first (docker stop), the image must not start them again",
                    running.len(),
                    running.join(", ")
                );
            }
        }
    }
    let mut count = 0;
    super::clean(settings, fs, &mut |path| {
        removed(path);
        count += 1;
    })?;
    Ok(count)
}
