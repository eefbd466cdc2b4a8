//! Rendering: owns turning the facts and settings into the foundational tasks' config files.
//!
//! Templates are minijinja with strict undefined (a typo is an error, never an empty string).
//! Every interpolated value is escaped for the syntax of the file it lands in — JSON literals in
//! `.json`, YAML double-quoted scalars in `.yaml`, single-quoted words in `.sh` (or the file's
//! `format`) — so a value holding quotes, line breaks or `{{` still yields a valid file that
//! holds the literal value. `|safe` opts a value out.
//!
//! Secrets (`secrets.NAME`) reach only the templates that name them, and only files no one but
//! their owner and group can read (mode ≤ 0640); a configured secret no template uses is an
//! error too. Which file uses which secret decides what a rotation re-renders.

use crate::config::{Format, Settings, BUILTIN_PREFIX};
use crate::facts::InstanceFacts;
use anyhow::{anyhow, Context as _};
use minijinja::value::ValueKind;
use minijinja::{
    AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior, Value,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use zeroize::Zeroizing;

/// The templates compiled into the binary, by their `builtin:` name.
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    (
        "consul-agent.json",
        include_str!("../templates/consul-agent.json"),
    ),
    ("linkerd.yaml", include_str!("../templates/linkerd.yaml")),
    (
        "registrator-start.sh",
        include_str!("../templates/registrator-start.sh"),
    ),
];

/// What templates can see.
#[derive(Debug, Clone, Serialize)]
pub struct Context<'a> {
    pub instance: &'a InstanceFacts,
    pub cluster: &'a str,
    pub consul: ConsulContext<'a>,
    pub ecs: EcsContext<'a>,
    pub vars: &'a BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsulContext<'a> {
    /// Private IPv4 addresses of the discovered servers, sorted.
    pub servers: &'a [String],
    pub datacenter: &'a str,
    pub server_tag: &'a crate::config::Tag,
}

#[derive(Debug, Clone, Serialize)]
pub struct EcsContext<'a> {
    pub container_instance_arn: Option<&'a str>,
}

/// One rendered file, ready to be written. Its contents may hold secrets: they are zeroed
/// on drop and once written ([`render_files`]), and never printed (`Debug` leaves them out).
/// The template engine's own copies while it renders are not zeroed.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct RenderedFile {
    pub task: String,
    pub path: String,
    pub mode: u32,
    /// `tasks.*.files.*.owner` as configured (resolved when the file is written).
    pub owner: Option<String>,
    #[serde(skip)]
    pub contents: Zeroizing<String>,
    pub sha256: String,
    /// The secrets its template uses (names).
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedFile")
            .field("task", &self.task)
            .field("path", &self.path)
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("owner", &self.owner)
            .field("sha256", &self.sha256)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

/// The widest mode a file holding a secret may have: read by its owner and group only.
pub const SECRET_FILE_MODE: u32 = 0o640;

#[derive(Debug)]
struct Planned {
    task: String,
    family: String,
    path: String,
    template: String,
    mode: u32,
    owner: Option<String>,
    /// The secrets its template names.
    secrets: BTreeSet<String>,
}

/// Compiled templates for every file of every enabled task.
pub struct Renderer {
    env: Environment<'static>,
    files: Vec<Planned>,
}

impl Renderer {
    /// Compiles every template; `read_template` reads a user template by its host path.
    pub fn new(
        settings: &Settings,
        read_template: &dyn Fn(&str) -> anyhow::Result<String>,
    ) -> anyhow::Result<Renderer> {
        let mut sources = Vec::new();
        let mut formats = BTreeMap::new();
        for task in settings.enabled_tasks() {
            for (path, file) in &settings.tasks[task.name].files {
                let at = || format!("tasks.{}.files.{path:?}", task.name);
                let source = match file.template.strip_prefix(BUILTIN_PREFIX) {
                    Some(name) => builtin_template(name)
                        .map(str::to_string)
                        .with_context(at)?,
                    None => read_template(&file.template).with_context(|| {
                        format!("{}: cannot read template {}", at(), file.template)
                    })?,
                };
                formats.insert(path.clone(), file.format(path));
                sources.push((
                    Planned {
                        task: task.name.to_string(),
                        family: task.family.to_string(),
                        path: path.clone(),
                        template: file.template.clone(),
                        mode: file.mode.bits(),
                        owner: file.owner.clone(),
                        secrets: BTreeSet::new(),
                    },
                    source,
                ));
            }
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_formatter(escape_for_format);
        // Templates are registered under the file they produce, so escaping follows the
        // file's format. The callback must be in place before templates compile.
        env.set_auto_escape_callback(move |name| match formats.get(name) {
            Some(Format::Json) => AutoEscape::Json,
            Some(Format::Yaml) => AutoEscape::Custom("yaml"),
            Some(Format::Shell) => AutoEscape::Custom("shell"),
            Some(Format::Text) | None => AutoEscape::None,
        });
        let mut files = Vec::new();
        for (mut planned, source) in sources {
            env.add_template_owned(planned.path.clone(), source)
                .map_err(|e| {
                    anyhow!(
                        "template {} for {} does not compile: {e:#}",
                        planned.template,
                        planned.path
                    )
                })?;
            planned.secrets = secrets_used(&env, &planned, settings)?;
            files.push(planned);
        }
        for name in settings.secrets.keys() {
            if !files.iter().any(|f| f.secrets.contains(name)) {
                anyhow::bail!("secrets.{name} is used by no template: use it as {{{{ secrets.{name} }}}} in a file's template, or remove it");
            }
        }
        Ok(Renderer { env, files })
    }

    /// Renders every file; `secrets`: their values by name (only the files that name them
    /// see them).
    pub fn render(
        &self,
        ctx: &Context<'_>,
        secrets: &BTreeMap<&str, &str>,
    ) -> anyhow::Result<Vec<RenderedFile>> {
        self.files
            .iter()
            .map(|f| {
                let template = self.env.get_template(&f.path)?;
                let task = minijinja::context! { name => f.task, family => f.family };
                let base = Value::from_serialize(ctx);
                let rendered = if f.secrets.is_empty() {
                    template.render(minijinja::context! { task, ..base })
                } else {
                    let mine: BTreeMap<&str, &str> = secrets
                        .iter()
                        .filter(|(n, _)| f.secrets.contains(**n))
                        .map(|(n, v)| (*n, *v))
                        .collect();
                    let secrets = Value::from_serialize(&mine);
                    template.render(minijinja::context! { task, secrets, ..base })
                };
                // A template error may quote what it rendered: never a secret's file's.
                let contents = Zeroizing::new(
                    rendered
                        .map_err(|e| {
                            if f.secrets.is_empty() {
                                anyhow!("{e:#}")
                            } else {
                                anyhow!("{} (line {})", e.kind(), e.line().unwrap_or_default())
                            }
                        })
                        .with_context(|| format!("rendering {} from {}", f.path, f.template))?,
                );
                Ok(RenderedFile {
                    task: f.task.clone(),
                    path: f.path.clone(),
                    mode: f.mode,
                    owner: f.owner.clone(),
                    sha256: sha256_hex(contents.as_bytes()),
                    contents,
                    secrets: f.secrets.iter().cloned().collect(),
                })
            })
            .collect()
    }
}

/// The secrets `f`'s template names; each must be configured, and the file no wider than
/// [`SECRET_FILE_MODE`].
fn secrets_used(
    env: &Environment<'static>,
    f: &Planned,
    settings: &Settings,
) -> anyhow::Result<BTreeSet<String>> {
    let template = env.get_template(&f.path)?;
    let names = template.undeclared_variables(true);
    let mut used = BTreeSet::new();
    for name in &names {
        if name == "secrets" {
            // The whole table (`secrets[x]`, a loop): every secret.
            used.extend(settings.secrets.keys().cloned());
        } else if let Some(secret) = name.strip_prefix("secrets.") {
            let secret = secret.split('.').next().unwrap_or_default();
            if !settings.secrets.contains_key(secret) {
                anyhow::bail!(
                    "template {} for {} uses secrets.{secret}, which is not configured: add [secrets.{secret}] with its `from`",
                    f.template,
                    f.path
                );
            }
            used.insert(secret.to_string());
        }
    }
    if !used.is_empty() && f.mode & !SECRET_FILE_MODE != 0 {
        anyhow::bail!(
            "tasks.{}.files.{:?}: mode {:04o} would let others read the secrets it holds ({}); use 0640 or narrower, and an `owner` the task's user is",
            f.task,
            f.path,
            f.mode,
            used.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(used)
}

/// Checks that a one-line template (a health-check URL) compiles.
pub fn compile_value(source: &str) -> anyhow::Result<()> {
    Environment::new()
        .template_from_str(source)
        .map(|_| ())
        .map_err(|e| anyhow!("{source:?} does not compile: {e:#}"))
}

/// Renders a one-line template (a health-check URL) with no escaping, strict undefined.
pub fn render_value(source: &str, ctx: &Context<'_>) -> anyhow::Result<String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.render_str(source, Value::from_serialize(ctx))
        .map_err(|e| anyhow!("{source:?}: {e:#}"))
}

fn builtin_template(name: &str) -> anyhow::Result<&'static str> {
    BUILTIN_TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, source)| *source)
        .ok_or_else(|| {
            let known: Vec<&str> = BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect();
            anyhow!(
                "no built-in template {name:?} (built-in: {})",
                known.join(", ")
            )
        })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn escape_for_format(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    if value.is_safe() {
        return out
            .write_str(value.as_str().unwrap_or_default())
            .map_err(Error::from);
    }
    let text = match state.auto_escape() {
        AutoEscape::Custom("yaml") => yaml_literal(value)?,
        AutoEscape::Custom("shell") => shell_words(value)?,
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(&text).map_err(Error::from)
}

/// JSON is valid YAML flow syntax. YAML 1.1 also breaks lines at U+0085/U+2028/U+2029, which
/// JSON leaves raw, so those are escaped too, and so are the spaces right before them (libyaml
/// folds white space before a line break even when the break is escaped).
fn yaml_literal(value: &Value) -> Result<String, Error> {
    let json = serde_json::to_string(value).map_err(|e| {
        Error::new(ErrorKind::BadSerialization, "cannot write as YAML").with_source(e)
    })?;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        let escape = match c {
            '\u{85}' => "\\x85",
            '\u{2028}' => "\\u2028",
            '\u{2029}' => "\\u2029",
            _ => {
                out.push(c);
                continue;
            }
        };
        let spaces = out.len() - out.trim_end_matches(' ').len();
        out.truncate(out.len() - spaces);
        out.push_str(&"\\x20".repeat(spaces));
        out.push_str(escape);
    }
    Ok(out)
}

/// A string becomes one shell word; a list becomes one word per item.
fn shell_words(value: &Value) -> Result<String, Error> {
    let word = |v: &Value| -> Result<String, Error> {
        match v.kind() {
            ValueKind::Number | ValueKind::Bool => Ok(v.to_string()),
            ValueKind::String => shlex::try_quote(v.as_str().unwrap_or_default())
                .map(|q| q.into_owned())
                .map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("cannot quote for the shell: {e}"),
                    )
                }),
            kind => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("a {kind} cannot be written into a shell file; pick a field or join it"),
            )),
        }
    };
    if matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable) {
        let words: Result<Vec<String>, Error> = value.try_iter()?.map(|v| word(&v)).collect();
        return Ok(words?.join(" "));
    }
    word(value)
}

mod write;
pub use write::{context, read_text, render_files};

#[cfg(test)]
mod tests;
