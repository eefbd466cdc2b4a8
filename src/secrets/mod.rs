//! Secrets boundary: owns reading the node's secrets — the Consul gossip key, CA certificate,
//! ACL token — from SSM Parameter Store (`GetParameters`, decrypted, batched ten names a call)
//! and Secrets Manager (`GetSecretValue`, a `#key` field of a JSON secret), behind the
//! [`SecretStore`] trait ([`sdk`]: the SDK implementation), and holding their values so they
//! never leak: a [`SecretValue`] has no `Display` nor `Serialize`, its `Debug` is redacted,
//! and its memory is zeroed on drop. Errors name the secret and its source, never the value.
//!
//! [`fetch_until`] is the boot's read (every secret, retried like the discovery of the Consul
//! servers until a deadline); [`fetch_once`] is one refresh's (one call per source).

pub mod sdk;
#[cfg(test)]
mod tests;

use crate::config::SecretSource;
use crate::retry::wait_until;
use anyhow::anyhow;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::info;
use zeroize::{Zeroize, Zeroizing};

/// SSM's `GetParameters` takes at most this many names.
pub const SSM_BATCH: usize = 10;

/// A secret's value: shown to nothing but the templates. Zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(value: String) -> SecretValue {
        SecretValue(Zeroizing::new(value))
    }

    /// The value itself, for rendering a file that may hold it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// One secret as read: its value and the version its source gave (`v3` for a parameter, the
/// first characters of a Secrets Manager `VersionId`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub value: SecretValue,
    pub version: String,
}

/// What reads secrets (SSM Parameter Store, Secrets Manager).
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The parameters named (at most [`SSM_BATCH`]), SecureStrings decrypted, by name; a name
    /// missing from the answer does not exist (or the role may not read it).
    async fn parameters(&self, names: &[String]) -> anyhow::Result<BTreeMap<String, Fetched>>;
    /// A Secrets Manager secret's `SecretString` (`id`: its name or ARN).
    async fn secret_value(&self, id: &str) -> anyhow::Result<Fetched>;
}

/// A secret to read: its name (`secrets.NAME`) and source.
pub type Wanted = (String, SecretSource);

/// The current secrets, by name: what templates see as `secrets.*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub BTreeMap<String, Current>);

/// One secret as nodeagent holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub source: SecretSource,
    pub fetched: Fetched,
    pub fetched_at: SystemTime,
}

impl Secrets {
    /// The values by name, for rendering.
    pub fn values(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(n, c)| (n.as_str(), c.fetched.value.expose()))
            .collect()
    }
}

/// Reads each wanted secret once: one `GetParameters` per ten parameters, one
/// `GetSecretValue` per Secrets Manager secret (two keys of one secret share the call). Each
/// secret's own outcome; an error names the secret and its source.
pub async fn fetch_once(
    store: &dyn SecretStore,
    wanted: &[Wanted],
) -> BTreeMap<String, anyhow::Result<Fetched>> {
    let mut got = BTreeMap::new();
    let ssm: Vec<(&String, &String)> = wanted
        .iter()
        .filter_map(|(n, s)| match s {
            SecretSource::Ssm { name } => Some((n, name)),
            SecretSource::SecretsManager { .. } => None,
        })
        .collect();
    let mut names: Vec<String> = ssm.iter().map(|(_, p)| (*p).clone()).collect();
    names.sort();
    names.dedup();
    for batch in names.chunks(SSM_BATCH) {
        let answer = store.parameters(batch).await;
        for (secret, param) in ssm.iter().filter(|(_, p)| batch.contains(p)) {
            let result = match &answer {
                Ok(params) => params.get(*param).cloned().ok_or_else(|| {
                    anyhow!("secret {secret} (ssm:{param}): no such parameter, or the instance role may not read it; create it (a SecureString) or fix secrets.{secret}.from")
                }),
                Err(e) => Err(anyhow!("reading secret {secret} (ssm:{param}): {e:#}")),
            };
            got.insert((*secret).clone(), result);
        }
    }
    let mut whole: BTreeMap<&str, Result<Fetched, String>> = BTreeMap::new();
    for (secret, source) in wanted {
        let SecretSource::SecretsManager { id, key } = source else {
            continue;
        };
        if !whole.contains_key(id.as_str()) {
            let fetched = store.secret_value(id).await.map_err(|e| format!("{e:#}"));
            whole.insert(id, fetched);
        }
        let result = match (&whole[id.as_str()], key) {
            (Err(e), _) => Err(anyhow!("reading secret {secret} ({source}): {e}")),
            (Ok(fetched), None) => Ok(fetched.clone()),
            (Ok(fetched), Some(key)) => json_field(fetched.value.expose(), key)
                .map(|value| Fetched {
                    value,
                    version: fetched.version.clone(),
                })
                .map_err(|why| anyhow!("secret {secret} ({source}): {why}")),
        };
        got.insert(secret.clone(), result);
    }
    got
}

/// Field `key` of a JSON object: a string as it is, a number or boolean as JSON writes it.
/// Errors never quote the document.
fn json_field(document: &str, key: &str) -> Result<SecretValue, String> {
    let parsed = Scrubbed(
        serde_json::from_str(document)
            .map_err(|_| format!("the secret is not a JSON object, so it has no field {key:?}"))?,
    );
    let object = parsed
        .0
        .as_object()
        .ok_or_else(|| format!("the secret is not a JSON object, so it has no field {key:?}"))?;
    match object.get(key) {
        Some(serde_json::Value::String(s)) => Ok(SecretValue::new(s.clone())),
        Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
            Ok(SecretValue::new(v.to_string()))
        }
        Some(_) => Err(format!(
            "field {key:?} is not a string; store it as a string, a number or a boolean"
        )),
        None => Err(format!(
            "the JSON secret has no field {key:?}; add it, or fix the #key of the source"
        )),
    }
}

/// A parsed secret document: it holds the secret's other fields too, so every string in it,
/// however deep, is zeroed when it is dropped — on every path out of [`json_field`].
struct Scrubbed(serde_json::Value);

impl Drop for Scrubbed {
    fn drop(&mut self) {
        fn scrub(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::String(s) => s.zeroize(),
                serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
                serde_json::Value::Object(m) => m.values_mut().for_each(scrub),
                _ => {}
            }
        }
        scrub(&mut self.0);
    }
}

/// The boot's read: every wanted secret, each failure (a throttle, a missing parameter, a
/// refused decrypt: an instance role's permissions may still be propagating) tried again with
/// full jitter until `deadline`, as the Consul servers are looked for. `waiting` hears how
/// long it has waited (`None` once done).
pub async fn fetch_until(
    store: &dyn SecretStore,
    wanted: &[Wanted],
    deadline: Instant,
    waiting: &(dyn Fn(Option<Duration>) + Sync),
) -> anyhow::Result<Secrets> {
    // What was read is kept across the tries: a try asks only for what is still missing.
    let got: Mutex<BTreeMap<String, Current>> = Mutex::default();
    let kept = &got;
    wait_until("the secrets", deadline, waiting, || async move {
        let missing: Vec<Wanted> = {
            let got = kept.lock().expect("not poisoned");
            wanted
                .iter()
                .filter(|(n, _)| !got.contains_key(n))
                .cloned()
                .collect()
        };
        fetch_missing(store, &missing, kept)
            .await
            .map_err(|e| format!("{e:#}"))
    })
    .await
    .map_err(|why| {
        anyhow!("secrets not readable within the boot's deadline (consul.discovery_timeout): {why}")
    })?;
    let got = got.into_inner().expect("not poisoned");
    if !got.is_empty() {
        let versions: Vec<String> = got
            .iter()
            .map(|(n, c)| format!("{n} {}", c.fetched.version))
            .collect();
        info!(secrets = %versions.join(", "), "read the secrets");
    }
    Ok(Secrets(got))
}

/// Reads `missing`, keeping what succeeded in `got` even when another failed.
async fn fetch_missing(
    store: &dyn SecretStore,
    missing: &[Wanted],
    got: &Mutex<BTreeMap<String, Current>>,
) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for (name, result) in fetch_once(store, missing).await {
        match result {
            Ok(fetched) => {
                let source = missing
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| s.clone())
                    .expect("asked for");
                let fetched_at = SystemTime::now();
                got.lock().expect("not poisoned").insert(
                    name,
                    Current {
                        source,
                        fetched,
                        fetched_at,
                    },
                );
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}
