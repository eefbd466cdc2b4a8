//! `nodeagent config check` and `config show`: the configuration as the files (and, for `show`
//! on an instance, user-data, tags and the secrets' versions) make it, checked or printed with
//! where each key came from — never a secret's value.

use super::Common;
use crate::aws::{self, AwsCalls};
use crate::config::{self, layers, ConfigError};
use crate::ec2::SdkEc2;
use crate::facts::InstanceFacts;
use crate::hostfs::RootedFs;
use crate::imds::AwsImds;
use crate::render::{self, Renderer};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can be checked without the node: the settings, then every template.
pub(super) fn check_config(common: &Common) -> anyhow::Result<ExitCode> {
    let settings = config::from_fragments(&layers::files(&common.location())?)?;
    let fs = RootedFs::new(&common.root);
    let invalid = |e: anyhow::Error| ConfigError::Invalid(vec![format!("{e:#}")]);
    Renderer::new(&settings, &|path: &str| crate::render::read_text(&fs, path)).map_err(invalid)?;
    let mut files = 0;
    for task in settings.enabled_tasks() {
        let config = &settings.tasks[task.name];
        files += config.files.len();
        let health = config
            .health
            .iter()
            .flat_map(|h| [h.http(), h.tcp()])
            .flatten();
        for template in health {
            render::compile_value(template)
                .map_err(|e| invalid(e.context(format!("tasks.{}.health", task.name))))?;
        }
    }
    let names: Vec<&str> = settings.enabled_tasks().map(|t| t.name).collect();
    println!(
        "configuration OK: runtime {}, cluster {}, tasks {}, {files} files",
        settings.runtime.as_str(),
        settings.cluster,
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints every key of the merged configuration as a dotted TOML line with the layer that set
/// it. Values of keys that look secret are not printed.
pub(super) async fn show_config(common: &Common) -> anyhow::Result<ExitCode> {
    let files = layers::files(&common.location())?;
    let imds = AwsImds::new();
    let instance = async {
        let facts = InstanceFacts::read(&imds).await?;
        let sdk = aws::sdk_config(&facts.region).await;
        let ec2 = SdkEc2::new(&sdk, Arc::new(AwsCalls::default()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let loaded =
            layers::with_instance(files.clone(), &imds, &ec2, &facts.instance_id, deadline).await?;
        anyhow::Ok((loaded, sdk))
    };
    let (loaded, note, sdk) = match tokio::time::timeout(Duration::from_secs(15), instance).await {
        Ok(Ok((loaded, sdk))) => (loaded, None, Some(sdk)),
        Ok(Err(e)) if e.chain().any(|c| c.is::<ConfigError>()) => return Err(e),
        Ok(Err(e)) => (
            config::from_layers(&files, &[])?,
            Some(format!("{e:#}")),
            None,
        ),
        Err(_) => (
            config::from_layers(&files, &[])?,
            Some("instance metadata did not answer".into()),
            None,
        ),
    };
    println!("# nodeagent configuration: every key, and the layer that set it (later layers win:");
    println!("# built-in defaults, the main file, conf.d/*.toml, EC2 user-data, nodeagent: tags).");
    if let Some(why) = note {
        println!("# Not on an EC2 instance, or its metadata is unreachable: user-data and tags not read ({why}).");
    }
    for i in &loaded.ignored {
        println!("# ignored: {} ({}): {}", i.key, i.layer, i.why);
    }
    let mut leaves = Vec::new();
    flatten(&loaded.merged, "", &mut leaves);
    for (key, value) in leaves {
        let origin = loaded.origins.get(&key).map_or("?", String::as_str);
        let value = if config::looks_secret(&key) {
            "\"<redacted>\"".to_string()
        } else {
            value.to_string()
        };
        println!("{key} = {value}  # {origin}");
    }
    if let Some(sdk) = sdk {
        for line in secret_versions(&loaded.settings, &sdk).await {
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// On an instance: each secret's version and the first 8 hex digits of its value's sha256 (to
/// compare nodes), never the value; read once, within 10 s.
async fn secret_versions(settings: &config::Settings, sdk: &aws_config::SdkConfig) -> Vec<String> {
    use crate::secrets::{fetch_once, sdk::SdkSecrets};
    let store = SdkSecrets::new(sdk, Arc::new(AwsCalls::default()));
    let wanted = settings.secret_sources();
    let read = tokio::time::timeout(Duration::from_secs(10), fetch_once(&store, &wanted));
    let Ok(read) = read.await else {
        return vec!["# secrets: not read (no answer within 10 s)".into()];
    };
    wanted
        .iter()
        .map(|(name, source)| match &read[name] {
            Ok(f) => {
                let sha = render::sha256_hex(f.value.expose().as_bytes());
                format!(
                    "# secret {name}: {source} {}, sha256 {}…",
                    f.version,
                    &sha[..8]
                )
            }
            Err(e) => format!("# secret {name}: {source} not readable: {e:#}"),
        })
        .collect()
}

fn flatten(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = format!("{prefix}{}", config::dotted_key(k));
        match v {
            toml::Value::Table(t) => flatten(t, &format!("{key}."), out),
            v => out.push((key, v.clone())),
        }
    }
}
