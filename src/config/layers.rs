//! Layers: owns finding the configuration's fragments where a node keeps them — the main file
//! and `conf.d/*.toml` beside it (through the host filesystem boundary), then what the instance
//! carries: a `[nodeagent]` document in user-data and `nodeagent:` tags (through the IMDS and
//! EC2 boundaries; tags from the instance metadata when it shows them, else `DescribeTags`).

use super::{from_layers, ConfigError, Fragment, Loaded, DEFAULT_CONFIG_PATH, TAG_PREFIX};
use crate::aws::retry_until;
use crate::ec2::Ec2;
use crate::hostfs::{HostFs, RootedFs};
use crate::imds::Imds;
use std::path::{Path, PathBuf};
use tokio::time::Instant;
use tracing::warn;

/// Where the configuration files are: `--config` (a path of the machine running nodeagent),
/// else the default path under `--root`.
#[derive(Debug, Clone)]
pub struct Location {
    pub config: Option<PathBuf>,
    pub root: PathBuf,
}

/// The configuration files: the main one, then `conf.d/*.toml` beside it in lexical order.
pub fn files(at: &Location) -> Result<Vec<Fragment>, ConfigError> {
    let (fs, main, explicit) = match &at.config {
        Some(path) => {
            let path = std::path::absolute(path)
                .map_err(|e| ConfigError::unreadable(path.display().to_string(), e))?;
            (RootedFs::new("/"), path.display().to_string(), true)
        }
        None => (
            RootedFs::new(&at.root),
            DEFAULT_CONFIG_PATH.to_string(),
            false,
        ),
    };
    let read = |path: &str| -> Result<Option<Fragment>, ConfigError> {
        let shown = fs.resolve(path).display().to_string();
        let bytes = fs
            .read(path)
            .map_err(|e| ConfigError::unreadable(&shown, e))?;
        bytes
            .map(|b| {
                String::from_utf8(b)
                    .map(|text| Fragment::file(&shown, text))
                    .map_err(|_| ConfigError::unreadable(&shown, "not UTF-8 text"))
            })
            .transpose()
    };
    let mut fragments = Vec::new();
    match read(&main)? {
        Some(f) => fragments.push(f),
        None if explicit => return Err(ConfigError::unreadable(main, "no such file")),
        None => {}
    }
    let dir = Path::new(&main)
        .parent()
        .unwrap_or(Path::new("/"))
        .join("conf.d");
    let dir = dir.to_string_lossy();
    let names = fs
        .list(&dir)
        .map_err(|e| ConfigError::unreadable(dir.to_string(), e))?;
    for name in names.iter().filter(|n| n.ends_with(".toml")) {
        fragments.extend(read(&format!("{dir}/{name}"))?);
    }
    Ok(fragments)
}

/// The files, then the instance's layers: a `[nodeagent]` document in user-data, then its
/// `nodeagent:` tags (from instance metadata when tags are shown there, else DescribeTags,
/// asked again while AWS throttles or fails until `deadline`).
pub async fn with_instance(
    mut fragments: Vec<Fragment>,
    imds: &dyn Imds,
    ec2: &dyn Ec2,
    instance_id: &str,
    deadline: Instant,
) -> anyhow::Result<Loaded> {
    let (user_data, tags) = tokio::try_join!(imds.user_data(), imds.tags(TAG_PREFIX))?;
    if let Some(user_data) = user_data {
        fragments.extend(Fragment::user_data(&user_data));
    }
    let tags = match tags {
        Some(tags) => tags,
        None => match retry_until("reading this instance's tags", deadline, || {
            ec2.instance_tags(instance_id, TAG_PREFIX)
        })
        .await?
        {
            Some(tags) => tags,
            None => {
                warn!("nodeagent: instance tags are not read: the instance metadata does not show tags and the instance role lacks ec2:DescribeTags; enable one or the other if tags configure this node");
                Vec::new()
            }
        },
    };
    let tags: Vec<(String, String)> = tags
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(TAG_PREFIX)?.to_string(), v)))
        .collect();
    Ok(from_layers(&fragments, &tags)?)
}
