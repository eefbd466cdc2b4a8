//! Trust: owns what each configuration layer may set.
//!
//! | layer | written by | may set |
//! |---|---|---|
//! | built-in defaults, /etc/nodeagent (main file, conf.d) | the image owner (root) | everything |
//! | EC2 user-data | whoever may launch or modify the instance | everything but `trust.*` and the keys the image owner locks (`trust.locked`) |
//! | `nodeagent:` instance tags | whoever may tag it (`ec2:CreateTags`, often granted broadly) | only [`TAG_ALLOWED`] |
//!
//! A key a layer may not set is ignored — with a warning naming the key, never the value, and
//! shown by `config show` and `nodeagent status` — and so is a tag whose value is not valid: the
//! layer below wins. A tag never stops the boot.

use serde::Serialize;

/// The keys an instance tag may set: where the node belongs and how long it waits — never
/// commands, images, mounts, entrypoints, environments, families, paths, templates, modes,
/// listen addresses or ecs.config lines.
pub const TAG_ALLOWED: &[&str] = &[
    "cluster",
    "consul.datacenter",
    "consul.server_tag",
    "vars",
    "lifecycle.ready_attribute_at_join",
    "lifecycle.degraded_grace",
    "lifecycle.drain_on_rebalance",
    "lifecycle.drain_tasks_timeout",
    "lifecycle.unhealthy_after",
    "supervision.ready_timeout",
];

/// Keys only the image owner's files set, whatever `trust.locked` says.
pub const FILES_ONLY: &[&str] = &["trust"];

/// The layers, from the most trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    Defaults,
    File,
    UserData,
    Tag,
}

/// A key a layer set and nodeagent did not take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Ignored {
    /// The dotted key.
    pub key: String,
    /// The layer (`EC2 user-data`, `instance tag nodeagent:KEY`).
    pub layer: String,
    /// Why, never with the value.
    pub why: String,
}

/// Whether dotted `key` is `pattern` or below it; a `*` segment of the pattern matches any one
/// segment (`tasks.*.container` covers `tasks.linkerd.container.command`).
pub fn covers(pattern: &str, key: &str) -> bool {
    let mut keys = split(key).into_iter();
    split(pattern)
        .into_iter()
        .all(|p| keys.next().is_some_and(|k| p == "*" || p == k))
}

/// Dotted segments, a quoted segment (`files."/etc/x.json"`) kept whole.
fn split(key: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut quoted = false;
    for c in key.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                part.push(c);
            }
            '.' if !quoted => parts.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    parts.push(part);
    parts
}

/// Why `layer` may not set `key`; `None` when it may. `locked`: the image owner's
/// `trust.locked`.
pub fn refusal(layer: Layer, key: &str, locked: &[String]) -> Option<String> {
    match layer {
        Layer::Defaults | Layer::File => None,
        Layer::UserData => {
            if FILES_ONLY.iter().any(|p| covers(p, key)) {
                return Some("only the files in /etc/nodeagent set it".into());
            }
            locked
                .iter()
                .find(|p| covers(p, key))
                .map(|p| format!("locked by the image (trust.locked: {p:?})"))
        }
        Layer::Tag => (!TAG_ALLOWED.iter().any(|p| covers(p, key))).then(|| {
            "instance tags may not set it (anyone who may tag the instance could): set it in /etc/nodeagent or user-data".into()
        }),
    }
}

/// Whether `path` is `prefix` or below it (both normal absolute paths).
pub fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix || path.starts_with(&format!("{prefix}/")) || prefix.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_cover_what_is_below_them() {
        assert!(covers(
            "tasks.*.container",
            "tasks.linkerd.container.command"
        ));
        assert!(covers("tasks.*.container", "tasks.linkerd.container"));
        assert!(!covers("tasks.*.container", "tasks.linkerd.health.http"));
        assert!(covers("vars", "vars.team"));
        assert!(covers("consul.server_tag", "consul.server_tag.value"));
        assert!(!covers("consul.server_tag", "consul.api"));
        assert!(covers(
            "tasks.linkerd.files",
            "tasks.linkerd.files.\"/etc/linkerd/l5d.yaml\".mode"
        ));
        assert!(!covers("cluster", "cluster_x"));
    }

    #[test]
    fn each_layer_may_set_what_its_trust_allows() {
        let locked = vec!["tasks.*.container".to_string()];
        for key in [
            "tasks.linkerd.container.command",
            "tasks.x.container.mounts",
            "tasks.x.family",
            "ecs.config.ECS_X",
            "ecs.config_path",
            "metrics.listen",
            "runtime",
            "tasks.x.files.\"/etc/x\".template",
            "tasks.x.files.\"/etc/x\".mode",
            "trust.paths",
            "secrets.gossip.from",
        ] {
            assert!(refusal(Layer::Tag, key, &locked).is_some(), "{key}");
        }
        for key in [
            "cluster",
            "consul.datacenter",
            "vars.team",
            "lifecycle.drain_tasks_timeout",
        ] {
            assert_eq!(refusal(Layer::Tag, key, &locked), None, "{key}");
        }
        assert!(refusal(Layer::UserData, "tasks.x.container.image", &locked).is_some());
        assert!(refusal(Layer::UserData, "trust.locked", &[]).is_some());
        assert_eq!(refusal(Layer::UserData, "tasks.x.family", &locked), None);
        assert_eq!(
            refusal(Layer::UserData, "secrets.gossip.from", &locked),
            None
        );
        assert_eq!(refusal(Layer::File, "trust.paths", &locked), None);
    }
}
