//! Rendering: owns turning the facts and settings into the foundational tasks' config files.
//!
//! Templates are minijinja with strict undefined (a typo is an error, never an empty string).
//! Every interpolated value is escaped for the syntax of the file it lands in — JSON literals in
//! `.json`, YAML double-quoted scalars in `.yaml`, single-quoted words in `.sh` (or the file's
//! `format`) — so a value holding quotes, line breaks or `{{` still yields a valid file that
//! holds the literal value. `|safe` opts a value out.

use crate::config::{Format, Settings, BUILTIN_PREFIX};
use crate::facts::InstanceFacts;
use anyhow::{anyhow, Context as _};
use minijinja::value::ValueKind;
use minijinja::{
    AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior, Value,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The templates compiled into the binary, by their `builtin:` name.
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    (
        "consul-agent.json",
        include_str!("templates/consul-agent.json"),
    ),
    ("linkerd.yaml", include_str!("templates/linkerd.yaml")),
    (
        "registrator-start.sh",
        include_str!("templates/registrator-start.sh"),
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

/// One rendered file, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenderedFile {
    pub task: String,
    pub path: String,
    pub mode: u32,
    /// `tasks.*.files.*.owner` as configured (resolved when the file is written).
    pub owner: Option<String>,
    #[serde(skip)]
    pub contents: String,
    pub sha256: String,
}

#[derive(Debug)]
struct Planned {
    task: String,
    family: String,
    path: String,
    template: String,
    mode: u32,
    owner: Option<String>,
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
        for (planned, source) in sources {
            env.add_template_owned(planned.path.clone(), source)
                .map_err(|e| {
                    anyhow!(
                        "template {} for {} does not compile: {e:#}",
                        planned.template,
                        planned.path
                    )
                })?;
            files.push(planned);
        }
        Ok(Renderer { env, files })
    }

    /// Renders every file.
    pub fn render(&self, ctx: &Context<'_>) -> anyhow::Result<Vec<RenderedFile>> {
        self.files
            .iter()
            .map(|f| {
                let template = self.env.get_template(&f.path)?;
                let task = minijinja::context! { name => f.task, family => f.family };
                let contents = template
                    .render(minijinja::context! { task, ..Value::from_serialize(ctx) })
                    .map_err(|e| anyhow!("{e:#}"))
                    .with_context(|| format!("rendering {} from {}", f.path, f.template))?;
                Ok(RenderedFile {
                    task: f.task.clone(),
                    path: f.path.clone(),
                    mode: f.mode,
                    owner: f.owner.clone(),
                    sha256: sha256_hex(contents.as_bytes()),
                    contents,
                })
            })
            .collect()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_fragments, Fragment};

    fn facts() -> InstanceFacts {
        InstanceFacts {
            instance_id: "i-0123456789abcdef0".into(),
            local_ipv4: "10.0.1.7".into(),
            region: "us-west-1".into(),
            availability_zone: "us-west-1a".into(),
            instance_type: "m4.xlarge".into(),
            ami_id: "ami-7d664a1d".into(),
        }
    }

    fn render(
        settings: &Settings,
        read: &dyn Fn(&str) -> anyhow::Result<String>,
    ) -> BTreeMap<String, RenderedFile> {
        let facts = facts();
        let servers = vec!["10.0.0.5".to_string(), "10.0.0.6".to_string()];
        let ctx = Context {
            instance: &facts,
            cluster: &settings.cluster,
            consul: ConsulContext {
                servers: &servers,
                datacenter: &settings.consul.datacenter,
                server_tag: &settings.consul.server_tag,
            },
            ecs: EcsContext {
                container_instance_arn: None,
            },
            vars: &settings.vars,
        };
        Renderer::new(settings, read)
            .unwrap()
            .render(&ctx)
            .unwrap()
            .into_iter()
            .map(|f| (f.path.clone(), f))
            .collect()
    }

    fn no_files(p: &str) -> anyhow::Result<String> {
        Err(anyhow!("unexpected read of {p}"))
    }

    #[test]
    fn defaults_match_the_old_scripts_files() {
        let settings = from_fragments(&[]).unwrap();
        let files = render(&settings, &no_files);
        let consul: serde_json::Value =
            serde_json::from_str(&files["/opt/consul/config/consul-agent.json"].contents).unwrap();
        assert_eq!(
            consul,
            serde_json::json!({
                "advertise_addr": "10.0.1.7",
                "client_addr": "0.0.0.0",
                "datacenter": "dc1",
                "node_name": "i-0123456789abcdef0",
                "retry_join": ["10.0.0.5", "10.0.0.6"],
            })
        );
        let start = &files["/opt/consul-registrator/bin/start.sh"];
        assert_eq!(start.mode, 0o755);
        assert_eq!(
            start.contents,
            "#!/bin/sh\nexec /bin/registrator -ip 10.0.1.7 -retry-attempts -1 consul://10.0.1.7:8500\n"
        );
        let linkerd: serde_yaml::Value =
            serde_yaml::from_str(&files["/etc/linkerd/linkerd.yaml"].contents).unwrap();
        let old = include_str!("../tests/data/old-linkerd.yaml")
            .replace("${EC2_INSTANCE_IP_ADDRESS}", "10.0.1.7");
        assert_eq!(
            linkerd,
            serde_yaml::from_str::<serde_yaml::Value>(&old).unwrap()
        );
    }

    #[test]
    fn hostile_values_stay_literal_in_every_format() {
        let hostile = "a\"b'c\n{{ x }}$(reboot)`id`\\ \u{2028}end";
        let toml_str = |s: &str| toml::Value::String(s.into()).to_string();
        let settings = from_fragments(&[Fragment::file(
            "test",
            format!(
                "[consul]\ndatacenter = {dc}\n[vars]\nv = {dc}\n\
                 [tasks.linkerd.files.\"/opt/x/out.sh\"]\ntemplate = \"/etc/nodeagent/t/sh\"\nmode = \"0755\"\n\
                 [tasks.linkerd.files.\"/opt/x/out.yml\"]\ntemplate = \"/etc/nodeagent/t/yml\"\nmode = \"0644\"\n",
                dc = toml_str(hostile)
            ),
        )])
        .unwrap();
        let read = |p: &str| -> anyhow::Result<String> {
            Ok(match p {
                "/etc/nodeagent/t/sh" => "#!/bin/sh\nprintf '%s' {{ vars.v }}\n".into(),
                _ => "v: {{ vars.v }}\nlist: {{ consul.servers }}\n".into(),
            })
        };
        let files = render(&settings, &read);
        let consul: serde_json::Value =
            serde_json::from_str(&files["/opt/consul/config/consul-agent.json"].contents).unwrap();
        assert_eq!(consul["datacenter"], hostile);
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&files["/opt/x/out.yml"].contents).unwrap();
        assert_eq!(yaml["v"].as_str(), Some(hostile));
        let linkerd: serde_yaml::Value =
            serde_yaml::from_str(&files["/etc/linkerd/linkerd.yaml"].contents).unwrap();
        assert_eq!(
            linkerd["routers"][0]["dtab"].as_str().unwrap(),
            format!("/svc => /#/io.l5d.consul/{hostile};\n")
        );
        let sh = &files["/opt/x/out.sh"].contents;
        let words = shlex::split(sh.strip_prefix("#!/bin/sh\n").unwrap()).unwrap();
        assert_eq!(words, vec!["printf", "%s", hostile]);
    }

    #[test]
    fn undefined_variables_are_errors() {
        let settings = from_fragments(&[Fragment::file(
            "test",
            "[tasks.linkerd.files.\"/opt/x/a.json\"]\ntemplate = \"/etc/nodeagent/t\"\nmode = \"0644\"\n",
        )])
        .unwrap();
        let facts = facts();
        let ctx = Context {
            instance: &facts,
            cluster: "c",
            consul: ConsulContext {
                servers: &[],
                datacenter: "dc1",
                server_tag: &settings.consul.server_tag,
            },
            ecs: EcsContext {
                container_instance_arn: None,
            },
            vars: &settings.vars,
        };
        let read = |_: &str| Ok("{{ vars.missing }}".to_string());
        let err = Renderer::new(&settings, &read)
            .unwrap()
            .render(&ctx)
            .unwrap_err();
        assert!(format!("{err:#}").contains("/opt/x/a.json"), "{err:#}");
    }
}
