//! Writing the rendered files: owns turning the templates into files on the host — every file
//! written atomically with the mode and owner asked (only changed files are written), the tasks'
//! directories created — for the boot, a rotated secret and `nodeagent render`; and the context
//! templates see.

use super::{ConsulContext, Context, EcsContext, RenderedFile, Renderer};
use crate::config::Settings;
use crate::facts::InstanceFacts;
use crate::hostfs::{blocked_ancestor, HostFs, Perms, Written};
use anyhow::{anyhow, Context as _};
use std::collections::BTreeMap;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

/// Renders every file and writes it atomically; creates the tasks' directories. User templates
/// are read from `templates`, the files and directories go to `fs` (the same host at boot; a
/// review directory for `nodeagent render`). The files returned describe what was written —
/// path, task, mode, checksum — without their contents (zeroed once written: a file may hold a
/// secret, and the boot's report and the rotation keep these for the agent's life).
pub fn render_files(
    settings: &Settings,
    facts: &InstanceFacts,
    servers: &[String],
    container_instance: Option<&str>,
    secrets: &BTreeMap<&str, &str>,
    templates: &dyn HostFs,
    fs: &dyn HostFs,
) -> anyhow::Result<Vec<RenderedFile>> {
    let read_template = |path: &str| read_text(templates, path);
    let renderer = Renderer::new(settings, &read_template)?;
    let ctx = context(settings, facts, servers, container_instance);
    let mut files = renderer.render(&ctx, secrets)?;
    for task in settings.enabled_tasks() {
        for dir in &settings.tasks[task.name].dirs {
            fs.create_dir_all(dir, TASK_DIRS)
                .with_context(|| format!("tasks.{}.dirs", task.name))?;
        }
    }
    for file in &mut files {
        let owner = match &file.owner {
            Some(spec) => Some(
                fs.resolve_owner(spec)
                    .with_context(|| format!("tasks.{}.files.{:?}.owner", file.task, file.path))?,
            ),
            None => None,
        };
        let perms = Perms {
            mode: file.mode,
            owner,
        };
        warn_unreachable(fs, file, perms)?;
        match fs.write_atomic(&file.path, file.contents.as_bytes(), perms)? {
            // The log line names the file and its checksum: never the contents, nor a secret.
            Written::Updated => {
                info!(path = %file.path, task = %file.task, sha256 = %file.sha256, "rendered {}", file.path)
            }
            Written::Unchanged => debug!(path = %file.path, "already up to date"),
        }
        file.contents = Zeroizing::new(String::new());
    }
    Ok(files)
}

/// Task directories: the task's image may chown them (Consul's entrypoint does), nodeagent
/// creates them for everyone to pass through.
const TASK_DIRS: Perms = Perms::mode(0o755);

/// A file meant for a container user (an owner, or readable by others) behind a directory that
/// user cannot pass through is a task that will fail to start: say so, naming the directory.
fn warn_unreachable(fs: &dyn HostFs, file: &RenderedFile, perms: Perms) -> anyhow::Result<()> {
    let reader = match perms.owner {
        Some(owner) => Some(owner),
        None if perms.mode & 0o004 != 0 => None,
        None => return Ok(()),
    };
    if let Some((dir, meta)) = blocked_ancestor(fs, &file.path, reader)? {
        let who = match reader {
            Some(o) => format!("uid {} (the file's owner)", o.uid),
            None => "a container user other than root".into(),
        };
        warn!(path = %file.path, task = %file.task, "{dir} is mode {:04o}, owner {}:{}: {who} cannot reach {} and {} will fail to read it; chmod o+x {dir} (nodeagent leaves existing directories as they are)", meta.mode, meta.uid, meta.gid, file.path, file.task);
    }
    Ok(())
}

/// A UTF-8 text file of the host (a user template).
pub fn read_text(fs: &dyn HostFs, path: &str) -> anyhow::Result<String> {
    let bytes = fs
        .read(path)?
        .ok_or_else(|| anyhow!("{path} does not exist"))?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{path} is not UTF-8 text"))
}

/// What templates (and health-check URLs) see.
pub fn context<'a>(
    settings: &'a Settings,
    facts: &'a InstanceFacts,
    servers: &'a [String],
    container_instance: Option<&'a str>,
) -> Context<'a> {
    Context {
        instance: facts,
        cluster: &settings.cluster,
        consul: ConsulContext {
            servers,
            datacenter: &settings.consul.datacenter,
            server_tag: &settings.consul.server_tag,
        },
        ecs: EcsContext {
            container_instance_arn: container_instance,
        },
        vars: &settings.vars,
    }
}
