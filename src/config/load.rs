//! Loading: owns turning configuration fragments into [`Settings`].
//!
//! Each fragment is type-checked alone so an error can name its file, line and column; then the
//! fragments are merged over the built-in defaults (tables merge key by key, any other value
//! replaces the one below it) and the result is validated as a whole.

use super::Settings;
use std::fmt;
use toml::Table;

/// The built-in defaults: the guide's setup.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// One layer of configuration: its text and where it came from (a path, or a description).
#[derive(Debug, Clone)]
pub struct Fragment {
    pub origin: String,
    pub text: String,
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
    let mut merged = parse(&Fragment {
        origin: "built-in defaults".into(),
        text: DEFAULTS.into(),
    })?;
    for fragment in fragments {
        merge(&mut merged, parse(fragment)?);
    }
    let settings: Settings = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(vec![e.message().to_string()]))?;
    settings.validate().map_err(ConfigError::Invalid)?;
    Ok(settings)
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
    let table: Table = toml::from_str(&fragment.text).map_err(located)?;
    toml::from_str::<Settings>(&fragment.text).map_err(located)?;
    Ok(table)
}

fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => merge(below, above),
            (_, value) => {
                base.insert(key, value);
            }
        }
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

    fn frag(text: &str) -> Fragment {
        Fragment {
            origin: "/etc/nodeagent/nodeagent.toml".into(),
            text: text.into(),
        }
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
}
