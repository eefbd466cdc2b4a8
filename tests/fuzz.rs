//! Property tests (proptest, bounded: 256 cases each, 64 where a shell runs) of what reads
//! hostile input: instance tags and user-data through the configuration pipeline, ecs.config
//! merging, templates given hostile metadata values, and the drain request's parameter.
//! A failure prints the smallest input that breaks the property; `PROPTEST_CASES` runs more.

use nodeagent::config::trust::{refusal, Layer};
use nodeagent::config::{from_layers, Fragment, TAG_PREFIX};
use nodeagent::facts::InstanceFacts;
use nodeagent::render::{ConsulContext, Context, EcsContext, Renderer};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// `n` cases (`PROPTEST_CASES` wins), no failure files written into the source tree: a
/// failure prints its smallest input.
fn cases(n: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Dotted keys an attacker would try, real ones among them.
fn tag_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("cluster".to_string()),
        Just("runtime".to_string()),
        Just("consul.datacenter".to_string()),
        Just("consul.api".to_string()),
        Just("tasks.linkerd.container.command".to_string()),
        Just("tasks.linkerd.family".to_string()),
        Just("tasks.consul-agent.dirs".to_string()),
        Just("ecs.config_path".to_string()),
        Just("ecs.config.ECS_X".to_string()),
        Just("metrics.listen".to_string()),
        Just("trust.paths".to_string()),
        Just("supervision.ready_timeout".to_string()),
        Just("lifecycle.drain_tasks_timeout".to_string()),
        "vars\\.[a-z_]{1,8}",
        "[a-z_.\"/*-]{0,24}",
    ]
}

/// Tag values: TOML-looking, path-looking, or anything.
fn tag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("true".to_string()),
        Just("30".to_string()),
        Just("[\"/:/host\"]".to_string()),
        Just("\"5m\"".to_string()),
        Just("{ a = 1 }".to_string()),
        "[a-z0-9-]{1,12}",
        "\\PC{0,40}",
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    /// A tag never stops the boot, and nothing a tag may not set is ever taken from one.
    #[test]
    fn tags_never_stop_the_boot_nor_set_what_tags_may_not(
        tags in proptest::collection::vec((tag_key(), tag_value()), 0..6)
    ) {
        let loaded = from_layers(&[], &tags).expect("a tag never makes the configuration invalid");
        for (key, origin) in &loaded.origins {
            if origin.starts_with("instance tag ") {
                prop_assert_eq!(refusal(Layer::Tag, key, &[]), None, "{} from {}", key, origin);
            }
        }
        let tag_layer = format!("instance tag {TAG_PREFIX}");
        for ignored in &loaded.ignored {
            prop_assert!(ignored.layer.starts_with(&tag_layer), "{:?}", ignored);
        }
        // Errors never repeat a value (one long enough to be told apart from the message).
        for (_, value) in tags.iter().filter(|(_, v)| v.len() >= 10) {
            for ignored in &loaded.ignored {
                prop_assert!(!ignored.why.contains(value.as_str()), "{:?}", ignored);
            }
        }
    }

    /// User-data, whatever it holds, is read or refused with an error — never a panic — and
    /// never sets `trust.*` or what the image locks.
    #[test]
    fn user_data_never_sets_trust_or_locked_keys(
        body in prop_oneof![
            "\\PC{0,200}",
            Just("[nodeagent.trust]\npaths = [\"/\"]\n".to_string()),
            Just("[nodeagent.tasks.linkerd.container]\nimage = \"evil\"\n".to_string()),
            Just("[nodeagent]\ncluster = \"ud\"\n[nodeagent.tasks.x]\nfamily = \"y\"\n".to_string()),
        ],
        junk in "\\PC{0,40}",
    ) {
        let text = format!("{junk}\n{body}");
        let file = Fragment::file("/etc/nodeagent/nodeagent.toml", "[trust]\nlocked = [\"tasks.*.container\"]\n");
        let mut fragments = vec![file];
        fragments.extend(Fragment::user_data(&text));
        if let Ok(loaded) = from_layers(&fragments, &[]) {
            for (key, origin) in &loaded.origins {
                if origin == "EC2 user-data" {
                    prop_assert!(!key.starts_with("trust."), "{}", key);
                    prop_assert!(!(key.starts_with("tasks.") && key.contains(".container.")), "{}", key);
                }
            }
        }
    }

    /// ecs.config: each managed key exactly once, every other line kept in order, and merging
    /// again changes nothing.
    #[test]
    fn ecs_config_merge_is_exact_and_idempotent(
        existing in proptest::collection::vec(
            prop_oneof![
                "[A-Z_]{1,8}=[ -~]{0,12}",
                "#[ -~]{0,12}",
                "[ -~]{0,16}",
                Just(String::new()),
            ],
            0..12,
        ),
        managed in proptest::collection::btree_map("[A-Z_]{1,8}", "[ -~&&[^\\n]]{0,12}", 0..5),
    ) {
        let existing = existing.join("\n");
        let managed: Vec<(String, String)> = managed.into_iter().collect();
        let once = nodeagent::ecs_config::merge(&existing, &managed);
        prop_assert_eq!(&nodeagent::ecs_config::merge(&once, &managed), &once);
        for (key, value) in &managed {
            let lines: Vec<&str> = once
                .lines()
                .filter(|l| l.trim_start().split_once('=').is_some_and(|(k, _)| k.trim_end() == key))
                .collect();
            let expected = format!("{key}={value}");
            prop_assert_eq!(lines, vec![expected.as_str()]);
        }
        let kept: Vec<&str> = existing
            .lines()
            .filter(|l| !managed.iter().any(|(k, _)| l.trim_start().split_once('=').is_some_and(|(lk, _)| lk.trim_end() == k)))
            .collect();
        let out: Vec<&str> = once
            .lines()
            .filter(|l| !managed.iter().any(|(k, _)| l.trim_start().split_once('=').is_some_and(|(lk, _)| lk.trim_end() == k)))
            .collect();
        prop_assert_eq!(kept, out);
    }

    /// The drain parameter: any query is parsed or refused, never more than a day.
    #[test]
    fn drain_parameters_are_bounded(query in "\\PC{0,40}", secs in any::<u64>()) {
        for q in [query.clone(), format!("tasks_timeout={secs}"), format!("tasks_timeout={query}")] {
            if let Ok(Some(d)) = nodeagent::status::server::drain_timeout(&q) {
                prop_assert!(d.as_secs() <= 24 * 3600);
            }
        }
    }
}

/// Whether `value` is one of the document's strings.
fn holds(doc: &serde_yaml::Value, value: &str) -> bool {
    match doc {
        serde_yaml::Value::String(s) => s == value,
        serde_yaml::Value::Sequence(items) => items.iter().any(|v| holds(v, value)),
        serde_yaml::Value::Mapping(m) => m.values().any(|v| holds(v, value)),
        _ => false,
    }
}

fn facts(value: &str) -> InstanceFacts {
    InstanceFacts {
        instance_id: value.to_string(),
        local_ipv4: value.to_string(),
        region: "us-east-1".into(),
        availability_zone: "us-east-1a".into(),
        instance_type: "t3.micro".into(),
        ami_id: "ami-1".into(),
    }
}

/// Renders every file of `config` (a template at /etc/nodeagent/print.sh reads `script`) with
/// `value` as the node's metadata, its Consul datacenter and a Consul server.
fn render(config: &str, script: &str, value: &str) -> BTreeMap<String, String> {
    let settings = nodeagent::config::from_fragments(&[Fragment::file("fuzz.toml", config)])
        .expect("the fuzz configuration is valid");
    let renderer = Renderer::new(&settings, &|_| Ok(script.to_string())).unwrap();
    let facts = facts(value);
    let servers = vec![value.to_string(), "10.0.0.2".to_string()];
    let tag = nodeagent::config::Tag {
        key: "Name".into(),
        value: value.into(),
    };
    let vars = BTreeMap::new();
    let ctx = Context {
        instance: &facts,
        cluster: "c",
        consul: ConsulContext {
            servers: &servers,
            datacenter: value,
            server_tag: &tag,
        },
        ecs: EcsContext {
            container_instance_arn: None,
        },
        vars: &vars,
    };
    renderer
        .render(&ctx, &BTreeMap::new())
        .unwrap()
        .into_iter()
        .map(|f| (f.path, f.contents.to_string()))
        .collect()
}

proptest! {
    #![proptest_config(cases(256))]

    /// A hostile value still makes valid JSON that holds it literally.
    #[test]
    fn json_templates_hold_hostile_values_literally(value in "\\PC{0,40}") {
        let files = render("", "", &value);
        let consul: serde_json::Value =
            serde_json::from_str(&files["/opt/consul/config/consul-agent.json"]).expect("valid JSON");
        prop_assert_eq!(consul["advertise_addr"].as_str(), Some(value.as_str()));
        prop_assert_eq!(consul["datacenter"].as_str(), Some(value.as_str()));
        prop_assert_eq!(consul["node_name"].as_str(), Some(value.as_str()));
        prop_assert_eq!(consul["retry_join"][0].as_str(), Some(value.as_str()));
        // And valid YAML that holds it.
        let linkerd: serde_yaml::Value =
            serde_yaml::from_str(&files["/etc/linkerd/linkerd.yaml"]).expect("valid YAML");
        prop_assert!(holds(&linkerd, &value), "{:?} not in {:?}", value, linkerd);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// In a shell script a hostile value is one word, never a command: sh prints it back.
    #[test]
    fn shell_templates_never_run_a_value(value in prop_oneof![
        "[^\\x00]{0,30}",
        Just("$(touch /tmp/pwned)".to_string()),
        Just("'; touch /tmp/pwned; '".to_string()),
        Just("`id`\n\"".to_string()),
    ]) {
        let config = "[tasks.linkerd.files.\"/opt/fuzz/print.sh\"]\ntemplate = \"/etc/nodeagent/print.sh\"\nmode = \"0755\"\n";
        let files = render(config, "printf '%s|' {{ consul.datacenter }} {{ consul.servers }}\n", &value);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&files["/opt/fuzz/print.sh"])
            .output()
            .unwrap();
        prop_assert!(out.status.success(), "{:?}", out);
        let printed = String::from_utf8_lossy(&out.stdout);
        prop_assert_eq!(printed, format!("{value}|{value}|10.0.0.2|"));
    }
}
