#!/usr/bin/env bash
# The boot under a real systemd, as on an instance: nodeagent's .deb (from tests/packages.sh)
# installed into a minimal Debian 12 root (tests/world/systemd-root.sh) booted with systemd as
# PID 1 in a private Docker engine, against the test world (moto, the IMDSv2 and ECS agent
# fixtures) — the shipped units UNCHANGED (a drop-in adds only the test world's endpoints), the
# DEFAULT task configuration (only `runtime = "docker"`), run by the faithful stand-ins of the
# real images (tests/world/standins.sh: Consul drops to uid 100 and reads its config, …).
#
# The node's life, in order:
#  1. first boot: nodeagent-prepare (the first-boot guard, ecs.config) before ecs.service, then
#     every task healthy; Consul runs as uid 100 from the files nodeagent wrote under
#     UMask=0027; status, journal fields; `systemctl restart nodeagent` keeps the containers;
#  2. reboot (a clean one: the shutdown drains): the same instance comes back, the same
#     container instance (the ECS agent's checkpoint), the same Consul node-id, healthy again;
#  3. an image baked WITHOUT `prepare-image`, booted as a new instance: the first-boot guard,
#     inside its own sandbox, removes the old identity — Consul's data dir is uid 100's — a new
#     container instance registers, Consul makes a fresh node-id;
#  4. an image baked WITH `prepare-image`, booted as a new instance: a clean first boot;
#  5. a task that crash-loops (Consul's config made 0600 for root): the unit becomes active
#     after supervision.ready_timeout with STATUS=degraded:…, the agent's PID does not change
#     for 3 × TimeoutStartSec (both shortened by a drop-in), SetInstanceHealth after
#     lifecycle.unhealthy_after, and `nodeagent status` says why;
#  6. a poweroff of the degraded node drains it.
#
# The whole test runs in a network namespace of its own (the stand-ins listen on the real ports
# of the node's address, 127.0.0.1 there; the ECS agent fixture on the real agent's 51678). The
# engine runs in a mount namespace where /opt and /etc/linkerd are the node's (so the bind
# mounts nodeagent asks for are the node's files) and /run/docker.sock is its socket. Every
# process started here is stopped on exit: the world by its PID, the engine and its containers
# by tests/world/dockerd.sh (PIDs and cgroup).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NODEAGENT_NETNS:-}" ]; then
  exec unshare --net -- env NODEAGENT_NETNS=1 sh -c 'ip link set lo up && exec "$@"' sh \
    bash "$0" "$@"
fi
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

# The node's disk, as the engine sees it: /opt and /etc/linkerd (bound in the engine's mount
# namespace), /etc/ecs and /var/lib/ecs (the ECS agent fixture reads ecs.config and keeps its
# checkpoint there, like the agent on an instance).
DISK=$WORK/disk
mkdir -p "$DISK/opt" "$DISK/etc/linkerd" "$WORK/etc-ecs" "$WORK/var-lib-ecs/data"
exec 3< <("$PY" tests/world/world.py serve --asg g \
  --ecs-config "$WORK/etc-ecs/ecs.config" --ecs-data "$WORK/var-lib-ecs/data" \
  --agent-port 51678 --imds-set local-ipv4=127.0.0.1 2>"$WORK/world.log")
WORLD_PID=$!
read -r WORLD <&3 || { cat "$WORK/world.log" >&2; fail "the test world did not start"; }
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$WORLD" "$1"; }
CONTROL=$(field control_url)
# world METHOD PATH [JSON]: the control API.
world() {
  "$PY" - "$CONTROL" "$@" <<'PYEOF'
import json, sys, urllib.request
url, method, path = sys.argv[1:4]
body = sys.argv[4].encode() if len(sys.argv) > 4 else (b"{}" if method == "POST" else None)
req = urllib.request.Request(url + path, data=body, method=method,
                             headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=10).read().decode())
PYEOF
}
# The ECS agent runs when the node's ecs.service starts it (below), not before.
world POST /agent/stop >/dev/null

export NODEAGENT_DOCKERD_NODE_ROOT=$DISK
HOST=$(bash tests/world/dockerd.sh start "$WORK")
unset NODEAGENT_DOCKERD_NODE_ROOT
bash tests/world/standins.sh build "$HOST" >/dev/null
DOCKER=$(command -v docker || echo /usr/bin/docker)
d() { "$DOCKER" -H "$HOST" "$@"; }
d import "$ROOTFS" nodeagent-test/systemd:1 >/dev/null

# Not --privileged (it fails on these machines); systemd needs its own /run and the cgroups, and
# SIGRTMIN+3 to shut down (`docker stop` is then a poweroff: the units' ExecStop at shutdown).
# The engine's socket is the node's Docker socket, so the tasks nodeagent starts are siblings.
NODE=$(d run -d --network host --tmpfs /run --tmpfs /run/lock --stop-signal SIGRTMIN+3 \
  -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  -v /run/docker.sock:/srv/docker.sock \
  -v /opt:/opt -v /etc/linkerd:/etc/linkerd \
  -v "$WORK/etc-ecs:/etc/ecs" -v "$WORK/var-lib-ecs:/var/lib/ecs" \
  nodeagent-test/systemd:1 /lib/systemd/systemd)
inside() { d exec "$NODE" "$@"; }
wait_running() {
  local state=
  for _ in $(seq 150); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.2
  done
  [ "$state" = running ] || {
    inside systemctl --failed --no-pager >&2 || true
    inside journalctl -b --no-pager -u nodeagent -u nodeagent-prepare -u ecs >&2 || true
    fail "systemd is $state, not running"
  }
}
wait_running
echo "== systemd is running in the node ($(inside systemctl --version | head -n1))"

echo "== install $(basename "$DEB") in the node"
d cp "$DEB" "$NODE:/tmp/nodeagent.deb"
inside dpkg -i /tmp/nodeagent.deb
inside getent group nodeagent >/dev/null || fail "the package did not create the nodeagent group"

# The node's configuration: the defaults but for the runtime (the test world runs no ECS agent
# that would run ECS tasks: the tasks run as containers on the node's engine).
printf 'runtime = "docker"\n' >"$WORK/nodeagent.toml"
# Where an instance has 169.254.169.254 and the AWS endpoints, the node has the test world; its
# Docker socket is the engine's, mounted at /srv/docker.sock.
cat >"$WORK/test-world.conf" <<CONF
[Service]
Environment=AWS_ENDPOINT_URL=$(field moto_url)
Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT=$(field imds_url)
Environment=AWS_REGION=$(field region) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
Environment=DOCKER_HOST=unix:///srv/docker.sock
CONF
# The ECS-optimized AMI's ecs.service, as far as ordering goes: starting it starts the ECS
# agent (the world's fixture, which then reads ecs.config), stopping it stops the agent.
CONTROL_PORT=${CONTROL##*:}
cat >"$WORK/ecs-agent" <<SH
#!/bin/bash
# POST /agent/\$1 to the test world's control API (no curl in a minimal Debian).
exec 3<>/dev/tcp/127.0.0.1/$CONTROL_PORT
printf 'POST /agent/%s HTTP/1.1\r\nHost: world\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "\$1" >&3
head -n1 <&3 | grep -q ' 200 '
SH
cat >"$WORK/ecs.service" <<'UNIT'
[Unit]
Description=stand-in for the ECS agent's unit
After=cloud-final.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/ecs-agent start
ExecStop=/usr/local/bin/ecs-agent stop
[Install]
WantedBy=multi-user.target
UNIT
d cp "$WORK/nodeagent.toml" "$NODE:/etc/nodeagent/nodeagent.toml"
d cp "$WORK/ecs.service" "$NODE:/etc/systemd/system/ecs.service"
d cp "$WORK/ecs-agent" "$NODE:/usr/local/bin/ecs-agent"
inside chmod 0755 /usr/local/bin/ecs-agent
for unit in nodeagent nodeagent-prepare; do
  inside mkdir -p "/etc/systemd/system/$unit.service.d"
  d cp "$WORK/test-world.conf" "$NODE:/etc/systemd/system/$unit.service.d/test-world.conf"
done
inside nodeagent config check
inside systemctl enable ecs.service nodeagent.service nodeagent-prepare.service

prop() { inside systemctl show -p "$2" --value "$1"; }
status_json() { inside nodeagent status --json || true; }
json() { "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
containers() { d ps -q --no-trunc --filter "label=io.nodeagent.node=$1" | sort; }
# Waits (up to 90 s) for nodeagent to be active with a status text starting with $1.
wait_active() {
  local want=$1 state= ok=
  for _ in $(seq 450); do
    state=$(inside systemctl show -p ActiveState,StatusText nodeagent 2>/dev/null || true)
    grep -qx 'ActiveState=active' <<<"$state" && grep -q "^StatusText=$want" <<<"$state" &&
      ok=1 && break
    sleep 0.2
  done
  echo "$ systemctl show -p ActiveState,StatusText nodeagent"
  echo "$state"
  [ -n "$ok" ] || {
    inside systemctl status nodeagent nodeagent-prepare --no-pager >&2 || true
    inside journalctl -b --no-pager -u nodeagent -u nodeagent-prepare >&2 || true
    fail "nodeagent did not become active with StatusText=$want…"
  }
}
# The node's identity now: instance, container instance, Consul's node-id.
identity() {
  local s
  s=$(status_json)
  INSTANCE=$(json 'd["instance_id"]' <<<"$s")
  CI=$(json 'd["container_instance_arn"]' <<<"$s")
  NODE_ID=$(cat "$DISK/opt/consul/data/node-id")
  echo "instance $INSTANCE, container instance ${CI##*/}, Consul node-id $NODE_ID"
}
reboot() { d restart -t 120 "$NODE" >/dev/null; wait_running; }
draining_calls() {
  world GET /stats | json 'len([c for c in d["aws"]["sequence"] if c["op"] == "ecs:UpdateContainerInstancesState" and c["params"].get("status") == "DRAINING"])'
}

echo
echo "== 1. first boot"
reboot
wait_active '3/3 tasks healthy'
prep_state=$(prop nodeagent-prepare ActiveState)
prep_result=$(prop nodeagent-prepare Result)
prep_done=$(prop nodeagent-prepare ExecMainExitTimestampMonotonic)
ecs_started=$(prop ecs.service ActiveEnterTimestampMonotonic)
echo "$ nodeagent-prepare: $prep_state ($prep_result), exited at $prep_done us; ecs.service started at $ecs_started us (monotonic)"
[ "$prep_state" = active ] && [ "$prep_result" = success ] || fail "nodeagent-prepare: $prep_state ($prep_result)"
[ "$prep_done" -le "$ecs_started" ] || fail "nodeagent-prepare finished after ecs.service started"
inside grep -qx 'ECS_CLUSTER=l5d-demo' /etc/ecs/ecs.config || fail "ecs.config lacks ECS_CLUSTER"
echo "$ stat (the node's files; Consul's image runs it as uid 100)"
inside stat -c '%a %U:%G %n' /opt/consul/config /opt/consul/config/consul-agent.json \
  /opt/consul/data /opt/consul/data/node-id /opt/consul-registrator/bin/start.sh /etc/linkerd/linkerd.yaml
[ "$(inside stat -c '%a %u' /opt/consul/config)" = "755 0" ] || fail "/opt/consul/config is not 0755 root"
[ "$(inside stat -c '%u' /opt/consul/data/node-id)" = 100 ] || fail "Consul did not write its node-id as uid 100"
echo "$ nodeagent status"
inside nodeagent status || fail "nodeagent status exited $? on a healthy node"
identity
FIRST_INSTANCE=$INSTANCE FIRST_CI=$CI FIRST_NODE_ID=$NODE_ID
pid=$(prop nodeagent MainPID)
echo "nodeagent (pid $pid): $(inside grep -E '^(VmRSS|RssAnon|RssFile)' "/proc/$pid/status" | tr -s ' \t' ' ' | paste -sd,)"

echo "$ journalctl -u nodeagent NODEAGENT_TASK=linkerd -o short"
inside journalctl -b --no-pager -u nodeagent NODEAGENT_TASK=linkerd -o short | tail -n 3
inside journalctl -b --no-pager -u nodeagent -o json >"$WORK/journal.json"
inside journalctl -b --no-pager -u nodeagent-prepare -o json >"$WORK/prepare.json"
"$PY" - "$WORK/journal.json" "$WORK/prepare.json" "$INSTANCE" <<'PYEOF' || fail "the journal lacks nodeagent's fields"
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
assert {"imds", "discover", "render", "supervise"} <= set(phases), phases
assert tasks == ["consul-agent", "consul-registrator", "linkerd"], tasks
assert ids == {instance}, ids
joined = [e for e in prepare if "joined the ECS cluster" in e.get("MESSAGE", "")]
print(f"nodeagent-prepare.service: {joined[0]['MESSAGE']!r} INSTANCE_ID {joined[0].get('INSTANCE_ID')}")
assert joined and joined[0].get("INSTANCE_ID") == instance, prepare
PYEOF

echo "$ systemctl restart nodeagent   (not a shutdown: the tasks keep running)"
before=$(containers "$INSTANCE")
old_pid=$(prop nodeagent MainPID)
inside systemctl restart nodeagent
wait_active '3/3 tasks healthy'
new_pid=$(prop nodeagent MainPID)
after=$(containers "$INSTANCE")
[ "$new_pid" != "$old_pid" ] || fail "nodeagent was not restarted (pid $old_pid)"
[ "$(wc -l <<<"$before")" = 3 ] && [ "$before" = "$after" ] ||
  fail "the task containers changed across a restart: before [$before] after [$after]"
echo "a new agent (pid $old_pid -> $new_pid), the same 3 task containers before and after"

echo
echo "== 2. reboot: the shutdown drains, the same instance comes back"
reboot
wait_active '3/3 tasks healthy'
identity
[ "$(draining_calls)" = 1 ] || fail "the shutdown did not drain (DRAINING calls: $(draining_calls))"
[ "$INSTANCE" = "$FIRST_INSTANCE" ] && [ "$CI" = "$FIRST_CI" ] && [ "$NODE_ID" = "$FIRST_NODE_ID" ] ||
  fail "the same instance came back as another identity"
echo "the same instance, container instance and Consul node-id"

echo
echo "== 3. an image baked without prepare-image, booted as a new instance: the guard cleans"
d stop -t 120 "$NODE" >/dev/null                         # the builder stops; the disk is imaged
for c in $(containers "$INSTANCE"); do d rm -f "$c" >/dev/null; done  # not in the image
world POST /node/replace
d start "$NODE" >/dev/null
wait_running
wait_active '3/3 tasks healthy'
identity
[ "$(prop nodeagent-prepare Result)" = success ] || fail "nodeagent-prepare failed on a baked disk"
inside journalctl -b --no-pager -u nodeagent-prepare -o cat | grep "carries the identity of instance $FIRST_INSTANCE" ||
  fail "the guard did not say whose identity it removed"
[ "$INSTANCE" != "$FIRST_INSTANCE" ] || fail "the instance id did not change"
[ "$CI" != "$FIRST_CI" ] || fail "the ECS agent kept the old instance's container instance"
[ "$NODE_ID" != "$FIRST_NODE_ID" ] || fail "Consul kept the old instance's node-id"
echo "the guard removed $FIRST_INSTANCE's identity: a new container instance and Consul node-id"
SECOND_INSTANCE=$INSTANCE SECOND_CI=$CI SECOND_NODE_ID=$NODE_ID

echo
echo "== 4. an image baked with prepare-image, booted as a new instance"
inside systemctl stop nodeagent ecs                       # Packer: stop the agents
for c in $(containers "$INSTANCE"); do d rm -f "$c" >/dev/null; done
echo "$ nodeagent prepare-image"
inside nodeagent prepare-image
d stop -t 120 "$NODE" >/dev/null
world POST /node/replace
d start "$NODE" >/dev/null
wait_running
wait_active '3/3 tasks healthy'
identity
inside journalctl -b --no-pager -u nodeagent-prepare -o cat | grep -q "carries the identity" &&
  fail "the guard found an identity on a disk prepare-image cleaned"
[ "$INSTANCE" != "$SECOND_INSTANCE" ] && [ "$CI" != "$SECOND_CI" ] && [ "$NODE_ID" != "$SECOND_NODE_ID" ] ||
  fail "the prepared image did not boot as a new identity"
echo "a clean first boot as a new identity"

echo
echo "== 5. a task that crash-loops: ready as a degraded node, not restart-looped by systemd"
inside mkdir -p /etc/systemd/system/nodeagent.service.d /etc/nodeagent/conf.d
printf '[Service]\nTimeoutStartSec=20\n' >"$WORK/timeout.conf"
d cp "$WORK/timeout.conf" "$NODE:/etc/systemd/system/nodeagent.service.d/timeout.conf"
# Consul's image runs it as uid 100: a config file made 0600 for root is one it cannot read.
cat >"$WORK/50-crash.toml" <<'TOML'
[tasks.consul-agent.files."/opt/consul/config/consul-agent.json"]
mode = "0600"
[supervision]
ready_timeout = "10s"
[lifecycle]
unhealthy_after = "15s"
TOML
d cp "$WORK/50-crash.toml" "$NODE:/etc/nodeagent/conf.d/50-crash.toml"
inside systemctl daemon-reload
reboot
wait_active 'degraded: 0/3 tasks healthy; consul-agent crash-loop'
pid=$(prop nodeagent MainPID)
started=$(prop nodeagent ExecMainStartTimestampMonotonic)
ready=$(prop nodeagent ActiveEnterTimestampMonotonic)
echo "active $(( (ready - started) / 1000 )) ms after its start (ready_timeout 10 s after supervision began)"
echo "$ nodeagent status   (exit 1: degraded)"
set +e
table=$(inside nodeagent status)
code=$?
set -e
echo "$table"
[ "$code" = 1 ] || fail "status exited $code on a degraded node"
grep -q 'consul-agent (crash-loop) last wrote:' <<<"$table" && grep -q 'permission denied' <<<"$table" ||
  fail "status does not say why consul-agent fails"
echo "the PID stays $pid for 3 x TimeoutStartSec (60 s):"
for _ in $(seq 30); do
  sleep 2
  now=$(prop nodeagent MainPID)
  [ "$now" = "$pid" ] || fail "systemd restarted nodeagent (pid $pid -> $now)"
  [ "$(prop nodeagent ActiveState)" = active ] || fail "nodeagent is $(prop nodeagent ActiveState)"
done
echo "pid $pid, active, for 60 s"
health=$(world GET /stats | json 'd["aws"]["by_operation"].get("autoscaling:SetInstanceHealth", 0)')
[ "$health" -ge 1 ] || fail "SetInstanceHealth was not called after unhealthy_after"
echo "autoscaling:SetInstanceHealth called ($health): the group replaces the node"

echo
echo "== 6. a poweroff of the degraded node drains it"
before=$(draining_calls)
d stop -t 120 "$NODE" >/dev/null
[ "$(draining_calls)" -gt "$before" ] || fail "the poweroff of the degraded node did not drain it"
left=$(containers "$INSTANCE")
[ -z "$left" ] || fail "task containers still running after the drain: $left"
echo "drained at shutdown: DRAINING, no task container left"
echo "systemd boot test: passed"
