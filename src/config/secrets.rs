//! Secret settings: owns what a `[secrets.NAME]` entry means — its source (`ssm:/NAME`,
//! `secretsmanager:NAME_OR_ARN#KEY`), its refresh — and the rules such entries and the tasks'
//! `reload` keep. Where a secret may land (files ≤ 0640, used by some template) needs the
//! templates: the renderer checks it ([`crate::render`]).

use super::types::Settings;
use std::fmt;
use std::time::Duration;

/// Signals a task may ask for instead of a restart when one of its files changes.
pub const RELOAD_SIGNALS: &[&str] = &["SIGHUP", "SIGUSR1", "SIGUSR2"];

/// The shortest `refresh` other than `0s` (read once): every node of a fleet reads every
/// secret each refresh.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretSource {
    /// An SSM Parameter Store parameter (a SecureString is decrypted).
    Ssm { name: String },
    /// A Secrets Manager secret (name or ARN); `key`: a field of its JSON `SecretString`.
    SecretsManager { id: String, key: Option<String> },
}

impl SecretSource {
    /// Parses `ssm:/NAME` or `secretsmanager:NAME_OR_ARN[#KEY]`.
    pub fn parse(from: &str) -> Result<SecretSource, String> {
        if let Some(name) = from.strip_prefix("ssm:") {
            let ok = !name.is_empty()
                && name.len() <= 2048
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c));
            if !ok {
                return Err("an SSM parameter name is letters, digits and / _ . - (\"ssm:/prod/consul/gossip-key\")".into());
            }
            return Ok(SecretSource::Ssm { name: name.into() });
        }
        if let Some(rest) = from.strip_prefix("secretsmanager:") {
            let (id, key) = match rest.split_once('#') {
                Some((id, key)) => (id, Some(key)),
                None => (rest, None),
            };
            let id_ok = !id.is_empty()
                && id.len() <= 2048
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_+=.@-:".contains(c));
            if !id_ok {
                return Err("a Secrets Manager secret is its name or ARN (\"secretsmanager:prod/consul/agent#token\")".into());
            }
            if key.is_some_and(str::is_empty) {
                return Err("`#` must be followed by the JSON field to read".into());
            }
            return Ok(SecretSource::SecretsManager {
                id: id.into(),
                key: key.map(str::to_string),
            });
        }
        Err("expected \"ssm:/NAME\" or \"secretsmanager:NAME_OR_ARN[#KEY]\"".into())
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Ssm { name } => write!(f, "ssm:{name}"),
            SecretSource::SecretsManager { id, key: None } => write!(f, "secretsmanager:{id}"),
            SecretSource::SecretsManager { id, key: Some(k) } => {
                write!(f, "secretsmanager:{id}#{k}")
            }
        }
    }
}

/// A secret's name as templates see it: `secrets.NAME`.
fn valid_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Settings {
    /// `secrets.*` and `tasks.*.reload`.
    pub(super) fn check_secrets(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, secret) in &self.secrets {
            if !valid_name(name) {
                problems.push(format!(
                    "secrets.{name}: a secret's name is lower-case letters, digits and '_' (templates use secrets.NAME)"
                ));
            }
            if let Err(why) = SecretSource::parse(&secret.from) {
                problems.push(format!("secrets.{name}.from = {:?}: {why}", secret.from));
            }
            if !secret.refresh.is_zero() && secret.refresh < MIN_REFRESH {
                problems.push(format!(
                    "secrets.{name}.refresh must be 0s (read once) or at least {MIN_REFRESH:?}"
                ));
            }
        }
        for (task, t) in self.tasks.iter().filter(|(_, t)| t.enabled) {
            if let Some(signal) = &t.reload {
                if !RELOAD_SIGNALS.contains(&signal.as_str()) {
                    problems.push(format!(
                        "tasks.{task}.reload = {signal:?}: one of {}, or no key (restart)",
                        RELOAD_SIGNALS.join(", ")
                    ));
                }
            }
        }
        problems
    }

    /// Every configured secret's source, by name (valid settings parse).
    pub fn secret_sources(&self) -> Vec<(String, SecretSource)> {
        self.secrets
            .iter()
            .filter_map(|(name, s)| {
                SecretSource::parse(&s.from)
                    .ok()
                    .map(|src| (name.clone(), src))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{from_fragments, Fragment};
    use super::*;

    #[test]
    fn sources_parse_and_print_as_written() {
        for from in [
            "ssm:/prod/consul/gossip-key",
            "secretsmanager:prod/consul/agent#token",
            "secretsmanager:arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/x-AbCdEf",
        ] {
            assert_eq!(SecretSource::parse(from).unwrap().to_string(), from);
        }
        assert_eq!(
            SecretSource::parse("secretsmanager:a/b#token").unwrap(),
            SecretSource::SecretsManager {
                id: "a/b".into(),
                key: Some("token".into())
            }
        );
        for bad in ["", "ssm:", "vault:x", "secretsmanager:x#", "ssm:/a b"] {
            assert!(SecretSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_secrets_and_reloads_are_reported() {
        let err = from_fragments(&[Fragment::file(
            "t",
            "[secrets.Gossip]\nfrom = \"ssm:/x\"\n[secrets.t]\nfrom = \"vault:x\"\nrefresh = \"10ms\"\n[tasks.linkerd]\nreload = \"SIGKILL\"\n",
        )])
        .unwrap_err()
        .to_string();
        for part in [
            "secrets.Gossip: a secret's name",
            "secrets.t.from = \"vault:x\"",
            "secrets.t.refresh must be",
            "tasks.linkerd.reload = \"SIGKILL\"",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
        let s = from_fragments(&[Fragment::file(
            "t",
            "[secrets.gossip]\nfrom = \"ssm:/x\"\n[tasks.linkerd]\nreload = \"SIGHUP\"\n",
        )])
        .unwrap();
        assert_eq!(s.secrets["gossip"].refresh, Duration::from_secs(300));
    }
}
