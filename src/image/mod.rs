//! Image identity: owns what a disk must not carry from the instance it was built on into an
//! AMI, and the first-boot guard for a disk that does.
//!
//! Instance identity is: the ECS agent's state (`/var/lib/ecs/data`: its container-instance
//! registration), every task directory (`tasks.*.dirs`: the Consul agent's data dir with its
//! `node-id`, …), every rendered file, nodeagent's own state (`/var/lib/nodeagent`), and
//! nodeagent's keys in ecs.config (`ECS_CLUSTER`, …; other lines stay).
//!
//! nodeagent records the instance it runs on in `/var/lib/nodeagent/instance-id`. A disk whose
//! record — or whose ECS agent state — names another instance was baked without
//! `nodeagent prepare-image`: the prepare phase cleans it before ecs.service starts, so the ECS
//! agent registers a new container instance instead of impersonating the old one.

mod prepare;

pub use prepare::prepare_image;

use crate::config::trust::under;
use crate::config::Settings;
use crate::ecs_config;
use crate::hostfs::{HostFs, Perms};
use anyhow::{anyhow, bail, Context};
use tracing::{info, warn};

/// The ECS agent's state directory (checkpoint, boltdb).
pub const ECS_DATA_DIR: &str = "/var/lib/ecs/data";
/// nodeagent's state directory.
pub const STATE_DIR: &str = "/var/lib/nodeagent";
/// The instance this disk last ran on.
pub const INSTANCE_RECORD: &str = "/var/lib/nodeagent/instance-id";

/// Removes the instance identity; `removed` hears each removal as it happens (host paths;
/// `ecs.config: KEYS`), so a failure part-way still says what is gone.
///
/// Directories are emptied, not removed: the ECS agent's state directory belongs to its
/// package, nodeagent's to systemd (`StateDirectory=`, a bind mount inside the sandbox), and a
/// task directory may be a mount point or owned by the task's image user (Consul's data dir is
/// uid 100's: emptying it needs CAP_DAC_OVERRIDE, which the prepare unit has).
pub fn clean(
    settings: &Settings,
    fs: &dyn HostFs,
    removed: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    let mut dirs = vec![ECS_DATA_DIR.to_string(), STATE_DIR.to_string()];
    let mut files: Vec<String> = Vec::new();
    for task in settings.enabled_tasks() {
        let config = &settings.tasks[task.name];
        dirs.extend(config.dirs.iter().cloned());
        files.extend(config.files.keys().cloned());
    }
    dirs.sort();
    dirs.dedup();
    files.sort();
    files.dedup();
    // Validation confines every task path to trust.paths already; this removes nothing outside
    // them even from settings that were never validated.
    let confined = |path: &str| {
        [ECS_DATA_DIR, STATE_DIR].contains(&path)
            || settings.trust.paths.iter().any(|p| under(path, p))
    };
    if let Some(outside) = dirs.iter().chain(&files).find(|p| !confined(p)) {
        bail!(
            "refusing to remove {outside}: it is outside trust.paths ({})",
            settings.trust.paths.join(", ")
        );
    }
    for dir in dirs {
        for name in fs.empty(&dir)? {
            removed(format!("{dir}/{name}"));
        }
    }
    for path in files {
        if fs.remove(&path)? {
            removed(path);
        }
    }
    let config_path = &settings.ecs.config_path;
    if let Some(bytes) = fs.read(config_path)? {
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow!("{config_path} is not UTF-8 text; fix or remove it"))?;
        let keys: Vec<String> = settings
            .ecs_config_lines()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let cleaned = ecs_config::without(&text, &keys);
        if cleaned != text {
            ecs_config::write(fs, config_path, &cleaned)?;
            removed(format!("{config_path}: {}", keys.join(", ")));
        }
    }
    Ok(())
}

/// Another instance this disk carries the identity of: its record, else an instance id in the
/// ECS agent's state. `None` for a clean disk or this instance's own.
pub fn baked_from(fs: &dyn HostFs, instance_id: &str) -> anyhow::Result<Option<String>> {
    if let Some(bytes) = fs.read(INSTANCE_RECORD)? {
        let recorded = String::from_utf8_lossy(&bytes).trim().to_string();
        return Ok((!recorded.is_empty() && recorded != instance_id).then_some(recorded));
    }
    // No record (an older or foreign image): the ECS agent's state says whose it is. Both its
    // JSON checkpoint and its boltdb store the id as JSON.
    for name in fs.list(ECS_DATA_DIR)? {
        // Files only (the agent keeps a `metadata/` directory there); an unreadable one is
        // not evidence.
        let Ok(Some(bytes)) = fs.read(&format!("{ECS_DATA_DIR}/{name}")) else {
            continue;
        };
        if let Some(other) = ec2_instance_id(&bytes).filter(|id| id != instance_id) {
            return Ok(Some(other));
        }
    }
    Ok(None)
}

/// The prepare phase's guard: cleans the identity of another instance, then records this one.
pub fn guard(settings: &Settings, fs: &dyn HostFs, instance_id: &str) -> anyhow::Result<()> {
    if let Some(other) = baked_from(fs, instance_id)? {
        warn!(
            baked_from = %other,
            instance_id = %instance_id,
            "this disk carries the identity of instance {other} (an AMI built without `nodeagent prepare-image`): removing it before the ECS agent starts"
        );
        clean(
            settings,
            fs,
            &mut |path| info!(path = %path, "removed {path}"),
        )?;
    }
    record(fs, instance_id)
}

/// Records that this disk now runs as `instance_id`.
pub fn record(fs: &dyn HostFs, instance_id: &str) -> anyhow::Result<()> {
    fs.create_dir_all(STATE_DIR, Perms::mode(0o755))?;
    fs.write_atomic(
        INSTANCE_RECORD,
        format!("{instance_id}\n").as_bytes(),
        Perms::mode(0o644),
    )
    .with_context(|| format!("recording the instance in {INSTANCE_RECORD}"))?;
    Ok(())
}

/// The instance id the ECS agent's state names: `"EC2InstanceID":"i-…"` in its JSON
/// checkpoint (`ecs_agent_data.json`), or the `ec2-instance-id` key followed by its JSON value
/// `"i-…"` in its bolt store (`agent.db`).
fn ec2_instance_id(bytes: &[u8]) -> Option<String> {
    let find = |needle: &[u8]| bytes.windows(needle.len()).position(|w| w == needle);
    let after = if let Some(at) = find(b"\"EC2InstanceID\":") {
        at + b"\"EC2InstanceID\":".len()
    } else {
        find(b"ec2-instance-id")? + b"ec2-instance-id".len()
    };
    // The value is the next JSON string starting "i-", close by.
    let window = &bytes[after..bytes.len().min(after + 64)];
    let start = window.windows(3).position(|w| w == b"\"i-")? + 1;
    let rest = &window[start..];
    let end = rest.iter().position(|b| *b == b'"')?;
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    let valid = id.len() > 2 && id[2..].chars().all(|c| c.is_ascii_hexdigit());
    valid.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostfs::RootedFs;

    #[test]
    fn finds_the_instance_in_the_agent_state() {
        let state =
            br#"{"Data":{"Cluster":"c","EC2InstanceID":"i-0abc","ContainerInstanceArn":"x"}}"#;
        assert_eq!(ec2_instance_id(state).as_deref(), Some("i-0abc"));
        assert_eq!(ec2_instance_id(b"{}"), None);
        let bolt = b"\x00\x02ec2-instance-id\x00\x13\"i-0123456789abcdef0\"\x00more";
        assert_eq!(
            ec2_instance_id(bolt).as_deref(),
            Some("i-0123456789abcdef0")
        );
    }

    #[test]
    fn the_record_decides_and_a_clean_disk_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RootedFs::new(dir.path());
        assert_eq!(baked_from(&fs, "i-1").unwrap(), None);
        fs.write_atomic(
            "/var/lib/ecs/data/ecs_agent_data.json",
            br#"{"Data":{"EC2InstanceID":"i-0a1d"}}"#,
            Perms::mode(0o600),
        )
        .unwrap();
        assert_eq!(baked_from(&fs, "i-1").unwrap().as_deref(), Some("i-0a1d"));
        fs.create_dir_all("/var/lib/ecs/data/metadata", Perms::mode(0o755))
            .unwrap();
        assert_eq!(
            baked_from(&fs, "i-1").unwrap().as_deref(),
            Some("i-0a1d"),
            "a directory in the agent's state is no obstacle"
        );
        fs.write_atomic(INSTANCE_RECORD, b"i-1\n", Perms::mode(0o644))
            .unwrap();
        assert_eq!(baked_from(&fs, "i-1").unwrap(), None, "the record wins");
    }

    #[test]
    fn clean_removes_nothing_outside_trust_paths_even_unvalidated() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RootedFs::new(dir.path());
        fs.write_atomic(
            "/etc/passwd",
            b"root:x:0:0::/root:/bin/sh\n",
            Perms::mode(0o644),
        )
        .unwrap();
        let mut settings = crate::config::from_fragments(&[]).unwrap();
        let task = settings.tasks.values_mut().next().unwrap();
        task.dirs.push("/etc".into());
        let mut removed = Vec::new();
        let err = clean(&settings, &fs, &mut |p| removed.push(p)).unwrap_err();
        assert!(
            err.to_string()
                .contains("refusing to remove /etc: it is outside trust.paths"),
            "{err}"
        );
        assert!(removed.is_empty(), "{removed:?}");
        assert!(dir.path().join("etc/passwd").exists());
    }
}
