//! Rendering against the built-in and user templates: the old script's files, hostile values
//! in every format, undefined names.

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
    let ctx = context(settings, &facts, &servers, None);
    Renderer::new(settings, read)
        .unwrap()
        .render(&ctx, &BTreeMap::new())
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
        start.contents.as_str(),
        "#!/bin/sh\nexec /bin/registrator -ip 10.0.1.7 -retry-attempts -1 consul://10.0.1.7:8500\n"
    );
    let linkerd: serde_yaml::Value =
        serde_yaml::from_str(&files["/etc/linkerd/linkerd.yaml"].contents).unwrap();
    let old = include_str!("../../tests/data/old-linkerd.yaml")
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
    let yaml: serde_yaml::Value = serde_yaml::from_str(&files["/opt/x/out.yml"].contents).unwrap();
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
    let ctx = context(&settings, &facts, &[], None);
    let read = |_: &str| Ok("{{ vars.missing }}".to_string());
    let err = Renderer::new(&settings, &read)
        .unwrap()
        .render(&ctx, &BTreeMap::new())
        .unwrap_err();
    assert!(format!("{err:#}").contains("/opt/x/a.json"), "{err:#}");
}

#[test]
fn secrets_reach_only_the_files_that_name_them() {
    let settings = from_fragments(&[Fragment::file(
        "test",
        "[secrets.gossip]\nfrom = \"ssm:/g\"\n\
         [tasks.linkerd.files.\"/opt/x/s.json\"]\ntemplate = \"/etc/nodeagent/s\"\nmode = \"0600\"\n\
         [tasks.linkerd.files.\"/opt/x/peek.json\"]\ntemplate = \"/etc/nodeagent/peek\"\nmode = \"0644\"\n",
    )])
    .unwrap();
    let read = |p: &str| -> anyhow::Result<String> {
        Ok(match p {
            "/etc/nodeagent/s" => "{\"k\": {{ secrets.gossip }}}".into(),
            _ => "{\"peek\": {{ cluster }}}".into(),
        })
    };
    let renderer = Renderer::new(&settings, &read).unwrap();
    // Naming the whole table is using every secret: not in a 0644 file.
    let peek = |p: &str| -> anyhow::Result<String> {
        Ok(match p {
            "/etc/nodeagent/s" => "{\"k\": {{ secrets.gossip }}}".into(),
            _ => "{\"peek\": {{ secrets is defined }}}".into(),
        })
    };
    let err = Renderer::new(&settings, &peek).err().unwrap();
    assert!(
        format!("{err:#}").contains("peek.json\": mode 0644"),
        "{err:#}"
    );
    let facts = facts();
    let ctx = context(&settings, &facts, &[], None);
    let secrets = BTreeMap::from([("gossip", "s3cr\"et")]);
    let files: BTreeMap<String, RenderedFile> = renderer
        .render(&ctx, &secrets)
        .unwrap()
        .into_iter()
        .map(|f| (f.path.clone(), f))
        .collect();
    let s: serde_json::Value = serde_json::from_str(&files["/opt/x/s.json"].contents).unwrap();
    assert_eq!(s["k"], "s3cr\"et");
    assert_eq!(files["/opt/x/s.json"].secrets, vec!["gossip".to_string()]);
    assert_eq!(
        files["/opt/x/peek.json"].contents.as_str(),
        format!("{{\"peek\": \"{}\"}}", settings.cluster).as_str()
    );
    assert!(files["/opt/x/peek.json"].secrets.is_empty());
    assert!(!format!("{:?}", files["/opt/x/s.json"]).contains("s3cr"));
}
