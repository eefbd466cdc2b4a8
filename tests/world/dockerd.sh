#!/usr/bin/env bash
# Docker part of the "test world": private, throw-away Docker engines.
#
#   tests/world/dockerd.sh install        ensure dockerd (apt: docker.io) + busybox-static
#   tests/world/dockerd.sh start DIR      start an engine living entirely under DIR;
#                                         prints its socket: unix://DIR/docker.sock
#   tests/world/dockerd.sh stop DIR       stop it (dockerd, its containerd, shims and
#                                         container processes, all found by PID/cgroup)
#   tests/world/dockerd.sh image SOCKET   ensure image nodeagent-test/busybox:1 there;
#                                         prints the image name
#
# Results go to stdout (one line), logs to stderr. Every subcommand is idempotent.
# Several engines may run at once, each under its own DIR.
#
# Engine setup (what works on the test machines: cgroup v1, no registry, no
# iptables, `--privileged` fails with "unable to apply caps"):
#   dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none
# so containers must use `--network host` (or `none`); never `--privileged`.
# Each engine gets its own managed containerd (state under DIR/exec/containerd,
# data under DIR/data/containerd), its own config file (DIR/daemon.json, so
# /etc/docker/daemon.json is ignored) and its own cgroup parent
# (/nodeagent-world-<hash of DIR>) so its containers can be found and killed.
#
# Engine is Debian's docker.io 20.10: Engine API 1.41 at most. Clients must
# negotiate (or pin <= 1.41); the CLI in /usr/local/bin (28.x) negotiates by itself.
#
# Environment:
#   NODEAGENT_WORLD_HOME        cache dir (default $HOME/.cache/nodeagent-world);
#                               the busybox rootfs tarball is kept there
#   NODEAGENT_DOCKER_CLI        docker client to use (default: `docker` on PATH,
#                               else /usr/bin/docker)
#   NODEAGENT_DOCKERD_TIMEOUT   seconds `start` waits for the API (default 30)
#   NODEAGENT_DOCKERD_STOP_TIMEOUT  seconds `stop` waits after SIGTERM (default 20)
#   NODEAGENT_DOCKERD_KILL_CONTAINERS=1  `stop` first SIGKILLs the running containers
#                               through the API. Without it, dockerd's own shutdown
#                               gives each container its stop timeout (default 10 s,
#                               `--stop-timeout`) after SIGTERM: a container whose
#                               PID 1 ignores SIGTERM (busybox httpd/sleep as PID 1
#                               do, unless run with --init) costs ~10 s per stop.
#   NODEAGENT_DOCKERD_LOG_LEVEL dockerd --log-level (default info)
#   NODEAGENT_DOCKERD_NODE_ROOT=DIR  the engine is a node's: dockerd runs in a mount
#                               namespace of its own in which each of the node's paths
#                               (NODEAGENT_DOCKERD_NODE_PATHS, default "/opt /etc/linkerd")
#                               is DIR's, and /run a fresh tmpfs where it also listens on
#                               /run/docker.sock — so a bind mount of /opt/consul/config or
#                               /var/run/docker.sock asked by a container running on the
#                               node (a systemd node container nodeagent runs in) is the
#                               node's. The host's /etc/linkerd is made (empty) as a mount
#                               point when missing. Only for a new engine.
#
# DIR must be short (<= 64 bytes once made absolute): unix socket paths such as
# DIR/exec/containerd/containerd.sock.ttrpc are limited to 107 bytes.
set -euo pipefail

IMAGE='nodeagent-test/busybox:1'
# Bump when the rootfs recipe changes: cached tarballs with another recipe are rebuilt.
ROOTFS_RECIPE=1
HOME_DIR="${NODEAGENT_WORLD_HOME:-$HOME/.cache/nodeagent-world}"
START_TIMEOUT="${NODEAGENT_DOCKERD_TIMEOUT:-30}"
STOP_TIMEOUT="${NODEAGENT_DOCKERD_STOP_TIMEOUT:-20}"
KILL_CONTAINERS="${NODEAGENT_DOCKERD_KILL_CONTAINERS:-0}"
LOG_LEVEL="${NODEAGENT_DOCKERD_LOG_LEVEL:-info}"
NODE_ROOT="${NODEAGENT_DOCKERD_NODE_ROOT:-}"
NODE_PATHS="${NODEAGENT_DOCKERD_NODE_PATHS:-/opt /etc/linkerd}"
MAX_DIR_LEN=64

# The CLI must talk to the socket we give it with -H, whatever the caller's env says.
unset DOCKER_HOST DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH DOCKER_TLS 2>/dev/null || true
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { echo "dockerd.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- helpers

docker_cli() {
  if [ -n "${NODEAGENT_DOCKER_CLI:-}" ]; then
    echo "$NODEAGENT_DOCKER_CLI"
  elif command -v docker >/dev/null 2>&1; then
    command -v docker
  elif [ -x /usr/bin/docker ]; then
    echo /usr/bin/docker
  else
    die "no docker client found (set NODEAGENT_DOCKER_CLI or run: $0 install)"
  fi
}

# dk SOCKET ARGS...: the docker CLI against one engine.
dk() {
  local sock="$1"
  shift
  "$(docker_cli)" -H "$sock" "$@"
}

pkg_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = 'install ok installed' ]
}

# Absolute, normalized path (DIR need not exist yet).
abs_dir() {
  local d="$1"
  [ -n "$d" ] || die "DIR is empty"
  mkdir -p "$d"
  (cd "$d" && pwd -P)
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Is PID a live process whose command line mentions NEEDLE?
pid_matches() {
  local pid="$1" needle="$2"
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle"
}

read_pid() { if [ -f "$1" ]; then tr -dc '0-9' <"$1" || true; fi; }

# PIDs (one per line) of processes whose argv contains NEEDLE as one argument.
pids_with_arg() {
  local needle="$1" p a
  local -a args
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [ "$p" = "$$" ] && continue
    # bash builtins only: no helper process of ours can show up as a match.
    args=()
    # Grouped so that 2>/dev/null also covers the redirection: a process may exit mid-scan.
    { mapfile -d '' args <"/proc/$p/cmdline"; } 2>/dev/null || continue
    for a in "${args[@]}"; do
      if [ "$a" = "$needle" ]; then echo "$p"; break; fi
    done
  done
}

# wait_gone SECONDS PID...: wait until all are gone; returns 1 on timeout.
wait_gone() {
  local t="$1" p left
  shift
  local deadline=$((SECONDS + t))
  while :; do
    left=0
    for p in "$@"; do alive "$p" && left=1; done
    [ "$left" = 0 ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

# One cgroup parent per engine (cgroupfs driver: a path from each hierarchy's root).
cgroup_parent_for() {
  echo "/nodeagent-world-$(printf '%s' "$1" | sha256sum | cut -c1-12)"
}

# All PIDs in the engine's cgroup parent, any hierarchy (v1 and v2 layouts).
cgroup_pids() {
  local parent="$1" f
  for f in /sys/fs/cgroup/*"$parent"/cgroup.procs /sys/fs/cgroup/*/*"$parent"/cgroup.procs \
           /sys/fs/cgroup"$parent"/cgroup.procs; do
    [ -d "${f%/cgroup.procs}" ] || continue
    find "${f%/cgroup.procs}" -name cgroup.procs -exec cat {} + 2>/dev/null || true
  done | sort -un
}

# Remove the (now empty) cgroup directories of the engine, deepest first.
cgroup_cleanup() {
  local parent="$1" d
  for d in /sys/fs/cgroup/*"$parent" /sys/fs/cgroup/*/*"$parent" /sys/fs/cgroup"$parent"; do
    [ -d "$d" ] || continue
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

lock_dir() {
  # fd 9 is never passed on to dockerd (closed in its redirections).
  exec 9>"$1/.dockerd.sh.lock"
  flock 9
}

tail_log() {
  local logf="$1"
  if [ -f "$logf" ]; then
    log "----- last lines of $logf -----"
    tail -n 40 "$logf" >&2 || true
    log "-----"
  fi
}

# ---------------------------------------------------------------- install

cmd_install() {
  local need=() b
  # An engine from elsewhere (e.g. docker-ce) is fine too: only install docker.io
  # when a piece is missing.
  for b in dockerd containerd containerd-shim-runc-v2 runc; do
    command -v "$b" >/dev/null 2>&1 || { need+=(docker.io); break; }
  done
  pkg_installed busybox-static || need+=(busybox-static)
  if [ "${#need[@]}" -gt 0 ]; then
    log "installing: ${need[*]}"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}")
    if ! "${apt[@]}" >&2; then
      log "install failed; running apt-get update and retrying"
      DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
      "${apt[@]}" >&2
    fi
  fi
  for b in dockerd containerd containerd-shim-runc-v2 runc; do
    command -v "$b" >/dev/null 2>&1 || die "$b missing after install"
  done
  [ -x /bin/busybox ] || die "/bin/busybox missing after install"
  # docker.io also ships a 20.10 client at /usr/bin/docker; a newer client earlier on
  # PATH (e.g. /usr/local/bin/docker) wins and works (it negotiates API 1.41).
  log "dockerd: $(dockerd --version)"
  log "client:  $(docker_cli) ($("$(docker_cli)" --version 2>/dev/null || echo '?'))"
}

# ---------------------------------------------------------------- start

engine_pid() {
  # PID of the live dockerd serving DIR, or nothing.
  local dir="$1" pid
  pid="$(read_pid "$dir/dockerd.pid")"
  if pid_matches "$pid" "unix://$dir/docker.sock"; then echo "$pid"; fi
}

api_ok() { dk "$1" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

cmd_start() {
  [ $# -eq 1 ] || usage
  command -v dockerd >/dev/null 2>&1 || die "dockerd not installed (run: $0 install)"
  local dir
  dir="$(abs_dir "$1")"
  [ "${#dir}" -le "$MAX_DIR_LEN" ] \
    || die "DIR too long (${#dir} > $MAX_DIR_LEN bytes: unix socket paths under it would exceed 107): $dir"
  local sock="unix://$dir/docker.sock" logf="$dir/dockerd.log"
  lock_dir "$dir"

  local pid
  pid="$(engine_pid "$dir")"
  if [ -z "$pid" ]; then
    # Leftovers of an engine that died hard (SIGKILL, crash): clear them first.
    stop_engine "$dir" quiet
    printf '{}\n' >"$dir/daemon.json"
    mkdir -p "$dir/data" "$dir/exec"
    log "starting dockerd for $dir (log: $logf)"
    {
      echo "===== $(date -u +%FT%TZ) dockerd.sh start ====="
    } >>"$logf"
    # A node's engine: its own mount namespace, with the node's paths (see the header).
    local wrap=() more=()
    if [ -n "$NODE_ROOT" ]; then
      # shellcheck disable=SC2016 # expanded by the inner shell
      wrap=(unshare --mount --propagation private -- sh -ec '
        root=$1; shift
        for p in $NODE_PATHS; do
          mkdir -p "$root$p" "$p"
          mount --bind "$root$p" "$p"
        done
        mount -t tmpfs -o mode=0755 tmpfs /run
        exec "$@"' sh "$NODE_ROOT")
      more=(-H unix:///run/docker.sock)
      export NODE_PATHS
    fi
    setsid "${wrap[@]}" dockerd "${more[@]}" \
      --config-file "$dir/daemon.json" \
      --data-root "$dir/data" \
      --exec-root "$dir/exec" \
      --pidfile "$dir/dockerd.pid" \
      -H "$sock" \
      --storage-driver=vfs \
      --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
      --bridge=none \
      --userland-proxy=false \
      --cgroup-parent "$(cgroup_parent_for "$dir")" \
      --exec-opt native.cgroupdriver=cgroupfs \
      --log-level "$LOG_LEVEL" \
      </dev/null >>"$logf" 2>&1 9>&- &
    pid=$!
    # The pidfile is written by dockerd itself a moment later; record ours now so
    # that `stop` finds the engine even if it is killed before that.
    echo "$pid" >"$dir/dockerd.launch.pid"
  else
    log "engine for $dir already running (pid $pid)"
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  until api_ok "$sock"; do
    if ! alive "$pid"; then
      tail_log "$logf"
      die "dockerd for $dir exited during start-up (see $logf)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail_log "$logf"
      die "dockerd for $dir did not answer on $sock within ${START_TIMEOUT}s (pid $pid still running; see $logf)"
    fi
    sleep 0.1
  done
  echo "$sock"
}

# ---------------------------------------------------------------- stop

# stop_engine DIR [quiet]: everything by PID; safe when nothing runs.
stop_engine() {
  local dir="$1" quiet="${2:-}"
  local sock="unix://$dir/docker.sock"
  local ctrd_sock="$dir/exec/containerd/containerd.sock"
  local parent pid pids p
  parent="$(cgroup_parent_for "$dir")"

  # 1. dockerd: SIGTERM (it stops its containers and its containerd), bounded wait, SIGKILL.
  pids=()
  for pid in "$(read_pid "$dir/dockerd.pid")" "$(read_pid "$dir/dockerd.launch.pid")"; do
    if pid_matches "$pid" "$sock"; then pids+=("$pid"); fi
  done
  if [ "${#pids[@]}" -gt 0 ]; then
    mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -u)
    if [ "$KILL_CONTAINERS" = 1 ]; then
      local running=()
      mapfile -t running < <(dk "$sock" ps -q 2>/dev/null || true)
      if [ "${#running[@]}" -gt 0 ]; then
        [ -n "$quiet" ] || log "killing running containers of $dir: ${running[*]}"
        dk "$sock" kill "${running[@]}" >/dev/null 2>&1 || true
      fi
    fi
    [ -n "$quiet" ] || log "stopping dockerd for $dir (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone "$STOP_TIMEOUT" "${pids[@]}"; then
      log "dockerd for $dir still running after ${STOP_TIMEOUT}s: SIGKILL"
      kill -KILL "${pids[@]}" 2>/dev/null || true
      wait_gone 5 "${pids[@]}" || log "warning: dockerd pid ${pids[*]} survived SIGKILL"
    fi
  fi

  # 2. container processes left behind (only if dockerd was killed or crashed):
  #    everything in this engine's own cgroup parent.
  mapfile -t pids < <(cgroup_pids "$parent")
  if [ "${#pids[@]}" -gt 0 ]; then
    log "killing leftover container processes of $dir: ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_gone 5 "${pids[@]}" || log "warning: container processes survived SIGKILL: ${pids[*]}"
  fi
  cgroup_cleanup "$parent"

  # 3. containerd shims of this engine: their argv has `-address DIR/exec/containerd/containerd.sock`.
  mapfile -t pids < <(pids_with_arg "$ctrd_sock")
  # ...and the managed containerd itself (pidfile written by dockerd).
  pid="$(read_pid "$dir/exec/containerd/containerd.pid")"
  if pid_matches "$pid" "$dir/exec/containerd/"; then pids+=("$pid"); fi
  if [ "${#pids[@]}" -gt 0 ]; then
    [ -n "$quiet" ] || log "stopping leftover containerd/shims of $dir: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone 5 "${pids[@]}"; then
      kill -KILL "${pids[@]}" 2>/dev/null || true
      wait_gone 5 "${pids[@]}" || log "warning: processes survived SIGKILL: ${pids[*]}"
    fi
  fi

  # 4. mounts left under DIR (container /dev/shm tmpfs etc.), deepest first,
  #    so that the caller can `rm -rf DIR`.
  local m
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo 2>/dev/null \
    | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: cannot unmount $m"
      done

  rm -f "$dir/dockerd.pid" "$dir/dockerd.launch.pid" "$dir/exec/containerd/containerd.pid"
}

cmd_stop() {
  [ $# -eq 1 ] || usage
  [ -d "$1" ] || { log "$1: no such directory, nothing to stop"; return 0; }
  local dir
  dir="$(abs_dir "$1")"
  lock_dir "$dir"
  stop_engine "$dir"
}

# ---------------------------------------------------------------- image

busybox_version() { dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown; }

# Build (once) the rootfs tarball; prints its path.
rootfs_tarball() {
  local tar="$HOME_DIR/busybox-rootfs.tar" stamp="$HOME_DIR/busybox-rootfs.stamp" want
  want="recipe=$ROOTFS_RECIPE busybox-static=$(busybox_version)"
  if [ -s "$tar" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
    echo "$tar"
    return 0
  fi
  mkdir -p "$HOME_DIR"
  exec 8>"$HOME_DIR/.busybox-rootfs.lock"
  flock 8
  if [ -s "$tar" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
    exec 8>&-
    echo "$tar"
    return 0
  fi
  if ! [ -x /bin/busybox ] || ! pkg_installed busybox-static; then
    die "busybox-static not installed (run: $0 install)"
  fi
  log "building busybox rootfs tarball $tar"
  local work
  work="$(mktemp -d "$HOME_DIR/rootfs.XXXXXX")"
  local r="$work/rootfs"
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,run,var/www,var/log}
  mkdir -m 1777 "$r/tmp" "$r/var/tmp"
  cp /bin/busybox "$r/bin/busybox"
  chmod 0755 "$r/bin/busybox"
  local a
  /bin/busybox --list-full | while read -r a; do
    [ "$a" = bin/busybox ] && continue
    case "$a" in */*) [ -d "$r/${a%/*}" ] || mkdir -p "$r/${a%/*}" ;; esac
    ln -sf /bin/busybox "$r/$a"
  done
  for a in sh sleep httpd nc echo cat kill; do
    [ -L "$r/bin/$a" ] || [ -L "$r/usr/bin/$a" ] || [ -L "$r/usr/sbin/$a" ] || [ -L "$r/sbin/$a" ] \
      || die "busybox has no $a applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
  # httpd -h /var/www serves this at /.
  printf 'nodeagent-test busybox httpd ok\n' >"$r/var/www/index.html"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$r" -cf "$work/rootfs.tar" .
  mv -f "$work/rootfs.tar" "$tar"
  echo "$want" >"$stamp"
  rm -rf "$work"
  exec 8>&-
  echo "$tar"
}

cmd_image() {
  [ $# -eq 1 ] || usage
  local sock="$1"
  case "$sock" in
    unix://*) ;;
    /*) sock="unix://$sock" ;;
  esac
  api_ok "$sock" || die "no engine answers on $sock (run: $0 start DIR)"
  local tar sum
  tar="$(rootfs_tarball)"
  sum="$(sha256sum "$tar" | cut -c1-64)"
  # Up to date only if it was imported from this very tarball.
  if [ "$(dk "$sock" image inspect --format '{{index .Config.Labels "nodeagent.rootfs.sha256"}}' \
          "$IMAGE" 2>/dev/null || true)" = "$sum" ]; then
    echo "$IMAGE"
    return 0
  fi
  log "importing $tar into $sock as $IMAGE"
  dk "$sock" import \
    --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'WORKDIR /' \
    --change 'CMD ["sh"]' \
    --change "LABEL nodeagent.rootfs.sha256=$sum" \
    --message "nodeagent test world: busybox-static $(busybox_version)" \
    "$tar" "$IMAGE" >/dev/null
  echo "$IMAGE"
}

# ---------------------------------------------------------------- main

[ $# -ge 1 ] || usage
sub="$1"
shift
case "$sub" in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  image) cmd_image "$@" ;;
  -h | --help | help) usage ;;
  *) log "unknown subcommand: $sub"; usage ;;
esac
