#!/usr/bin/env bash
# The demo — not a test: a node's whole boot, locally, against the test world (moto for EC2/ECS,
# the IMDSv2 and ECS agent fixtures), printed as it goes. First `nodeagent run --once` with the
# ECS runtime (the default) under a temporary --root: the tasks it started in the emulated ECS
# and the files it rendered. Then the same node with the docker runtime on a private Docker
# engine, the DEFAULT task configuration run by faithful stand-ins of the Consul, registrator
# and linkerd images (tests/world/standins.sh; no registry is reachable here): `nodeagent
# status`, one task killed and replaced. It runs in a network namespace of its own (the
# stand-ins listen on the real ports, 8500 and 9990, of the node's address 127.0.0.1 there).
# Everything it starts is stopped by PID on exit. NODEAGENT_DEMO_ROOT=DIR keeps the root.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${NODEAGENT_NETNS:-}" ]; then
  exec unshare --net -- env NODEAGENT_NETNS=1 sh -c 'ip link set lo up && exec "$@"' sh \
    bash "$0" "$@"
fi

command -v cargo >/dev/null || { echo "demo.sh: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
PY=$(bash tests/world/setup.sh | tail -n1)
cargo build --locked --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug/nodeagent

ROOT=${NODEAGENT_DEMO_ROOT:-$(mktemp -d)}
mkdir -p "$ROOT"
WORLD_PID=
AGENT_PID=
ENGINE_DIR=
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  [ -n "$ENGINE_DIR" ] && NODEAGENT_DOCKERD_KILL_CONTAINERS=1 bash tests/world/dockerd.sh stop "$ENGINE_DIR" 2>/dev/null && rm -rf "$ENGINE_DIR"
  [ -n "$WORLD_PID" ] && kill "$WORLD_PID" 2>/dev/null && wait "$WORLD_PID" 2>/dev/null
  true
}
trap cleanup EXIT

# The world prints one JSON line once it is up.
exec 3< <("$PY" tests/world/world.py serve --ecs-config "$ROOT/etc/ecs/ecs.config" \
  --imds-set local-ipv4=127.0.0.1 2>"$ROOT/world.log")
WORLD_PID=$!
read -r WORLD <&3 || { cat "$ROOT/world.log" >&2; exit 1; }
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$WORLD" "$1"; }

cat > "$ROOT/nodeagent.toml" <<TOML
# The built-in defaults reproduce the guide's setup; here the ECS agent's address differs, and
# no Consul or linkerd runs in the emulated ECS to answer their default health checks.
[ecs]
introspection_url = "$(field agent_url)"
[tasks.consul-agent.health]
http = ""
[tasks.linkerd.health]
http = ""
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

echo
echo "== the docker runtime: the same node, its tasks as containers on a private Docker engine"
bash tests/world/dockerd.sh install >&2
ENGINE_DIR=$(mktemp -d /tmp/na-demo-XXXX)
export DOCKER_HOST=$(bash tests/world/dockerd.sh start "$ENGINE_DIR")
bash tests/world/standins.sh build "$DOCKER_HOST" >/dev/null
# The node's Docker socket (registrator's mount) is the engine's.
mkdir -p "$ROOT/var/run"
ln -sf "${DOCKER_HOST#unix://}" "$ROOT/var/run/docker.sock"
cat > "$ROOT/docker.toml" <<TOML
# The defaults (images, commands, mounts, health checks), on the docker runtime.
runtime = "docker"
[ecs]
introspection_url = "$(field agent_url)"
TOML
AWS_ENDPOINT_URL=$(field moto_url) \
AWS_EC2_METADATA_SERVICE_ENDPOINT=$(field imds_url) \
AWS_REGION=$(field region) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
  "$BIN" run --config "$ROOT/docker.toml" --root "$ROOT" 2>"$ROOT/docker-runtime.log" &
AGENT_PID=$!
NODE=$(field instance_id)
containers() { docker -H "$DOCKER_HOST" ps --filter "label=io.nodeagent.node=$NODE" --format '{{.ID}}  {{.Label "io.nodeagent.task"}}  {{.Image}}  {{.Status}}'; }
status() { "$BIN" status --root "$ROOT" "$@"; }
for _ in $(seq 300); do status >/dev/null 2>&1 && break; sleep 0.2; done
containers
echo "-- nodeagent status (exit 0: healthy)"
status
echo "-- as the Consul image runs it: uid 100, reading the file nodeagent wrote"
stat -c '%a %u:%g %n' "$ROOT/opt/consul/config" "$ROOT/opt/consul/config/consul-agent.json" "$ROOT/opt/consul/data/node-id"
VICTIM=$(docker -H "$DOCKER_HOST" ps -q --filter "label=io.nodeagent.node=$NODE" --filter label=io.nodeagent.task=linkerd)
echo "-- docker kill $VICTIM (linkerd)"
docker -H "$DOCKER_HOST" kill "$VICTIM" >/dev/null
for _ in $(seq 300); do
  status --json 2>/dev/null | grep -q '"restarts": 1' && status >/dev/null 2>&1 && break
  sleep 0.2
done
containers
echo "-- nodeagent status: linkerd restarted once"
status
echo "-- nodeagent's log (docker runtime)"
cat "$ROOT/docker-runtime.log"
