//! `nodeagent config check`: validates a configuration without the node or AWS (exit 0 / 2).

use std::path::Path;
use std::process::{Command, Output};

fn check(root: &Path, config: &str) -> Output {
    let path = root.join("nodeagent.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_nodeagent"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .arg("--root")
        .arg(root)
        // Nothing may be asked of IMDS or AWS.
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

#[test]
fn good_configurations_pass() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc/nodeagent")).unwrap();
    std::fs::write(
        root.path().join("etc/nodeagent/mine.yaml"),
        "dc: {{ consul.datacenter }}\n",
    )
    .unwrap();
    for config in [
        "",
        "cluster = \"prod\"\n[tasks.linkerd]\nenabled = false\n",
        "runtime = \"docker\"\n[ecs]\njoin = false\n\
         [tasks.linkerd.files.\"/etc/linkerd/mine.yaml\"]\ntemplate = \"/etc/nodeagent/mine.yaml\"\nmode = \"0600\"\n",
    ] {
        let out = check(root.path(), config);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{config:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.starts_with("configuration OK:"), "{stdout}");
    }
}

#[test]
fn the_shipped_configuration_passes() {
    let root = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/nodeagent.toml"),
    )
    .unwrap();
    let out = check(root.path(), &shipped);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broken_configurations_exit_2_each_with_its_own_message() {
    let root = tempfile::tempdir().unwrap();
    let templates = root.path().join("etc/nodeagent");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(
        templates.join("broken.json"),
        "{ \"a\": {{ instance.local_ipv4 }\n",
    )
    .unwrap();
    let user_file = |template: &str| {
        format!("[tasks.linkerd.files.\"/etc/linkerd/x.json\"]\ntemplate = \"{template}\"\nmode = \"0644\"\n")
    };
    let cases: Vec<(String, &str)> = vec![
        ("cluster = \"a\"\n[consul\n".into(), "nodeagent.toml:2:"),
        ("[consul]\ndatacentre = \"x\"\n".into(), "nodeagent.toml:2:1: unknown field `datacentre`"),
        ("[tasks.linkerd]\nenabled = \"no\"\n".into(), "nodeagent.toml:2:11: invalid type"),
        ("[tasks.linkerd]\ndepends_on = [\"nope\"]\n".into(), "\"nope\", which is not an enabled task"),
        ("[tasks.consul-agent]\ndepends_on = [\"linkerd\"]\n".into(), "depend on each other in a cycle"),
        ("[tasks.linkerd.files.\"etc/x.yaml\"]\ntemplate = \"builtin:linkerd.yaml\"\nmode = \"0644\"\n".into(), "the key must be an absolute file path"),
        ("[tasks.linkerd.files.\"/etc/linkerd/linkerd.yaml\"]\nmode = \"rw-r--r--\"\n".into(), "expected octal permission bits"),
        (user_file("/etc/nodeagent/broken.json"), "does not compile"),
        (user_file("/etc/nodeagent/missing.json"), "cannot read template /etc/nodeagent/missing.json"),
        (user_file("builtin:nope.json"), "no built-in template \"nope.json\""),
        (user_file("relative.json"), "expected \"builtin:NAME\" or an absolute path"),
        ("cluster = \"my cluster\"\n".into(), "an ECS cluster name is"),
        ("[ecs.config]\nECS_X = \"a\\nECS_CLUSTER=evil\"\n".into(), "contains a control character"),
        ("[tasks.linkerd.health]\ntcp = \"127.0.0.1:9990\"\n".into(), "set one of `http` or `tcp`"),
        ("[tasks.linkerd.health]\nhttp = \"http://{{ instance.local_ipv4 :9990/\"\n".into(), "tasks.linkerd.health"),
        ("runtime = \"docker\"\n[tasks.linkerd.container]\nimage = \"\"\n".into(), "container.image is empty"),
        ("runtime = \"docker\"\n[tasks.linkerd.container]\nmounts = [\"relative:/x\"]\n".into(), "is not \"/host/path:/container/path[:ro]\""),
        ("[ecs]\njoin = false\n".into(), "ecs.join = false needs runtime = \"docker\""),
        ("[supervision]\nbackoff_initial = \"1m\"\nbackoff_max = \"1s\"\n".into(), "backoff_initial must be > 0 and <= backoff_max"),
        ("[status]\nsocket = \"run/nodeagent.sock\"\n".into(), "status.socket = \"run/nodeagent.sock\" must be an absolute file path"),
        ("[metrics]\nlisten = \"9113\"\n".into(), "expected ADDRESS:PORT such as \"127.0.0.1:9113\""),
    ];
    assert!(cases.len() >= 10);
    let mut messages = std::collections::BTreeSet::new();
    for (config, expected) in &cases {
        let out = check(root.path(), config);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{config:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{config:?}: expected {expected:?} in {stderr}"
        );
        messages.insert(stderr);
    }
    assert_eq!(messages.len(), cases.len(), "each case has its own message");
}

#[test]
fn conf_d_fragments_are_read_in_order_and_located() {
    let root = tempfile::tempdir().unwrap();
    let conf_d = root.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::write(conf_d.join("20-later.toml"), "cluster = \"from-20\"\n").unwrap();
    std::fs::write(conf_d.join("10-first.toml"), "cluster = \"from-10\"\n").unwrap();
    std::fs::write(conf_d.join("README"), "not toml, not read").unwrap();
    let out = check(root.path(), "cluster = \"from-main\"\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cluster from-20"), "{stdout}");

    std::fs::write(conf_d.join("30-typo.toml"), "\n[ecs]\njion = true\n").unwrap();
    let out = check(root.path(), "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let at = format!(
        "{}:3:1: unknown field `jion`",
        conf_d.join("30-typo.toml").display()
    );
    assert!(stderr.contains(&at), "{stderr}");
}
