#!/usr/bin/env bash
# The chaos soak: `tests/soak.sh DURATION` (seconds).
#
# Two nodes run side by side for DURATION seconds, each a long-running `nodeagent run` (the debug
# build, `${CARGO_TARGET_DIR:-target}/debug/nodeagent`, built first) against a test world of its
# own: one with the ECS runtime (its tasks ECS tasks in the world's moto), one with the docker
# runtime (the default task configuration on a private Docker engine, run by the faithful
# stand-ins of the real images). A seeded random schedule (SOAK_SEED, printed; the same seed
# draws the same schedule) injects the faults a running node can take — throttle bursts, lost
# StartTask answers, ListTasks/DescribeTasks lag, slow answers, 500s, IMDS slow or expiring its
# tokens, ECS agent restarts, ECS stopping a task, container kills and removals, dockerd
# restarts and freezes, SIGKILL of nodeagent then a new one — and the invariants are checked
# every second: at most one running copy of each task (moto and Docker), every task healthy again
# within its bound after each fault (each recovery is measured), no torn rendered file, each
# nodeagent's RSS and fd count flat (its first minute against the soak's last minute, from
# /proc). The work is tests/world/soak.py's.
#
# Prints each violation as it happens and exactly one summary line at the end, e.g.
#   soak: 180 s, 52 faults, 0 violations, max recovery 9.8 s, rss 13.0→13.1 MB (ecs 12.2→12.2 MB), ...
# and exits 1 on any violation. It runs in a network namespace of its own (the stand-ins
# listen on the real ports of 127.0.0.1 there), re-executing itself under `unshare --net` as
# tests/systemd-boot.sh does. Everything it starts is stopped by PID on exit. The fault log goes
# to stderr; SOAK_KEEP=1 keeps the work directory (logs of the worlds and agents).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-}
case "$DURATION" in
  ''|*[!0-9]*) echo "usage: tests/soak.sh DURATION_SECONDS" >&2; exit 2 ;;
esac
if [ -z "${NODEAGENT_NETNS:-}" ]; then
  exec unshare --net -- env NODEAGENT_NETNS=1 sh -c 'ip link set lo up && exec "$@"' sh \
    bash "$0" "$@"
fi
log() { echo "soak.sh: $*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: install the Rust toolchain (rustup)"; exit 1; }
PY=$(bash tests/world/setup.sh | tail -n1)
bash tests/world/dockerd.sh install >&2
cargo build --locked --quiet
BIN=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/nodeagent
[ -x "$BIN" ] || { log "no binary at $BIN"; exit 1; }
SEED=${SOAK_SEED:-$(( (RANDOM << 15) | RANDOM ))}

WORK=$(mktemp -d /tmp/na-soak-XXXX)
ENGINE_DIR=$WORK/e
mkdir -p "$ENGINE_DIR"
SOAK_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$SOAK_PID" ] && kill -0 "$SOAK_PID" 2>/dev/null; then
    kill -TERM "$SOAK_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$SOAK_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$SOAK_PID" 2>/dev/null || true
  fi
  # Backstop: whatever soak.py recorded and is still alive, by PID (checked against its name).
  if [ -f "$WORK/pids" ]; then
    while read -r pid what; do
      [ -d "/proc/$pid" ] || continue
      case "$what" in
        dockerd) kill -CONT "$pid" 2>/dev/null || true ;;
        *) kill -KILL "$pid" 2>/dev/null || true ;;
      esac
    done <"$WORK/pids"
  fi
  NODEAGENT_DOCKERD_KILL_CONTAINERS=1 bash tests/world/dockerd.sh stop "$ENGINE_DIR" >/dev/null 2>&1 || true
  if [ -n "${SOAK_KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$PY" tests/world/soak.py --duration "$DURATION" --seed "$SEED" --bin "$BIN" --py "$PY" \
  --work "$WORK" --engine-dir "$ENGINE_DIR" &
SOAK_PID=$!
set +e
wait "$SOAK_PID"
rc=$?
set -e
SOAK_PID=
exit "$rc"
