//! Configuration: owns the typed settings nodeagent runs with and the rules that make them valid.
//!
//! The pipeline (as in zincati): fragments — the built-in defaults, the files, the instance's
//! user-data and tags, found by [`layers`] — are parsed and checked one by one ([`load`]),
//! merged key by key (later wins), deserialized into the typed [`Settings`] ([`types`]) and
//! validated ([`validate`]).

pub mod layers;
mod load;
mod secrets;
mod tags;
pub mod trust;
mod types;
mod validate;
mod values;

pub use load::{dotted_key, from_fragments, from_layers, ConfigError, Fragment, Loaded, DEFAULTS};
pub use secrets::{SecretSource, RELOAD_SIGNALS};
pub use tags::TAG_PREFIX;

pub use layers::Location;
pub use types::*;
pub use validate::{looks_secret, MANAGED_DRAINING_HOOK};
pub use values::{HttpUrl, Mode};

/// Where the main configuration file lives on a node.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nodeagent/nodeagent.toml";

/// Prefix of a template reference that names one of the templates compiled into the binary.
pub const BUILTIN_PREFIX: &str = "builtin:";
