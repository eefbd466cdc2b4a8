//! The shipped IAM policy (`packaging/iam-policy.json`) grants exactly the AWS operations the
//! code calls: each SDK call site (`.client.<operation>(` in the boundary modules) and each
//! operation name the call accounting records must be in the policy, and the policy must grant
//! nothing else. Every ECS action is scoped to the cluster (`ecs:cluster`) and to the
//! resources it acts on, as narrowly as ECS authorizes it: the container instances and tasks
//! of the cluster, and for `StartTask` only the task definitions of the built-in
//! configuration's families. Optional statements (`Sid` starting `Optional`: the secrets) are
//! what a configuration with `[secrets]` needs: each scoped by resource, never `*`; their
//! `kms:Decrypt` is no SDK call of nodeagent's but what SSM and Secrets Manager do on its
//! behalf when they decrypt.

use std::collections::BTreeSet;

use crate::support;

/// `describe_auto_scaling_instances` → `DescribeAutoScalingInstances`.
fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Actions no SDK call of nodeagent's names, granted because a service performs them on its
/// behalf: the decrypt of a SecureString parameter or a secret.
const IMPLIED: &[&str] = &["kms:Decrypt"];

/// The operations each boundary module calls through its SDK clients (`.client.op(`, or
/// `.ssm.op(` where a module holds several clients).
fn called() -> BTreeSet<String> {
    let mut ops = BTreeSet::new();
    for (file, client, service) in [
        ("src/ec2.rs", ".client.", "ec2"),
        ("src/ecs.rs", ".client.", "ecs"),
        ("src/asg.rs", ".client.", "autoscaling"),
        ("src/secrets/sdk.rs", ".ssm.", "ssm"),
        ("src/secrets/sdk.rs", ".secretsmanager.", "secretsmanager"),
    ] {
        let text = std::fs::read_to_string(support::repo().join(file)).unwrap();
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join("");
        for part in flat.split(client).skip(1) {
            let op: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if part[op.len()..].starts_with('(') && !op.is_empty() {
                ops.insert(format!("{service}:{}", pascal(&op)));
            }
        }
    }
    ops
}

/// The operation names the call accounting records (`"ecs:StartTask"` constants in `src/`).
fn recorded() -> BTreeSet<String> {
    let mut ops = BTreeSet::new();
    let mut dirs = vec![support::repo().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for piece in text.split('"').skip(1).step_by(2) {
                let known = ["ec2:", "ecs:", "autoscaling:", "ssm:", "secretsmanager:"];
                let is_op = known.iter().any(|k| piece.starts_with(k))
                    && piece.split(':').nth(1).is_some_and(|op| {
                        op.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                            && op.chars().all(|c| c.is_ascii_alphanumeric())
                    });
                if is_op {
                    ops.insert(piece.to_string());
                }
            }
        }
    }
    ops
}

/// A statement's `Resource`, as a list.
fn resources(statement: &serde_json::Value) -> Vec<String> {
    match &statement["Resource"] {
        serde_json::Value::String(r) => vec![r.clone()],
        serde_json::Value::Array(rs) => {
            rs.iter().map(|r| r.as_str().unwrap().to_string()).collect()
        }
        other => panic!("no Resource: {other}"),
    }
}

/// The resources an ECS action of nodeagent's may act on: the resource type ECS authorizes it
/// on (the Service Authorization Reference), within the cluster.
fn ecs_scope(action: &str) -> Option<Vec<String>> {
    const ECS: &str = "arn:aws:ecs:REGION:ACCOUNT_ID";
    let one = |r: &str| Some(vec![format!("{ECS}:{r}")]);
    match action {
        "ecs:ListTasks"
        | "ecs:PutAttributes"
        | "ecs:DeleteAttributes"
        | "ecs:UpdateContainerInstancesState" => one("container-instance/CLUSTER_NAME/*"),
        "ecs:DescribeTasks" | "ecs:StopTask" => one("task/CLUSTER_NAME/*"),
        // Only the families nodeagent starts, any revision (a pinned `family:N` among them).
        "ecs:StartTask" => Some(
            default_families()
                .iter()
                .map(|f| format!("{ECS}:task-definition/{f}:*"))
                .collect(),
        ),
        _ => None,
    }
}

/// The ECS families of the built-in configuration's tasks, sorted.
fn default_families() -> Vec<String> {
    let text = std::fs::read_to_string(support::repo().join("src/config/defaults.toml")).unwrap();
    let defaults: toml::Table = toml::from_str(&text).unwrap();
    let mut families: Vec<String> = defaults["tasks"]
        .as_table()
        .unwrap()
        .values()
        .filter_map(|t| t.get("family")?.as_str().map(str::to_string))
        .collect();
    families.sort();
    assert_eq!(families.len(), 3, "{families:?}");
    families
}

#[test]
fn the_policy_grants_exactly_what_the_code_calls() {
    let text = std::fs::read_to_string(support::repo().join("packaging/iam-policy.json")).unwrap();
    let policy: serde_json::Value = serde_json::from_str(&text).expect("the policy is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let mut granted = BTreeSet::new();
    let mut optional = BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow", "{statement}");
        let is_optional = statement["Sid"]
            .as_str()
            .is_some_and(|s| s.starts_with("Optional"));
        let actions = statement["Action"].as_array().unwrap();
        for action in actions {
            let action = action.as_str().unwrap();
            assert!(!action.contains('*'), "no wildcard actions: {action}");
            assert!(granted.insert(action.to_string()), "{action} granted twice");
            let secrets = ["ssm:", "secretsmanager:", "kms:"];
            assert_eq!(
                is_optional,
                secrets.iter().any(|p| action.starts_with(p)),
                "the secrets' actions, and only they, are optional statements: {statement}"
            );
            if is_optional {
                optional.insert(action.to_string());
                let scoped = resources(statement)
                    .iter()
                    .all(|r| r.starts_with("arn:aws:") && !r.ends_with(":*") && r != "*");
                assert!(scoped, "{action} is scoped by resource: {statement}");
            }
            if action.starts_with("ecs:") {
                assert!(
                    statement["Condition"]["ArnEquals"]["ecs:cluster"]
                        .as_str()
                        .is_some_and(|c| c.ends_with(":cluster/CLUSTER_NAME")),
                    "{action} is scoped to the cluster: {statement}"
                );
                let scope = ecs_scope(action)
                    .unwrap_or_else(|| panic!("{action}: which resources does it act on?"));
                assert_eq!(resources(statement), scope, "{action}: {statement}");
            }
        }
    }
    let called = called();
    let recorded = recorded();
    assert!(
        called.len() >= 12,
        "the scan finds the call sites: {called:?}"
    );
    assert_eq!(
        called, recorded,
        "every SDK call is accounted under its operation name"
    );
    assert_eq!(
        optional,
        BTreeSet::from(
            [
                "ssm:GetParameters",
                "secretsmanager:GetSecretValue",
                "kms:Decrypt"
            ]
            .map(String::from)
        ),
        "exactly the secrets' reads and their decrypt are optional"
    );
    let granted: BTreeSet<String> = granted
        .into_iter()
        .filter(|a| !IMPLIED.contains(&a.as_str()))
        .collect();
    let missing: Vec<&String> = called.difference(&granted).collect();
    let unused: Vec<&String> = granted.difference(&called).collect();
    assert!(
        missing.is_empty() && unused.is_empty(),
        "the policy lacks {missing:?} and grants {unused:?}, which the code never calls"
    );
}
