#!/usr/bin/env bash
# The AMI build and its example, checked without AWS: `packer fmt -check` of ami/, `packer
# validate` of ami/nodeagent.pkr.hcl (Debian's packer 1.6.6, in a network namespace of its own:
# validating needs no network and no credentials) for both architectures and both AMI
# choices; `cfn-lint` on the CloudFormation example; the example's inline policy equal to
# packaging/iam-policy.json once its !Sub expressions are put back as the placeholders, and its
# user-data a [nodeagent] TOML document naming the group's lifecycle hook. Installs Debian's
# packer when missing, and cfn-lint (pinned, from PyPI) into its own venv beside the test
# world's.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "ami.sh: $*" >&2; }

CFN_LINT_REQ='cfn-lint==1.58.0'
PYTHON="${PYTHON:-python3}"
HOME_DIR="${NODEAGENT_WORLD_HOME:-$HOME/.cache/nodeagent-world}"
VENV="$HOME_DIR/cfn-lint-venv"
CFN_LINT="$VENV/bin/cfn-lint"
STAMP="$VENV/.nodeagent-stamp"
TEMPLATE=ami/nodeagent.pkr.hcl
EXAMPLE=ami/examples/nodeagent-asg.yaml

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; }
}
if ! command -v packer >/dev/null 2>&1; then
  log "installing Debian's packer"
  apt_install packer
fi

# Shows the command and its output; a failure ends the script with the command's status.
run() {
  printf '$'; printf ' %q' "$@"; echo
  local status=0
  "$@" 2>&1 || status=$?
  [ "$status" = 0 ] || { log "failed (exit $status): $*"; exit "$status"; }
}

export CHECKPOINT_DISABLE=1   # no version check against HashiCorp (Debian's default too)
echo "== $(packer version | head -n1)"

echo "== packer fmt -check ami/"
run packer fmt -check -diff ami/

# The file provisioner's source must exist when validating: an empty stand-in for the RPM.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$WORK/nodeagent.rpm"

# ami/ as a directory holds plugins.pkr.hcl, whose `packer { required_plugins }` 1.6.6 does not
# know: the template is validated alone. unshare --net: no network at all while validating.
echo "== packer validate $TEMPLATE"
run unshare --net packer validate -var region=us-east-1 -var rpm="$WORK/nodeagent.rpm" "$TEMPLATE"
echo "valid: x86_64, newest ECS-optimized AL2023 AMI (source_ami_filter), no extra_config"
run unshare --net packer validate -var region=eu-west-1 -var arch=arm64 \
  -var source_ami=ami-0123456789abcdef0 -var rpm="$WORK/nodeagent.rpm" \
  -var 'extra_config=[lifecycle]
drain_on_rebalance = true' "$TEMPLATE"
echo "valid: arm64, a given source_ami (no filter), extra_config"
# The template's own checks answer too: a wrong architecture is refused.
if out=$(unshare --net packer validate -var region=us-east-1 -var arch=aarch64 \
  -var rpm="$WORK/nodeagent.rpm" "$TEMPLATE" 2>&1); then
  echo "$out"; log "packer validate accepted arch=aarch64"; exit 1
fi
grep -q "The arch must be x86_64 or arm64" <<<"$out" ||
  { echo "$out"; log "arch=aarch64 refused for another reason"; exit 1; }
echo "refused as it should be: arch=aarch64 (\"The arch must be x86_64 or arm64\")"

# cfn-lint in its own venv, made once (setup.sh's way; python3-venv from Debian if needed).
ready() {
  [ -x "$CFN_LINT" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$CFN_LINT_REQ" ] &&
    "$CFN_LINT" --version >/dev/null 2>&1
}
if ! ready; then
  mkdir -p "$HOME_DIR"
  exec 9>"$HOME_DIR/.cfn-lint.lock"
  flock 9
  if ! ready; then
    log "creating $VENV with $CFN_LINT_REQ"
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" >&2; then
      log "venv creation failed; installing python3-venv"
      apt_install python3-venv
      rm -rf "$VENV"
      "$PYTHON" -m venv "$VENV" >&2
    fi
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "$CFN_LINT_REQ" >&2
    echo "$CFN_LINT_REQ" >"$STAMP"
  fi
  exec 9>&-
fi

echo "== cfn-lint $EXAMPLE ($("$CFN_LINT" --version 2>&1))"
# Any finding — error, warning or informational — fails (cfn-lint exits non-zero for each).
run "$CFN_LINT" --include-checks I -- "$EXAMPLE"
echo "clean"

echo "== $EXAMPLE: instance policy = packaging/iam-policy.json; user-data names the hook"
# The venv's python: PyYAML comes with cfn-lint, tomllib with Python >= 3.11 (Debian 12's).
"$VENV/bin/python" - "$EXAMPLE" packaging/iam-policy.json "$WORK/user-data.toml" <<'EOF'
import json
import re
import sys
import tomllib

import yaml

example_path, policy_path, user_data_out = sys.argv[1:4]


class Loader(yaml.SafeLoader):
    pass


def intrinsic(loader, suffix, node):
    """!Sub x -> {"Fn::Sub": x}, !Ref x -> {"Ref": x}, as CloudFormation reads them."""
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if suffix == "Ref" else "Fn::" + suffix: value}


Loader.add_multi_constructor("!", intrinsic)
with open(example_path) as f:
    template = yaml.load(f, Loader=Loader)
with open(policy_path) as f:
    shipped = json.load(f)

resources = template["Resources"]
problems = []


def sub(value):
    assert isinstance(value, dict) and list(value) == ["Fn::Sub"], f"not a !Sub string: {value!r}"
    return value["Fn::Sub"]


# ASG_NAME is whatever names the group: the policy must use the group's own expression.
asg = resources["AutoScalingGroup"]["Properties"]
asg_name = sub(asg["AutoScalingGroupName"])
placeholders = {
    "${AWS::Partition}": "aws",
    "${AWS::Region}": "REGION",
    "${AWS::AccountId}": "ACCOUNT_ID",
    "${ClusterName}": "CLUSTER_NAME",
    "${SecretsPath}": "SECRETS_PATH",
    "${SecretsKmsKeyId}": "KMS_KEY_ID",
    asg_name: "ASG_NAME",
}


def restore(node):
    """The document with every !Sub string's expressions put back as the placeholders."""
    if isinstance(node, dict) and list(node) == ["Fn::Sub"]:
        text = node["Fn::Sub"]
        for expression, placeholder in placeholders.items():
            text = text.replace(expression, placeholder)
        if "${" in text:
            problems.append(f"an expression that is not a placeholder: {node['Fn::Sub']}")
        return text
    if isinstance(node, dict):
        return {k: restore(v) for k, v in node.items()}
    if isinstance(node, list):
        return [restore(v) for v in node]
    return node


policies = {p["PolicyName"]: p["PolicyDocument"] for p in resources["InstanceRole"]["Properties"]["Policies"]}
inline = restore(policies["nodeagent"])


def actions(document):
    found = set()
    for statement in document["Statement"]:
        action = statement["Action"]
        found.update([action] if isinstance(action, str) else action)
    return found


print("shipped actions:", " ".join(sorted(actions(shipped))))
print("example actions:", " ".join(sorted(actions(inline))))
if actions(inline) != actions(shipped):
    problems.append(
        f"actions differ: only in the example {sorted(actions(inline) - actions(shipped))}, "
        f"only in packaging/iam-policy.json {sorted(actions(shipped) - actions(inline))}"
    )
if inline != shipped:
    problems.append(
        "the policy differs from packaging/iam-policy.json beyond its placeholders:\n"
        + json.dumps(inline, indent=2, sort_keys=True)
    )
else:
    print(f"the inline policy is packaging/iam-policy.json (ASG_NAME = {asg_name})")

# The user-data, with each parameter at its default, as the instance reads it: a TOML document
# with a [nodeagent] table (not a script), its lifecycle hook the group's terminating hook.
parameters = template["Parameters"]
launch = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
user_data = sub(launch["UserData"]["Fn::Base64"])
rendered = re.sub(r"\$\{(\w+)\}", lambda m: str(parameters[m.group(1)]["Default"]), user_data)
first = rendered.lstrip().splitlines()[0]
if first.startswith(("#!", "#cloud-", "#include", "Content-Type:", "MIME-Version:")):
    problems.append(f"the user-data starts like something nodeagent does not read: {first}")
settings = tomllib.loads(rendered)["nodeagent"]
# The [nodeagent] table as a configuration file, for `nodeagent config check` below.
with open(user_data_out, "w") as f:
    f.write(re.sub(r"^\[nodeagent\.?", "[", rendered, flags=re.M).replace("[]", ""))
hooks = asg["LifecycleHookSpecificationList"]
terminating = [h for h in hooks if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"]
if len(terminating) != 1:
    problems.append(f"{len(terminating)} terminating hooks, not one")
else:
    hook = terminating[0]["LifecycleHookName"]
    hook = parameters[hook["Ref"]]["Default"] if isinstance(hook, dict) else hook
    if settings.get("lifecycle", {}).get("lifecycle_hook") != hook:
        problems.append(f"user-data's lifecycle.lifecycle_hook is not the group's hook {hook!r}")
    else:
        print(f"user-data: cluster {settings['cluster']!r}, lifecycle_hook {hook!r} = the group's terminating hook")
metadata = launch["MetadataOptions"]
if metadata.get("HttpTokens") != "required" or metadata.get("InstanceMetadataTags") != "enabled":
    problems.append(f"MetadataOptions must require tokens and show tags: {metadata}")

for p in problems:
    print(f"ami.sh: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

# What the instances will read: the user-data's [nodeagent] table, checked by nodeagent itself
# (the build tests/packages.sh made).
BIN=${CARGO_TARGET_DIR:-target}/release/nodeagent
[ -x "$BIN" ] || { log "no $BIN: run tests/packages.sh first"; exit 1; }
echo "== nodeagent config check: the example's user-data ([nodeagent] table, parameters at their defaults)"
run "$BIN" config check --config "$WORK/user-data.toml"
echo "the AMI template and its example are valid"
