//! Loading: owns turning configuration fragments into [`Settings`].
//!
//! Each fragment is type-checked alone so an error can name its file, line and column; then the
//! fragments are merged over the built-in defaults (tables merge key by key, any other value
//! replaces the one below it) and the result is validated as a whole. What a layer may not set
//! ([`super::trust`]) is left out, and noted.

use super::tags::{tag_table, TAG_PREFIX};
use super::trust::{refusal, Ignored, Layer};
use super::Settings;
use std::collections::BTreeMap;
use std::fmt;
use toml::Table;

/// The built-in defaults: the guide's setup.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// One layer of configuration: its text and where it came from (a path, or a description).
#[derive(Debug, Clone)]
pub struct Fragment {
    pub origin: String,
    pub text: String,
    /// The settings are the document's `[nodeagent]` table, not the whole document (EC2
    /// user-data, which other tools may share).
    pub in_nodeagent_table: bool,
    /// How far it is trusted.
    pub layer: Layer,
}

impl Fragment {
    /// A configuration file: the whole document is nodeagent's.
    pub fn file(origin: impl Into<String>, text: impl Into<String>) -> Fragment {
        Fragment {
            origin: origin.into(),
            text: text.into(),
            in_nodeagent_table: false,
            layer: Layer::File,
        }
    }

    /// EC2 user-data, when it is a TOML document with a `[nodeagent]` table. A script
    /// (`#!`), cloud-config or a MIME multipart document is never ours, even if a heredoc in it
    /// holds such a line; anything else with the table is, and an error in it is a
    /// configuration error.
    pub fn user_data(text: &str) -> Option<Fragment> {
        let first = text.trim_start().lines().next().unwrap_or_default();
        let foreign = [
            "#!",
            "#cloud-",
            "#include",
            "Content-Type:",
            "MIME-Version:",
        ]
        .iter()
        .any(|p| first.starts_with(p));
        let ours = !foreign
            && text.lines().any(|l| {
                let l = l.trim();
                l == "[nodeagent]" || l.starts_with("[nodeagent.")
            });
        ours.then(|| Fragment {
            origin: "EC2 user-data".into(),
            text: text.into(),
            in_nodeagent_table: true,
            layer: Layer::UserData,
        })
    }
}

/// The merged settings and, per leaf key (dotted, as `config show` prints it), the layer that
/// set it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub merged: Table,
    pub origins: BTreeMap<String, String>,
    /// What a layer set and was not taken (not its to set, or not a valid value).
    pub ignored: Vec<Ignored>,
}

/// A configuration that cannot be used. Exit status 2.
#[derive(Debug)]
pub enum ConfigError {
    /// A fragment does not parse or has a wrong type or an unknown key.
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A fragment could not be read.
    Unreadable { origin: String, error: String },
    /// The merged settings break a rule; one problem per entry.
    Invalid(Vec<String>),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax {
                origin,
                line,
                column,
                message,
            } => write!(f, "{origin}:{line}:{column}: {message}"),
            ConfigError::Unreadable { origin, error } => {
                write!(f, "cannot read configuration {origin}: {error}")
            }
            ConfigError::Invalid(problems) => {
                write!(f, "invalid configuration:")?;
                for p in problems {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn unreadable(origin: impl Into<String>, error: impl fmt::Display) -> Self {
        ConfigError::Unreadable {
            origin: origin.into(),
            error: error.to_string(),
        }
    }
}

/// Builds validated settings from the defaults and the given fragments, later ones winning.
pub fn from_fragments(fragments: &[Fragment]) -> Result<Settings, ConfigError> {
    Ok(from_layers(fragments, &[])?.settings)
}

/// The whole pipeline: built-in defaults, then `fragments` in order, then EC2 instance tags
/// (`KEY` of a `nodeagent:KEY` tag, a dotted path such as `consul.datacenter`), later winning.
/// What user-data may not set is left out; the trusted layers must make a valid configuration
/// (else an error: exit 2); then each tag is taken only if tags may set its key and the result
/// stays valid — else it is left out, and the layer below wins: a tag never stops the boot.
pub fn from_layers(
    fragments: &[Fragment],
    tags: &[(String, String)],
) -> Result<Loaded, ConfigError> {
    let defaults = Fragment {
        layer: Layer::Defaults,
        ..Fragment::file("built-in defaults", DEFAULTS)
    };
    let mut merged = Table::new();
    let mut origins = BTreeMap::new();
    let mut ignored = Vec::new();
    for fragment in std::iter::once(&defaults).chain(fragments) {
        let mut table = parse(fragment)?;
        if fragment.layer == Layer::UserData {
            let locked = locked(&merged);
            let refused = |key: &str| refusal(Layer::UserData, key, &locked);
            strip(&mut table, "", &refused, &fragment.origin, &mut ignored);
        }
        merge(&mut merged, table, &fragment.origin, "", &mut origins);
    }
    let mut settings = settings(&merged)?;
    let mut tags: Vec<&(String, String)> = tags.iter().collect();
    tags.sort();
    for (key, value) in tags {
        let layer = format!("instance tag {TAG_PREFIX}{key}");
        let ignore = |why: String| Ignored {
            key: key.clone(),
            layer: layer.clone(),
            why,
        };
        if let Some(why) = refusal(Layer::Tag, key, &[]) {
            ignored.push(ignore(why));
            continue;
        }
        let table = match tag_table(key, value, &merged) {
            Ok(table) => table,
            Err(why) => {
                ignored.push(ignore(why));
                continue;
            }
        };
        let (mut candidate, mut candidate_origins) = (merged.clone(), origins.clone());
        merge(&mut candidate, table, &layer, "", &mut candidate_origins);
        match super::Settings::validated(&candidate) {
            Ok(s) => {
                (merged, origins, settings) = (candidate, candidate_origins, s);
            }
            // The problem would quote the value, which a tag may hold a secret in.
            Err(_) => ignored.push(ignore(
                "the value is not valid for this key; the layers below are kept".into(),
            )),
        }
    }
    Ok(Loaded {
        settings,
        merged,
        origins,
        ignored,
    })
}

/// The merged table as validated settings.
fn settings(merged: &Table) -> Result<Settings, ConfigError> {
    Settings::validated(merged).map_err(ConfigError::Invalid)
}

impl Settings {
    /// Deserializes and validates a merged table; the problems, one per entry.
    fn validated(merged: &Table) -> Result<Settings, Vec<String>> {
        let settings: Settings = toml::Value::Table(merged.clone())
            .try_into()
            .map_err(|e: toml::de::Error| vec![e.message().to_string()])?;
        settings.validate()?;
        Ok(settings)
    }
}

/// `trust.locked` as the layers so far set it.
fn locked(merged: &Table) -> Vec<String> {
    merged
        .get("trust")
        .and_then(|t| t.get("locked"))
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes from `table` every leaf `refused` says no to, noting each in `ignored`.
fn strip(
    table: &mut Table,
    prefix: &str,
    refused: &dyn Fn(&str) -> Option<String>,
    origin: &str,
    ignored: &mut Vec<Ignored>,
) {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let path = format!("{prefix}{}", dotted_key(&key));
        if let Some(toml::Value::Table(inner)) = table.get_mut(&key) {
            strip(inner, &format!("{path}."), refused, origin, ignored);
            continue;
        }
        if let Some(why) = refused(&path) {
            table.remove(&key);
            ignored.push(Ignored {
                key: path,
                layer: origin.to_string(),
                why,
            });
        }
    }
}

/// Parses one fragment, checking its types and keys against [`Settings`].
fn parse(fragment: &Fragment) -> Result<Table, ConfigError> {
    let located = |e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map(|s| line_column(&fragment.text, s.start))
            .unwrap_or((1, 1));
        ConfigError::Syntax {
            origin: fragment.origin.clone(),
            line,
            column,
            message: e.message().trim_end().to_string(),
        }
    };
    let mut table: Table = toml::from_str(&fragment.text).map_err(located)?;
    if fragment.in_nodeagent_table {
        /// The shared document: other tables are someone else's.
        #[derive(serde::Deserialize)]
        struct Shared {
            #[allow(dead_code)]
            nodeagent: Settings,
        }
        toml::from_str::<Shared>(&fragment.text).map_err(located)?;
        return match table.remove("nodeagent") {
            Some(toml::Value::Table(t)) => Ok(t),
            _ => Err(ConfigError::Syntax {
                origin: fragment.origin.clone(),
                line: 1,
                column: 1,
                message: "`nodeagent` must be a table".into(),
            }),
        };
    }
    toml::from_str::<Settings>(&fragment.text).map_err(located)?;
    Ok(table)
}

/// Merges `over` into `base` (tables key by key, anything else replaces), noting the origin of
/// every leaf it sets.
fn merge(
    base: &mut Table,
    over: Table,
    origin: &str,
    prefix: &str,
    origins: &mut BTreeMap<String, String>,
) {
    for (key, value) in over {
        let path = format!("{prefix}{}", dotted_key(&key));
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => {
                merge(below, above, origin, &format!("{path}."), origins)
            }
            (_, value) => {
                origins.retain(|k, _| !(k == &path || k.starts_with(&format!("{path}."))));
                note_leaves(&value, &path, origin, origins);
                base.insert(key, value);
            }
        }
    }
}

fn note_leaves(
    value: &toml::Value,
    path: &str,
    origin: &str,
    origins: &mut BTreeMap<String, String>,
) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                note_leaves(v, &format!("{path}.{}", dotted_key(k)), origin, origins);
            }
        }
        _ => {
            origins.insert(path.to_string(), origin.to_string());
        }
    }
}

/// A key as it appears in a dotted TOML key: bare when it can be, else quoted.
pub fn dotted_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        key.to_string()
    } else {
        toml::Value::String(key.to_string()).to_string()
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frag(text: &str) -> Fragment {
        Fragment::file("/etc/nodeagent/nodeagent.toml", text)
    }

    #[test]
    fn a_fragment_overrides_only_what_it_sets() {
        let s = from_fragments(&[frag(
            "cluster = \"prod\"\n[tasks.linkerd]\nenabled = false\n[ecs.config]\nECS_ENABLE_CONTAINER_METADATA = \"true\"\n",
        )])
        .unwrap();
        assert_eq!(s.cluster, "prod");
        assert_eq!(s.consul.datacenter, "dc1");
        assert!(!s.tasks["linkerd"].enabled);
        assert_eq!(s.tasks["linkerd"].files.len(), 1, "other task keys kept");
        assert_eq!(s.ecs.config["ECS_ENABLE_CONTAINER_METADATA"], "true");
    }

    #[test]
    fn unknown_keys_name_file_line_and_column() {
        let err = from_fragments(&[frag("cluster = \"a\"\n[consul]\n  datacentre = \"x\"\n")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/nodeagent/nodeagent.toml:3:3: unknown field `datacentre`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_toml_and_wrong_types_are_located() {
        let err = from_fragments(&[frag("cluster = \n")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/nodeagent/nodeagent.toml:1:"), "{err}");
        let err = from_fragments(&[frag("[ecs]\nagent_timeout = 5\n")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/nodeagent/nodeagent.toml:2:17:"),
            "{err}"
        );
    }

    #[test]
    fn later_fragments_win() {
        let s = from_fragments(&[frag("cluster = \"a\""), frag("cluster = \"b\"")]).unwrap();
        assert_eq!(s.cluster, "b");
    }

    #[test]
    fn every_layer_wins_over_the_ones_below_and_is_named() {
        let user_data = "# shared\n[other]\nx = 1\n[nodeagent]\ncluster = \"from-user-data\"\n[nodeagent.consul]\ndatacenter = \"ud\"\n[nodeagent.tasks.linkerd.container]\nimage = \"evil:1\"\n[nodeagent.trust]\nmounts = [\"/\"]\n";
        let layers = [
            Fragment::file(
                "/etc/nodeagent/nodeagent.toml",
                "cluster = \"from-file\"\n[supervision]\nlog_lines = 5\n[vars]\na = \"file\"\n[trust]\nlocked = [\"tasks.*.container\"]\n",
            ),
            Fragment::file(
                "/etc/nodeagent/conf.d/10-a.toml",
                "cluster = \"from-conf-d\"\n[vars]\na = \"conf.d\"\n",
            ),
            Fragment::user_data(user_data).expect("a [nodeagent] document"),
        ];
        let tags = [
            ("consul.datacenter", "dc-tag"),
            ("vars.port", "4140"),
            ("supervision.ready_timeout", "90s"),
            // What a tag may never set, whatever it is.
            ("ecs.join", "false"),
            ("ecs.config.ECS_ENABLE_TASK_IAM_ROLE", "true"),
            ("tasks.linkerd.container.env.PORT", "4140"),
            ("tasks.linkerd.container.command", "[\"sh\"]"),
            ("supervision.crash_loop_restarts", "9"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let loaded = from_layers(&layers, &tags).unwrap();
        let s = &loaded.settings;
        assert_eq!(s.cluster, "from-user-data");
        assert_eq!(s.consul.datacenter, "dc-tag");
        assert_eq!(s.supervision.log_lines, 5);
        assert_eq!(s.supervision.ready_timeout, Duration::from_secs(90));
        assert_eq!(s.vars["a"].as_str(), Some("conf.d"));
        assert_eq!(s.vars["port"].as_integer(), Some(4140));
        assert!(s.ecs.join, "a tag cannot turn off joining");
        assert!(s.ecs.config.is_empty());
        assert!(!s.tasks["linkerd"].container.env.contains_key("PORT"));
        assert_eq!(
            s.tasks["linkerd"].container.image, "docker.io/buoyantio/linkerd:1.4.6",
            "locked for user-data"
        );
        assert!(s.trust.mounts.is_empty(), "trust is the files' alone");
        assert_eq!(s.supervision.crash_loop_restarts, 5);
        let o = |k: &str| loaded.origins[k].as_str();
        assert_eq!(o("cluster"), "EC2 user-data");
        assert_eq!(
            o("consul.datacenter"),
            "instance tag nodeagent:consul.datacenter"
        );
        assert_eq!(o("supervision.log_lines"), "/etc/nodeagent/nodeagent.toml");
        assert_eq!(o("vars.a"), "/etc/nodeagent/conf.d/10-a.toml");
        assert_eq!(o("runtime"), "built-in defaults");
        assert_eq!(
            o("tasks.consul-agent.files.\"/opt/consul/config/consul-agent.json\".template"),
            "built-in defaults"
        );
        let ignored: Vec<(&str, &str)> = loaded
            .ignored
            .iter()
            .map(|i| (i.key.as_str(), i.layer.as_str()))
            .collect();
        assert_eq!(
            ignored,
            [
                ("tasks.linkerd.container.image", "EC2 user-data"),
                ("trust.mounts", "EC2 user-data"),
                (
                    "ecs.config.ECS_ENABLE_TASK_IAM_ROLE",
                    "instance tag nodeagent:ecs.config.ECS_ENABLE_TASK_IAM_ROLE"
                ),
                ("ecs.join", "instance tag nodeagent:ecs.join"),
                (
                    "supervision.crash_loop_restarts",
                    "instance tag nodeagent:supervision.crash_loop_restarts"
                ),
                (
                    "tasks.linkerd.container.command",
                    "instance tag nodeagent:tasks.linkerd.container.command"
                ),
                (
                    "tasks.linkerd.container.env.PORT",
                    "instance tag nodeagent:tasks.linkerd.container.env.PORT"
                ),
            ]
        );
    }

    #[test]
    fn user_data_that_is_not_ours_is_ignored() {
        assert!(
            Fragment::user_data("#!/bin/bash\necho ECS_CLUSTER=x >> /etc/ecs/ecs.config\n")
                .is_none()
        );
        assert!(Fragment::user_data("#cloud-config\nruncmd: []\n").is_none());
        let script = "#!/bin/bash\ncat > /etc/x.toml <<EOF\n[nodeagent]\ncluster = \"a\"\nEOF\n";
        assert!(
            Fragment::user_data(script).is_none(),
            "a heredoc in a script"
        );
        let mime = "Content-Type: multipart/mixed; boundary=\"b\"\nMIME-Version: 1.0\n\n--b\n[nodeagent]\n";
        assert!(Fragment::user_data(mime).is_none());
    }

    #[test]
    fn broken_user_data_is_an_error_and_broken_tags_are_ignored() {
        let ud = Fragment::user_data("[nodeagent]\ncluster = \"a\"\nclustre = \"b\"\n").unwrap();
        let err = from_layers(&[ud], &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("EC2 user-data:3:1: unknown field `clustre`"),
            "{err}"
        );
        // A tag never stops the boot: whatever is wrong with it, the layer below wins.
        let tags = [
            ("lifecycle.drain_tasks_timeout", "s3cret"), // a wrong type
            ("cluster", "bad name"),                     // a value validation refuses
            ("consul.datacentre", "x"),                  // no such key
            ("consul..x", "1"),                          // not a key
            ("ecs.agent_timeout", "5m"),                 // not a tag's to set
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let loaded = from_layers(&[], &tags).unwrap();
        assert_eq!(loaded.settings.cluster, "l5d-demo");
        assert_eq!(
            loaded.settings.lifecycle.drain_tasks_timeout,
            Duration::from_secs(300)
        );
        let ignored: Vec<&str> = loaded.ignored.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            ignored,
            [
                "cluster",
                "consul..x",
                "consul.datacentre",
                "ecs.agent_timeout",
                "lifecycle.drain_tasks_timeout"
            ]
        );
        for i in &loaded.ignored {
            assert!(i.layer.starts_with("instance tag nodeagent:"), "{i:?}");
            assert!(
                !i.why.contains("s3cret") && !i.why.contains("bad name"),
                "the value is never repeated: {i:?}"
            );
        }
    }

    /// The README's configuration block is the reference: it must be the defaults, exactly.
    #[test]
    fn the_readme_reference_is_the_defaults() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("## Configuration")
            .expect("a Configuration section")..];
        let block = section
            .split("```toml\n")
            .find(|b| b.starts_with("cluster = "))
            .and_then(|b| b.split("```").next())
            .expect("the reference block");
        let documented: Table = toml::from_str(block).expect("the reference block is TOML");
        let defaults: Table = toml::from_str(DEFAULTS).unwrap();
        let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
        note_leaves(&toml::Value::Table(documented), "", "readme", &mut a);
        note_leaves(&toml::Value::Table(defaults), "", "defaults", &mut b);
        let only_readme: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
        let only_defaults: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
        assert!(
            only_readme.is_empty() && only_defaults.is_empty(),
            "README only: {only_readme:?}; defaults only: {only_defaults:?}"
        );
        assert_eq!(
            toml::from_str::<Table>(block).unwrap(),
            toml::from_str::<Table>(DEFAULTS).unwrap(),
            "same keys, a different value"
        );
    }
}
