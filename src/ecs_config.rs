//! ecs.config: owns how nodeagent edits the ECS agent's environment file.
//!
//! The file is rewritten whole (and, for an image, without nodeagent's keys): each managed key appears exactly once (in place of its first
//! occurrence, duplicates dropped, missing keys appended), every other line — comments, keys
//! someone else manages — is kept as it was. Merging the result again changes nothing.
//!
//! The file can hold credentials (`ECS_ENGINE_AUTH_DATA`): a rewrite keeps the mode and owner
//! the operator gave it; a new file is 0600 when a key looks secret, else 0644.

use crate::config::looks_secret;
use crate::hostfs::{HostFs, Perms, Written};
use std::collections::BTreeSet;

/// Writes `text` as ecs.config at `path` (atomically), keeping the existing file's mode and
/// owner.
pub fn write(fs: &dyn HostFs, path: &str, text: &str) -> std::io::Result<Written> {
    let perms = match fs.metadata(path)? {
        Some(m) if !m.is_symlink && !m.is_dir => Perms {
            mode: m.mode,
            owner: Some(m.owner()),
        },
        _ if text.lines().filter_map(key_of).any(looks_secret) => Perms::mode(0o600),
        _ => Perms::mode(0o644),
    };
    fs.write_atomic(path, text.as_bytes(), perms)
}

/// The new content of ecs.config given its current content and the managed `KEY=VALUE` pairs.
pub fn merge(existing: &str, managed: &[(String, String)]) -> String {
    let value_of = |key: &str| managed.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let mut written: BTreeSet<&str> = BTreeSet::new();
    let mut lines: Vec<String> = Vec::new();
    for line in existing.lines() {
        match key_of(line).and_then(|k| value_of(k).map(|v| (k, v))) {
            Some((key, value)) => {
                if written.insert(key) {
                    lines.push(format!("{key}={value}"));
                }
            }
            None => lines.push(line.to_string()),
        }
    }
    for (key, value) in managed {
        if !written.contains(key.as_str()) {
            lines.push(format!("{key}={value}"));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// The content of ecs.config without the lines of `keys` (every other line kept as it was).
pub fn without(existing: &str, keys: &[String]) -> String {
    let lines: Vec<&str> = existing
        .lines()
        .filter(|l| key_of(l).is_none_or(|k| !keys.iter().any(|m| m == k)))
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// The key of a `KEY=VALUE` line (systemd EnvironmentFile syntax); `None` for comments/blanks.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.trim_start().split_once('=')?;
    let key = key.trim_end();
    let valid = !key.is_empty()
        && !key.starts_with(['#', ';'])
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostfs::RootedFs;

    /// ecs.config may hold ECS_ENGINE_AUTH_DATA: a rewrite must not widen its mode.
    #[test]
    fn a_rewrite_keeps_the_mode_and_owner_and_a_new_secret_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RootedFs::new(dir.path());
        let path = "/etc/ecs/ecs.config";
        let owner = crate::hostfs::Owner { uid: 0, gid: 995 };
        fs.write_atomic(
            path,
            b"ECS_ENGINE_AUTH_DATA={}\n",
            Perms {
                mode: 0o600,
                owner: Some(owner),
            },
        )
        .unwrap();
        let text = merge("ECS_ENGINE_AUTH_DATA={}\n", &managed()[..1]);
        assert_eq!(write(&fs, path, &text).unwrap(), Written::Updated);
        let meta = fs.metadata(path).unwrap().unwrap();
        assert_eq!((meta.mode, meta.gid), (0o600, 995));

        fs.remove(path).unwrap();
        write(&fs, path, "ECS_CLUSTER=a\nECS_ENGINE_AUTH_DATA={}\n").unwrap();
        assert_eq!(fs.metadata(path).unwrap().unwrap().mode, 0o600);
        fs.remove(path).unwrap();
        write(&fs, path, "ECS_CLUSTER=a\n").unwrap();
        assert_eq!(fs.metadata(path).unwrap().unwrap().mode, 0o644);
    }

    fn managed() -> Vec<(String, String)> {
        vec![
            ("ECS_CLUSTER".into(), "l5d-demo".into()),
            ("ECS_ENABLE_CONTAINER_METADATA".into(), "true".into()),
        ]
    }

    #[test]
    fn replaces_in_place_drops_duplicates_keeps_the_rest() {
        let old =
            "# set by the AMI\nECS_LOGLEVEL=info\nECS_CLUSTER=default\nECS_CLUSTER=l5d-demo\n";
        let new = merge(old, &managed());
        assert_eq!(
            new,
            "# set by the AMI\nECS_LOGLEVEL=info\nECS_CLUSTER=l5d-demo\nECS_ENABLE_CONTAINER_METADATA=true\n"
        );
        assert_eq!(merge(&new, &managed()), new, "idempotent");
    }

    #[test]
    fn starts_an_empty_file() {
        assert_eq!(merge("", &managed()[..1]), "ECS_CLUSTER=l5d-demo\n");
    }

    #[test]
    fn a_key_that_only_starts_like_a_managed_one_is_kept() {
        let new = merge("ECS_CLUSTER_X=1\n", &managed()[..1]);
        assert_eq!(new, "ECS_CLUSTER_X=1\nECS_CLUSTER=l5d-demo\n");
    }
}
