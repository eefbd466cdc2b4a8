#!/usr/bin/env bash
# The main job, locally: bring up the emulated world (moto for EC2/ECS, the IMDSv2 and ECS agent
# fixtures), run nodeagent's whole boot against it under a temporary --root, then show what it
# did: the tasks in the emulated ECS and the files it rendered. Everything it starts is stopped
# by PID on exit. NODEAGENT_DEMO_ROOT=DIR keeps the root for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "main-job.sh: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
PY=$(bash tests/world/setup.sh | tail -n1)
cargo build --locked --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug/nodeagent

ROOT=${NODEAGENT_DEMO_ROOT:-$(mktemp -d)}
mkdir -p "$ROOT"
WORLD_PID=
cleanup() { [ -n "$WORLD_PID" ] && kill "$WORLD_PID" 2>/dev/null && wait "$WORLD_PID" 2>/dev/null; true; }
trap cleanup EXIT

# The world prints one JSON line once it is up.
exec 3< <("$PY" tests/world/world.py serve --ecs-config "$ROOT/etc/ecs/ecs.config" 2>"$ROOT/world.log")
WORLD_PID=$!
read -r WORLD <&3 || { cat "$ROOT/world.log" >&2; exit 1; }
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$WORLD" "$1"; }

cat > "$ROOT/nodeagent.toml" <<TOML
# The built-in defaults reproduce the guide's setup; only the ECS agent's address differs here.
[ecs]
introspection_url = "$(field agent_url)"
TOML

echo "== nodeagent run --once (root: $ROOT)"
AWS_ENDPOINT_URL=$(field moto_url) \
AWS_EC2_METADATA_SERVICE_ENDPOINT=$(field imds_url) \
AWS_REGION=$(field region) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
  "$BIN" run --once --config "$ROOT/nodeagent.toml" --root "$ROOT"

echo
echo "== tasks on this node's container instance in the emulated ECS"
"$PY" - "$(field moto_url)" "$(field cluster)" <<'PYEOF'
import sys, boto3
url, cluster = sys.argv[1:]
ecs = boto3.client("ecs", endpoint_url=url, region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
arns = ecs.list_tasks(cluster=cluster, desiredStatus="RUNNING")["taskArns"]
for t in ecs.describe_tasks(cluster=cluster, tasks=arns)["tasks"] if arns else []:
    family = t["taskDefinitionArn"].rsplit("/", 1)[1]
    print(f"{family:24} {t['lastStatus']:8} startedBy={t['startedBy']}  {t['taskArn'].rsplit('/', 1)[1]}")
PYEOF

for f in etc/ecs/ecs.config opt/consul/config/consul-agent.json opt/consul-registrator/bin/start.sh etc/linkerd/linkerd.yaml; do
  echo
  echo "== /$f ($(stat -c %a "$ROOT/$f"))"
  cat "$ROOT/$f"
done
