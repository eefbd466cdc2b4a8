#!/usr/bin/env bash
# The main job, locally: bring up the emulated world (moto for EC2/ECS, the IMDSv2 and ECS agent
# fixtures), run nodeagent's whole boot against it under a temporary --root, then show what it
# did: the tasks in the emulated ECS and the files it rendered. Then the same node with the
# docker runtime on a private Docker engine: real containers (busybox stand-ins for Consul,
# registrator and linkerd: no registry is reachable here), supervised — one is killed and
# replaced. Everything it starts is stopped by PID on exit. NODEAGENT_DEMO_ROOT=DIR keeps the
# root for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "main-job.sh: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
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
exec 3< <("$PY" tests/world/world.py serve --ecs-config "$ROOT/etc/ecs/ecs.config" 2>"$ROOT/world.log")
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
IMAGE=$(bash tests/world/dockerd.sh image "$DOCKER_HOST")
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CONSUL_PORT=$(port); LINKERD_PORT=$(port)
cat > "$ROOT/docker.toml" <<TOML
runtime = "docker"
[ecs]
join = false                 # no ECS agent needed on this node
[tasks.consul-agent.container]
image = "$IMAGE"
command = ["httpd", "-f", "-p", "127.0.0.1:$CONSUL_PORT", "-h", "/var/www"]
mounts = ["/opt/consul/config:/etc/consul:ro"]
[tasks.consul-agent.health]
http = "http://127.0.0.1:$CONSUL_PORT/"
[tasks.consul-registrator.container]
image = "$IMAGE"
entrypoint = []
command = ["sleep", "100000"]
mounts = ["/opt/consul-registrator/bin:/bin/consul-registrator:ro"]
[tasks.linkerd.container]
image = "$IMAGE"
command = ["httpd", "-f", "-p", "127.0.0.1:$LINKERD_PORT", "-h", "/var/www"]
mounts = ["/etc/linkerd:/etc/linkerd:ro"]
[tasks.linkerd.health]
http = "http://127.0.0.1:$LINKERD_PORT/"
TOML
AWS_ENDPOINT_URL=$(field moto_url) \
AWS_EC2_METADATA_SERVICE_ENDPOINT=$(field imds_url) \
AWS_REGION=$(field region) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
  "$BIN" run --config "$ROOT/docker.toml" --root "$ROOT" 2>"$ROOT/docker-runtime.log" &
AGENT_PID=$!
NODE=$(field instance_id)
containers() { docker -H "$DOCKER_HOST" ps --filter "label=io.nodeagent.node=$NODE" --format '{{.ID}}  {{.Label "io.nodeagent.task"}}  {{.Status}}'; }
for _ in $(seq 100); do [ "$(containers | wc -l)" = 3 ] && break; sleep 0.2; done
containers
status() { "$BIN" status --root "$ROOT" "$@"; }
for _ in $(seq 100); do status >/dev/null 2>&1 && break; sleep 0.2; done
echo "-- nodeagent status (exit 0: healthy)"
status
VICTIM=$(docker -H "$DOCKER_HOST" ps -q --filter "label=io.nodeagent.node=$NODE" --filter label=io.nodeagent.task=linkerd)
echo "-- docker kill $VICTIM (linkerd)"
docker -H "$DOCKER_HOST" kill "$VICTIM" >/dev/null
for _ in $(seq 100); do containers | grep -q linkerd && ! containers | grep -q "^$VICTIM" && break; sleep 0.1; done
sleep 1
containers
for _ in $(seq 100); do status >/dev/null 2>&1 && break; sleep 0.2; done
echo "-- nodeagent status: linkerd restarted once"
status
echo "-- nodeagent's log (docker runtime)"
cat "$ROOT/docker-runtime.log"
