#!/usr/bin/env bash
# The boot test under a real systemd: nodeagent's .deb (from tests/packages.sh) installed into a
# minimal Debian 12 root (tests/world/systemd-root.sh) that boots with systemd as PID 1 in a
# private Docker engine, pointed at the test world (moto, the IMDSv2 and ECS agent fixtures).
#
# As on an ECS-optimized AMI: the units are enabled, the container reboots, and at boot
# nodeagent-prepare.service writes ecs.config before ecs.service (a stand-in here: the ECS
# agent fixture registers once ecs.config names the cluster), then nodeagent.service (Type=notify,
# hardened as shipped, docker runtime on the same engine) starts the node's tasks. Asserts:
# - `systemctl show -p ActiveState,StatusText nodeagent` reaches active with "3/3 tasks healthy";
# - nodeagent-prepare finished before ecs.service started;
# - `nodeagent status` inside the node answers 0;
# - `journalctl -u nodeagent` holds nodeagent's structured fields (NODEAGENT_PHASE,
#   NODEAGENT_TASK, INSTANCE_ID), and filtering on them works;
# - `systemctl restart nodeagent` (not a shutdown) leaves every task container running;
# - a poweroff drains: the container instance set DRAINING, the task containers stopped.
# Everything started here is stopped on exit: the world by its PID, the engine and its
# containers by tests/world/dockerd.sh (PIDs and cgroup).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "systemd-boot.sh: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

TARGET=${CARGO_TARGET_DIR:-target}
DEB=${1:-$TARGET/packages/nodeagent.deb}
[ -s "$DEB" ] || fail "no package at $DEB: run tests/packages.sh first"
PY=$(bash tests/world/setup.sh | tail -n1)
ROOTFS=$(bash tests/world/systemd-root.sh)
bash tests/world/dockerd.sh install >&2

WORK=$(mktemp -d /tmp/na-sd-XXXX)
WORLD_PID=
cleanup() {
  NODEAGENT_DOCKERD_KILL_CONTAINERS=1 bash tests/world/dockerd.sh stop "$WORK" >/dev/null 2>&1 || true
  [ -n "$WORLD_PID" ] && kill "$WORLD_PID" 2>/dev/null && wait "$WORLD_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# The node's /etc/ecs is this directory, so the ECS agent fixture reads the ecs.config that
# nodeagent-prepare writes inside the node.
mkdir -p "$WORK/etc-ecs"
exec 3< <("$PY" tests/world/world.py serve --ecs-config "$WORK/etc-ecs/ecs.config" 2>"$WORK/world.log")
WORLD_PID=$!
read -r WORLD <&3 || { cat "$WORK/world.log" >&2; fail "the test world did not start"; }
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$WORLD" "$1"; }
INSTANCE_ID=$(field instance_id)

HOST=$(bash tests/world/dockerd.sh start "$WORK")
TASK_IMAGE=$(bash tests/world/dockerd.sh image "$HOST")
DOCKER=$(command -v docker || echo /usr/bin/docker)
d() { "$DOCKER" -H "$HOST" "$@"; }
d import "$ROOTFS" nodeagent-test/systemd:1 >/dev/null

# Not --privileged (it fails on these machines); systemd needs its own /run and the cgroups, and
# SIGRTMIN+3 to shut down (`docker stop` is then a poweroff: the units' ExecStop at shutdown).
# The engine's socket is the node's Docker socket, so the tasks nodeagent starts are siblings.
NODE=$(d run -d --network host --tmpfs /run --tmpfs /run/lock --stop-signal SIGRTMIN+3 \
  -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  -v "$WORK/docker.sock:/srv/docker.sock" \
  -v "$WORK/etc-ecs:/etc/ecs" \
  nodeagent-test/systemd:1 /lib/systemd/systemd)
inside() { d exec "$NODE" "$@"; }
wait_running() {
  local state=
  for _ in $(seq 150); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.2
  done
  [ "$state" = running ] || { inside systemctl --failed --no-pager >&2 || true; fail "systemd is $state, not running"; }
}
wait_running
echo "== systemd is running in the node ($(inside systemctl --version | head -n1))"

echo "== install $(basename "$DEB") in the node"
d cp "$DEB" "$NODE:/tmp/nodeagent.deb"
inside dpkg -i /tmp/nodeagent.deb
inside getent group nodeagent >/dev/null || fail "the package did not create the nodeagent group"

# The node's configuration: the docker runtime on this engine, busybox stand-ins for the
# daemons (no registry here), their health checks on loopback ports.
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CONSUL_PORT=$(port)
LINKERD_PORT=$(port)
cat >"$WORK/nodeagent.toml" <<TOML
runtime = "docker"
[ecs]
introspection_url = "$(field agent_url)"
[tasks.consul-agent.container]
image = "$TASK_IMAGE"
command = ["httpd", "-f", "-p", "127.0.0.1:$CONSUL_PORT", "-h", "/var/www"]
mounts = []
[tasks.consul-agent.health]
http = "http://127.0.0.1:$CONSUL_PORT/"
[tasks.consul-registrator.container]
image = "$TASK_IMAGE"
entrypoint = []
command = ["sleep", "100000"]
mounts = []
[tasks.linkerd.container]
image = "$TASK_IMAGE"
command = ["httpd", "-f", "-p", "127.0.0.1:$LINKERD_PORT", "-h", "/var/www"]
mounts = []
[tasks.linkerd.health]
http = "http://127.0.0.1:$LINKERD_PORT/"
TOML
# Where an instance has 169.254.169.254 and the AWS endpoints, the node has the test world.
cat >"$WORK/test-world.conf" <<CONF
[Service]
Environment=AWS_ENDPOINT_URL=$(field moto_url)
Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT=$(field imds_url)
Environment=AWS_REGION=$(field region) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
Environment=DOCKER_HOST=unix:///srv/docker.sock
CONF
# The ECS-optimized AMI's ecs.service, as far as ordering goes.
cat >"$WORK/ecs.service" <<'UNIT'
[Unit]
Description=stand-in for the ECS agent's unit
After=cloud-final.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
[Install]
WantedBy=multi-user.target
UNIT
d cp "$WORK/nodeagent.toml" "$NODE:/etc/nodeagent/nodeagent.toml"
d cp "$WORK/ecs.service" "$NODE:/etc/systemd/system/ecs.service"
for unit in nodeagent nodeagent-prepare; do
  inside mkdir -p "/etc/systemd/system/$unit.service.d"
  d cp "$WORK/test-world.conf" "$NODE:/etc/systemd/system/$unit.service.d/test-world.conf"
done
inside nodeagent config check
inside systemctl enable ecs.service nodeagent.service nodeagent-prepare.service

echo "== reboot the node"
d restart -t 5 "$NODE" >/dev/null
wait_running

# Waits (up to 60 s) for nodeagent to be active with every task healthy; prints the state.
wait_ready() {
  local state= ready=
  for _ in $(seq 300); do
    state=$(inside systemctl show -p ActiveState,StatusText nodeagent)
    grep -qx 'ActiveState=active' <<<"$state" && grep -q '^StatusText=3/3 tasks healthy' <<<"$state" &&
      ready=1 && break
    sleep 0.2
  done
  echo "$ systemctl show -p ActiveState,StatusText nodeagent"
  echo "$state"
  [ -n "$ready" ] || {
    inside systemctl status nodeagent nodeagent-prepare --no-pager >&2 || true
    inside journalctl -b --no-pager -u nodeagent -u nodeagent-prepare >&2 || true
    fail "nodeagent did not become active with all tasks healthy"
  }
}
wait_ready

prop() { inside systemctl show -p "$2" --value "$1"; }
prep_state=$(prop nodeagent-prepare ActiveState)
prep_result=$(prop nodeagent-prepare Result)
prep_done=$(prop nodeagent-prepare ExecMainExitTimestampMonotonic)
ecs_started=$(prop ecs.service ActiveEnterTimestampMonotonic)
echo "$ nodeagent-prepare: $prep_state ($prep_result), exited at $prep_done us; ecs.service started at $ecs_started us (monotonic)"
[ "$prep_state" = active ] && [ "$prep_result" = success ] || fail "nodeagent-prepare: $prep_state ($prep_result)"
[ "$prep_done" -le "$ecs_started" ] || fail "nodeagent-prepare finished after ecs.service started"
inside grep -qx 'ECS_CLUSTER=l5d-demo' /etc/ecs/ecs.config || fail "ecs.config lacks ECS_CLUSTER"

echo "$ nodeagent status"
inside nodeagent status || fail "nodeagent status exited $? on a healthy node"
pid=$(prop nodeagent MainPID)
echo "nodeagent (pid $pid): $(inside grep -E '^(VmRSS|RssAnon|RssFile)' "/proc/$pid/status" | tr -s ' \t' ' ' | paste -sd,)"

echo "$ journalctl -u nodeagent NODEAGENT_TASK=linkerd -o short"
inside journalctl -b --no-pager -u nodeagent NODEAGENT_TASK=linkerd -o short | tail -n 3
inside journalctl -b --no-pager -u nodeagent -o json >"$WORK/journal.json"
inside journalctl -b --no-pager -u nodeagent-prepare -o json >"$WORK/prepare.json"
"$PY" - "$WORK/journal.json" "$WORK/prepare.json" "$INSTANCE_ID" <<'PYEOF' || fail "the journal lacks nodeagent's fields"
import json, sys
def entries(path):
    return [json.loads(line) for line in open(path) if line.strip()]
run, prepare, instance = entries(sys.argv[1]), entries(sys.argv[2]), sys.argv[3]
ours = [e for e in run if "NODEAGENT_PHASE" in e or "NODEAGENT_TASK" in e]
phases = sorted({e["NODEAGENT_PHASE"] for e in ours if "NODEAGENT_PHASE" in e})
tasks = sorted({e["NODEAGENT_TASK"] for e in ours if "NODEAGENT_TASK" in e})
ids = {e.get("INSTANCE_ID") for e in ours if "NODEAGENT_TASK" in e}
print(f"nodeagent.service: {len(run)} entries; NODEAGENT_PHASE {phases}; "
      f"NODEAGENT_TASK {tasks}; INSTANCE_ID {sorted(map(str, ids))}")
sample = next(e for e in ours if e.get("NODEAGENT_TASK") == "linkerd")
print("  one entry:", {k: v for k, v in sample.items() if not k.startswith("_") and "CURSOR" not in k
                       and "TIMESTAMP" not in k})
assert {"imds", "discover", "render", "supervise"} <= set(phases), phases
assert tasks == ["consul-agent", "consul-registrator", "linkerd"], tasks
assert ids == {instance}, ids
joined = [e for e in prepare if "joined the ECS cluster" in e.get("MESSAGE", "")]
print(f"nodeagent-prepare.service: {joined[0]['MESSAGE']!r} INSTANCE_ID {joined[0].get('INSTANCE_ID')}")
assert joined and joined[0].get("INSTANCE_ID") == instance, prepare
PYEOF

echo "$ systemctl restart nodeagent   (not a shutdown: the tasks keep running)"
before=$(d ps -q --filter "label=io.nodeagent.node=$INSTANCE_ID" | sort)
old_pid=$(prop nodeagent MainPID)
inside systemctl restart nodeagent
wait_ready
new_pid=$(prop nodeagent MainPID)
after=$(d ps -q --filter "label=io.nodeagent.node=$INSTANCE_ID" | sort)
[ "$new_pid" != "$old_pid" ] || fail "nodeagent was not restarted (pid $old_pid)"
[ "$(wc -l <<<"$before")" = 3 ] && [ "$before" = "$after" ] ||
  fail "the task containers changed across a restart: before [$before] after [$after]"
echo "a new agent (pid $old_pid -> $new_pid), the same 3 task containers before and after"

echo "$ poweroff   (docker stop: SIGRTMIN+3 to systemd; nodeagent's ExecStop drains)"
d stop -t 120 "$NODE" >/dev/null
"$PY" - "$(field control_url)" <<'PYEOF' || fail "the shutdown did not drain the node"
import json, sys, urllib.request
stats = json.load(urllib.request.urlopen(sys.argv[1] + "/stats", timeout=10))
drains = [c for c in stats["aws"]["sequence"] if c["op"] == "ecs:UpdateContainerInstancesState"]
print("ecs:UpdateContainerInstancesState", [c["params"].get("status") for c in drains])
assert [c["params"].get("status") for c in drains] == ["DRAINING"], drains
PYEOF
left=$(d ps -q --filter "label=io.nodeagent.node=$INSTANCE_ID")
[ -z "$left" ] || fail "task containers still running after the drain: $left"
echo "the node drained at shutdown: DRAINING, then its task containers stopped"
echo "systemd boot test: passed"
