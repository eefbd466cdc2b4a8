#!/usr/bin/env bash
# Stand-in images for nodeagent's three foundational images, for the test world's
# private Docker engines (no registry is reachable there):
#
#   tests/world/standins.sh build SOCKET   import the stand-ins into the engine at SOCKET
#                                          (unix://PATH or PATH); prints the image names,
#                                          one a line. Idempotent: an image whose label
#                                          says it was built from the same inputs is kept.
#   tests/world/standins.sh check SOCKET   build, then run the self-check on that engine
#                                          (containers with --network host); one line per
#                                          check; exit status 1 if any failed.
#
# Images (names as nodeagent's defaults spell them):
#   docker.io/consul:0.8.5 (also tagged docker.io/hashicorp/consul:1.20)
#   gliderlabs/registrator:v7
#   docker.io/buoyantio/linkerd:1.4.6
# Each is busybox-static (Debian's /bin/busybox, applets as symlinks) plus the
# scripts under tests/world/standins/<name>/rootfs, with the real image's user
# accounts, entrypoint, command, environment and ownerships. What each imitates,
# and what not: tests/world/standins/README.md.
#
# Prerequisites: `tests/world/dockerd.sh install` (dockerd + busybox-static); an
# engine from `tests/world/dockerd.sh start DIR`. Run as root (the rootfs is built
# with real ownerships, uid 100 for consul's directories).
# Results go to stdout, logs to stderr.
#
# Environment:
#   NODEAGENT_DOCKER_CLI     docker client (default: `docker` on PATH, else /usr/bin/docker)
#   NODEAGENT_WORLD_HOME     cache dir for the lock file (default $HOME/.cache/nodeagent-world)
set -euo pipefail

# Bump when the build recipe (not the scripts: they are hashed) changes.
RECIPE=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
SRC="$HERE/standins"
HOME_DIR="${NODEAGENT_WORLD_HOME:-$HOME/.cache/nodeagent-world}"
LABEL=nodeagent.standin.sha256

unset DOCKER_HOST DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH DOCKER_TLS 2>/dev/null || true
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { echo "standins.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

docker_cli() {
  if [ -n "${NODEAGENT_DOCKER_CLI:-}" ]; then
    echo "$NODEAGENT_DOCKER_CLI"
  elif command -v docker >/dev/null 2>&1; then
    command -v docker
  elif [ -x /usr/bin/docker ]; then
    echo /usr/bin/docker
  else
    die "no docker client found (set NODEAGENT_DOCKER_CLI or run: tests/world/dockerd.sh install)"
  fi
}

SOCK=
dk() { "$(docker_cli)" -H "$SOCK" "$@"; }

set_socket() {
  case "$1" in
    unix://*) SOCK="$1" ;;
    /*) SOCK="unix://$1" ;;
    *) die "SOCKET must be unix:///path or /path: $1" ;;
  esac
  dk version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no engine answers on $SOCK (run: tests/world/dockerd.sh start DIR)"
}

busybox_version() { dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown; }

# ---------------------------------------------------------------- image definitions

STANDINS=(consul registrator linkerd)

names_consul=(docker.io/consul:0.8.5 docker.io/hashicorp/consul:1.20)
changes_consul=(
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  'WORKDIR /'
  'VOLUME /consul/data'
  'EXPOSE 8300 8301 8301/udp 8302 8302/udp 8500 8600 8600/udp'
  'ENTRYPOINT ["docker-entrypoint.sh"]'
  'CMD ["agent", "-dev", "-client", "0.0.0.0"]'
  'LABEL nodeagent.standin=consul'
)
exec_consul=(bin/consul sbin/su-exec usr/local/bin/docker-entrypoint.sh usr/libexec/consul-standin/http.sh)
# Directories created by the Dockerfile, owned by consul:consul (100:1000).
finish_consul() {
  local r="$1"
  mkdir -p "$r/consul/data" "$r/consul/config"
  chown -R 100:1000 "$r/consul"
  chmod 0755 "$r/consul" "$r/consul/data" "$r/consul/config"
}

names_registrator=(gliderlabs/registrator:v7)
changes_registrator=(
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  'ENV DOCKER_HOST=unix:///tmp/docker.sock'
  'WORKDIR /'
  'ENTRYPOINT ["/bin/registrator"]'
  'LABEL nodeagent.standin=registrator'
)
exec_registrator=(bin/registrator)
finish_registrator() { :; }

names_linkerd=(docker.io/buoyantio/linkerd:1.4.6)
changes_linkerd=(
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  'ENV LANG=C.UTF-8'
  'ENV JAVA_HOME=/docker-java-home/jre'
  'ENV JAVA_VERSION=8u151'
  'ENV L5D_HOME=/io.buoyant/linkerd/1.4.6'
  'ENV L5D_EXEC=/io.buoyant/linkerd/1.4.6/bundle-exec'
  'WORKDIR /io.buoyant/linkerd/1.4.6'
  'ENTRYPOINT ["/io.buoyant/linkerd/1.4.6/bundle-exec"]'
  'LABEL nodeagent.standin=linkerd'
)
exec_linkerd=(io.buoyant/linkerd/1.4.6/bundle-exec usr/libexec/linkerd-standin/admin.sh usr/libexec/linkerd-standin/router.sh)
finish_linkerd() { :; }

# ---------------------------------------------------------------- build

# base_rootfs DIR: busybox and its applets (symlinks), the usual directories.
base_rootfs() {
  local r="$1" a
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,root,proc,sys,dev,run,home,var/log}
  mkdir -p "$r/tmp" "$r/var/tmp"
  cp /bin/busybox "$r/bin/busybox"
  /bin/busybox --list-full | while read -r a; do
    [ "$a" = bin/busybox ] && continue
    [ -d "$r/${a%/*}" ] || mkdir -p "$r/${a%/*}"
    ln -s /bin/busybox "$r/$a"
  done
  for a in sh nc su start-stop-daemon awk sed wget timeout stat chown id ip hostname date readlink head mktemp; do
    [ -e "$r/bin/$a" ] || [ -e "$r/usr/bin/$a" ] || [ -e "$r/sbin/$a" ] || [ -e "$r/usr/sbin/$a" ] \
      || die "busybox has no $a applet"
  done
}

# image_rootfs NAME DIR BASE: a copy of BASE (from base_rootfs) + the stand-in's
# files, modes and owners normalized.
image_rootfs() {
  local name="$1" r="$2" base="$3" f
  cp -a "$base/." "$r/"
  [ -d "$SRC/$name/rootfs" ] || die "missing $SRC/$name/rootfs"
  # Overlay (regular files and directories only: the repository holds no links).
  (cd "$SRC/$name/rootfs" && find . -type d) | while read -r f; do mkdir -p "$r/$f"; done
  (cd "$SRC/$name/rootfs" && find . -type f) | while read -r f; do
    rm -f "$r/$f"
    cp "$SRC/$name/rootfs/$f" "$r/$f"
  done
  chown -R 0:0 "$r"
  find "$r" -type d -exec chmod 0755 {} +
  find "$r" -type f -exec chmod 0644 {} +
  chmod 0755 "$r/bin/busybox"
  chmod 0700 "$r/root"
  chmod 1777 "$r/tmp" "$r/var/tmp"
  local -n execs="exec_$name"
  for f in "${execs[@]}"; do
    [ -f "$r/$f" ] || die "$name: missing executable $f"
    chmod 0755 "$r/$f"
  done
  "finish_$name" "$r"
}

# build_one NAME WORK: import the image unless up to date; logs what it does.
build_one() {
  local name="$1" work="$2"
  [ -d "$work/base" ] || { mkdir -p "$work/base" && base_rootfs "$work/base"; }
  local -n names="names_$name" changes="changes_$name"
  local r="$work/$name" tar="$work/$name.tar" sum n current uptodate=1
  mkdir -p "$r"
  image_rootfs "$name" "$r" "$work/base"
  tar --sort=name --numeric-owner --mtime=@0 --format=gnu -C "$r" -cf "$tar" .
  sum="$( { echo "recipe=$RECIPE"; sha256sum <"$tar" | cut -c1-64; printf '%s\n' "${changes[@]}"; } \
          | sha256sum | cut -c1-64)"
  for n in "${names[@]}"; do
    current="$(dk image inspect --format "{{index .Config.Labels \"$LABEL\"}}" "$n" 2>/dev/null || true)"
    [ "$current" = "$sum" ] || uptodate=0
  done
  if [ "$uptodate" = 1 ]; then
    log "$name: up to date (${names[*]})"
    return 0
  fi
  local args=() c
  for c in "${changes[@]}"; do args+=(--change "$c"); done
  args+=(--change "LABEL $LABEL=$sum")
  log "$name: importing as ${names[*]}"
  dk import "${args[@]}" \
    --message "nodeagent test world stand-in ($name), busybox-static $(busybox_version)" \
    "$tar" "${names[0]}" >/dev/null
  for n in "${names[@]:1}"; do dk tag "${names[0]}" "$n"; done
}

cmd_build() {
  [ $# -eq 1 ] || usage
  set_socket "$1"
  [ "$(id -u)" = 0 ] || die "must run as root (the images hold files owned by uid 100)"
  [ -x /bin/busybox ] || die "/bin/busybox missing (run: tests/world/dockerd.sh install)"
  mkdir -p "$HOME_DIR"
  # One build at a time per engine.
  exec 8>"$HOME_DIR/.standins-$(printf '%s' "$SOCK" | sha256sum | cut -c1-12).lock"
  flock 8
  local work name n
  work="$(mktemp -d "${TMPDIR:-/tmp}/standins-build.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  for name in "${STANDINS[@]}"; do build_one "$name" "$work"; done
  rm -rf "$work"
  trap - EXIT
  exec 8>&-
  for name in "${STANDINS[@]}"; do
    local -n names="names_$name"
    for n in "${names[@]}"; do echo "$n"; done
    unset -n names
  done
}

# ---------------------------------------------------------------- check

CHECK_FAILS=0
CHECK_TMP=
CHECK_ID=
USED_PORTS=" "

pass() { echo "ok   $1"; }
fail() { echo "FAIL $1${2:+: $2}"; CHECK_FAILS=$((CHECK_FAILS + 1)); }
skip() { echo "skip $1${2:+: $2}"; }
# expect NAME CONDITION-STATUS [DETAIL]
expect() { if [ "$2" = 0 ]; then pass "$1"; else fail "$1" "${3:-}"; fi; }

is_listening() { # PORT
  local h
  h="$(printf ':%04X' "$1")"
  awk -v h="$h" 'FNR > 1 && $4 == "0A" && toupper(substr($2, length($2) - 4)) == h { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# free_port VAR: a TCP port nobody listens on (and not handed out before).
free_port() {
  local fp_port
  while :; do
    fp_port=$((20000 + RANDOM % 30000))
    case "$USED_PORTS" in *" $fp_port "*) continue ;; esac
    is_listening "$fp_port" && continue
    USED_PORTS="$USED_PORTS$fp_port "
    printf -v "$1" '%s' "$fp_port"
    return 0
  done
}

# http METHOD URL: sets HTTP_CODE and HTTP_BODY (HTTP_CODE=000 when nothing answers).
http() {
  local method="$1" url="$2" hp path fd resp
  hp="${url#http://}"
  path="/${hp#*/}"
  hp="${hp%%/*}"
  HTTP_CODE=000
  HTTP_BODY=
  { exec {fd}<>"/dev/tcp/${hp%:*}/${hp##*:}"; } 2>/dev/null || return 1
  printf '%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$method" "$path" "$hp" >&"$fd"
  resp="$(timeout 5 cat <&"$fd" 2>/dev/null | tr -d '\r')"
  exec {fd}>&-
  HTTP_CODE="$(printf '%s\n' "$resp" | head -n1 | awk '{ print $2 }')"
  [ -n "$HTTP_CODE" ] || HTTP_CODE=000
  HTTP_BODY="${resp#*$'\n\n'}"
  [ "$HTTP_BODY" != "$resp" ] || HTTP_BODY=
}

run_c() { # NAME DOCKER-RUN-ARGS...: a detached container of this check; prints nothing
  local name="standin-check-$CHECK_ID-$1"
  shift
  dk rm -f "$name" >/dev/null 2>&1 || true
  dk run -d --name "$name" --label "nodeagent.standin.check=$CHECK_ID" --network host "$@" >/dev/null
}
cname() { echo "standin-check-$CHECK_ID-$1"; }
logs() { dk logs "$(cname "$1")" 2>&1; }
state() { dk inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(cname "$1")" 2>/dev/null; }
# wait_log NAME TEXT SECONDS: until the logs hold TEXT; status 1 on timeout.
wait_log() {
  local deadline=$((SECONDS + $3))
  until logs "$1" | grep -qF -- "$2"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    case "$(state "$1")" in exited*) logs "$1" | grep -qF -- "$2"; return ;; esac
    sleep 0.1
  done
}
# wait_exit NAME SECONDS: prints the exit code once exited; status 1 on timeout.
wait_exit() {
  local deadline=$((SECONDS + $2)) st
  while :; do
    st="$(state "$1")"
    case "$st" in exited*) echo "${st#exited }"; return 0 ;; esac
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}
# stop_timed NAME: docker stop (10 s grace); prints "EXIT SECONDS".
stop_timed() {
  local t0 t1
  t0="$(date +%s%N)"
  dk stop -t 10 "$(cname "$1")" >/dev/null 2>&1
  t1="$(date +%s%N)"
  echo "$(dk inspect -f '{{.State.ExitCode}}' "$(cname "$1")") $(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", d / 1e9 }')"
}
quick() { awk -v s="$1" 'BEGIN { exit !(s < 3) }'; }

# toml_array SECTION KEY: the string elements of KEY = [...] in SECTION of nodeagent's
# defaults.toml, one a line (simple strings only).
toml_array() {
  local f="$HERE/../../src/config/defaults.toml"
  [ -f "$f" ] || return 1
  awk -v sec="[$1]" -v key="$2" '
    /^\[/ { in_sec = ($0 == sec) }
    in_sec && index($0, key " = [") == 1 {
      s = substr($0, index($0, "[") + 1); sub(/\][ \t]*$/, "", s)
      n = split(s, a, /", *"/)
      for (i = 1; i <= n; i++) { gsub(/^ *"|" *$/, "", a[i]); print a[i] }
      found = 1
    }
    END { exit !found }' "$f"
}

cleanup_check() {
  local ids
  if [ -n "$SOCK" ] && [ -n "$CHECK_ID" ]; then
    ids="$(dk ps -aq --filter "label=nodeagent.standin.check=$CHECK_ID" 2>/dev/null || true)"
    # shellcheck disable=SC2086
    [ -z "$ids" ] || dk rm -f -v $ids >/dev/null 2>&1 || true
  fi
  [ -z "$CHECK_TMP" ] || rm -rf "$CHECK_TMP"
}

consul_json() { # FILE PORT CLIENT_ADDR: the rendered consul-agent.json, as nodeagent's template
  cat >"$1" <<JSON
{
  "advertise_addr": "127.0.0.1",
  "client_addr": "$3",
  "datacenter": "dc1",
  "node_name": "standin-check",
  "retry_join": ["10.0.0.5", "10.0.0.6"],
  "ports": {"http": $2}
}
JSON
}

check_consul() {
  local img=docker.io/consul:0.8.5 t="$CHECK_TMP/consul" port out rc st code secs id id2 cmd=()
  mapfile -t cmd < <(toml_array tasks.consul-agent.container command \
    || printf '%s\n' consul agent -ui -config-file /etc/consul/consul-agent.json -data-dir /consul/data)
  local vols=(-v "$t/config:/etc/consul:ro" -v "$t/data:/consul/data" -v "${SOCK#unix://}:/var/run/docker.sock:ro")

  out="$(dk image inspect -f '{{json .Config.Entrypoint}} {{json .Config.Cmd}} user={{.Config.User}}' "$img")"
  [ "$out" = '["docker-entrypoint.sh"] ["agent","-dev","-client","0.0.0.0"] user=' ]
  expect "consul: image entrypoint docker-entrypoint.sh, CMD agent -dev -client 0.0.0.0, runs as root" $? "$out"
  out="$(dk image inspect -f '{{json .Config.Entrypoint}}' docker.io/hashicorp/consul:1.20 2>&1)"
  [ "$out" = '["docker-entrypoint.sh"]' ]
  expect "consul: also tagged docker.io/hashicorp/consul:1.20" $? "$out"
  out="$(dk run --rm --network host "$img" su-exec consul:consul id 2>&1)"
  [[ "$out" == "uid=100(consul) gid=1000(consul)"* ]]
  expect "consul: su-exec consul:consul runs as uid 100 gid 1000" $? "$out"
  out="$(dk run --rm --network host --entrypoint stat "$img" -c '%n %u:%g' /consul/data /consul/config 2>&1 | tr '\n' ' ')"
  [ "$out" = "/consul/data 100:1000 /consul/config 100:1000 " ]
  expect "consul: /consul/data and /consul/config owned by 100:1000 in the image" $? "$out"

  # A config directory made under UMask=0027: 0750 root:root, file 0640.
  free_port port
  mkdir -p "$t"
  (umask 0027 && mkdir "$t/config" "$t/data" && consul_json "$t/config/consul-agent.json" "$port" 0.0.0.0)
  run_c consul-denied --init "${vols[@]}" "$img" "${cmd[@]}"
  rc="$(wait_exit consul-denied 10)"
  out="$(logs consul-denied)"
  [ "$rc" = 1 ] && grep -qF "==> Error reading '/etc/consul/consul-agent.json': open /etc/consul/consul-agent.json: permission denied" <<<"$out"
  expect "consul: config dir 0750 root:root (UMask=0027) -> exit 1, permission denied" $? "exit=$rc: $(tail -n1 <<<"$out")"

  # The same, readable: 0755 dir, 0644 file.
  chmod 0755 "$t/config"
  chmod 0644 "$t/config/consul-agent.json"
  run_c consul --init "${vols[@]}" "$img" "${cmd[@]}"
  wait_log consul "==> Consul agent running!" 10
  expect "consul: default command with a readable config -> agent running" $? "$(logs consul | tail -n2 | tr '\n' ' ')"
  out="$(dk top "$(cname consul)" -o pid,uid,gid,args 2>&1 | awk '/\/bin\/consul agent/ { print $2 ":" $3; exit }')"
  [ "$out" = "100:1000" ]
  expect "consul: the agent process runs as uid 100 gid 1000" $? "uid:gid=$out"
  out="$(stat -c '%u:%g' "$t/data" 2>&1)"
  id="$(cat "$t/data/node-id" 2>/dev/null || true)"
  [ "$out" = "100:1000" ] && [[ "$id" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]]
  expect "consul: host data dir chowned to 100:1000, holds node-id" $? "owner=$out node-id=$id"
  http GET "http://127.0.0.1:$port/v1/status/leader"
  [ "$HTTP_CODE" = 200 ] && [ "$HTTP_BODY" = '"10.0.0.5:8300"' ]
  expect "consul: GET /v1/status/leader -> \"10.0.0.5:8300\" (first retry_join)" $? "$HTTP_CODE $HTTP_BODY"
  http GET "http://127.0.0.1:$port/v1/agent/self"
  [ "$HTTP_CODE" = 200 ] && [[ "$HTTP_BODY" == *"\"NodeName\":\"standin-check\""* ]] && [[ "$HTTP_BODY" == *"\"NodeID\":\"$id\""* ]]
  expect "consul: GET /v1/agent/self -> NodeName, NodeID" $? "$HTTP_CODE $HTTP_BODY"
  http PUT "http://127.0.0.1:$port/v1/agent/maintenance?enable=true&reason=check"
  code="$HTTP_CODE"
  http PUT "http://127.0.0.1:$port/v1/agent/maintenance"
  code="$code $HTTP_CODE"
  http GET "http://127.0.0.1:$port/v1/agent/leave"
  code="$code $HTTP_CODE"
  http GET "http://127.0.0.1:$port/v1/nothing"
  code="$code $HTTP_CODE"
  [ "$code" = "200 400 405 404" ]
  expect "consul: maintenance 200, without enable 400, GET leave 405, unknown 404" $? "$code"
  logs consul | grep -qF "agent: http: Request PUT /v1/agent/maintenance?enable=true&reason=check"
  expect "consul: logs one line per request" $?
  http PUT "http://127.0.0.1:$port/v1/agent/leave"
  code="$HTTP_CODE"
  rc="$(wait_exit consul 3)"
  [ "$code" = 200 ] && [ "$rc" = 0 ]
  expect "consul: PUT /v1/agent/leave -> 200, the agent exits 0" $? "leave=$code exit=$rc"

  # Again on the same data dir: node-id kept; then SIGTERM.
  run_c consul2 --init "${vols[@]}" "$img" "${cmd[@]}"
  wait_log consul2 "==> Consul agent running!" 10
  id2="$(cat "$t/data/node-id" 2>/dev/null || true)"
  logs consul2 | grep -qF "Node ID: '$id'" && [ "$id2" = "$id" ]
  expect "consul: restarted on the same data dir keeps its node-id" $? "$id -> $id2"
  read -r rc secs < <(stop_timed consul2)
  [ "$rc" = 0 ] && quick "$secs" && logs consul2 | grep -qF "==> Gracefully shutting down agent..."
  expect "consul: SIGTERM (docker stop, --init) -> leaves, exit 0 quickly" $? "exit=$rc after ${secs}s"

  run_c consul3 "${vols[@]}" "$img" "${cmd[@]}"
  wait_log consul3 "==> Consul agent running!" 10
  read -r rc secs < <(stop_timed consul3)
  [ "$rc" = 0 ] && quick "$secs"
  expect "consul: SIGTERM without --init (agent is PID 1) -> exit 0 quickly" $? "exit=$rc after ${secs}s"

  # client_addr 127.0.0.1: only loopback answers.
  local other
  other="$(ip -o -4 addr show 2>/dev/null | awk '{ split($4, a, "/"); if (a[1] !~ /^127\./) { print a[1]; exit } }')"
  if [ -n "$other" ]; then
    consul_json "$t/config/consul-agent.json" "$port" 127.0.0.1
    run_c consul4 --init "${vols[@]}" "$img" "${cmd[@]}"
    wait_log consul4 "==> Consul agent running!" 10
    http GET "http://127.0.0.1:$port/v1/status/leader"
    code="$HTTP_CODE"
    http GET "http://$other:$port/v1/status/leader"
    code="$code $HTTP_CODE"
    [ "$code" = "200 000" ]
    expect "consul: client_addr 127.0.0.1 -> answers on loopback, not on $other" $? "$code"
    dk rm -f "$(cname consul4)" >/dev/null 2>&1
    consul_json "$t/config/consul-agent.json" "$port" 0.0.0.0
  else
    skip "consul: client_addr 127.0.0.1 -> loopback only" "no other IPv4 address here"
  fi

  # A data dir uid 100 cannot write (already its own, so the entrypoint leaves it).
  mkdir -p "$t/data-ro"
  chown 100:1000 "$t/data-ro"
  chmod 0555 "$t/data-ro"
  run_c consul-ro --init -v "$t/config:/etc/consul:ro" -v "$t/data-ro:/consul/data" "$img" "${cmd[@]}"
  rc="$(wait_exit consul-ro 10)"
  [ "$rc" = 1 ] && logs consul-ro | grep -qF "==> Error starting agent: Failed to write node-id"
  expect "consul: data dir not writable by uid 100 -> exit 1, Failed to write node-id" $? "exit=$rc: $(logs consul-ro | tail -n1)"

  # A config that is not JSON.
  echo 'retry_join = ["10.0.0.5"]' >"$t/config/consul-agent.json"
  run_c consul-bad --init "${vols[@]}" "$img" "${cmd[@]}"
  rc="$(wait_exit consul-bad 10)"
  [ "$rc" = 1 ] && logs consul-bad | grep -qF "==> Error parsing /etc/consul/consul-agent.json:"
  expect "consul: config not a JSON object -> exit 1, Error parsing" $? "exit=$rc: $(logs consul-bad | tail -n1)"
  consul_json "$t/config/consul-agent.json" "$port" 0.0.0.0
}

check_registrator() {
  local img=gliderlabs/registrator:v7 t="$CHECK_TMP/registrator" port port2 port3 out rc secs ep=()
  mapfile -t ep < <(toml_array tasks.consul-registrator.container entrypoint || echo /bin/consul-registrator/start.sh)
  out="$(dk image inspect -f '{{json .Config.Entrypoint}} user={{.Config.User}} {{range .Config.Env}}{{.}} {{end}}' "$img")"
  [[ "$out" == '["/bin/registrator"] user= '*"DOCKER_HOST=unix:///tmp/docker.sock "* ]]
  expect "registrator: image entrypoint /bin/registrator, DOCKER_HOST=unix:///tmp/docker.sock, root" $? "$out"

  # A consul stand-in to register with, and nodeagent's start.sh pointing at it.
  free_port port
  mkdir -p "$t/consul-config" "$t/consul-data" "$t/bin"
  consul_json "$t/consul-config/consul-agent.json" "$port" 0.0.0.0
  run_c reg-consul --init -v "$t/consul-config:/etc/consul:ro" -v "$t/consul-data:/consul/data" \
    docker.io/consul:0.8.5 agent -config-file /etc/consul/consul-agent.json
  wait_log reg-consul "==> Consul agent running!" 10 || fail "registrator: consul stand-in for it did not start"
  printf '#!/bin/sh\nexec /bin/registrator -ip 127.0.0.1 -retry-attempts -1 consul://127.0.0.1:%s\n' "$port" >"$t/bin/start.sh"
  chmod 0755 "$t/bin/start.sh"
  local bin=(-v "$t/bin:/bin/consul-registrator:ro")

  run_c reg-nosock --init "${bin[@]}" --entrypoint "${ep[0]}" "$img"
  rc="$(wait_exit reg-nosock 10)"
  out="$(logs reg-nosock)"
  [ "$rc" = 1 ] && grep -qF "dial unix /tmp/docker.sock: connect: no such file or directory" <<<"$out"
  expect "registrator: no Docker socket mounted -> exit 1, dial unix /tmp/docker.sock" $? "exit=$rc: $(tail -n1 <<<"$out")"

  run_c reg --init "${bin[@]}" -v "${SOCK#unix://}:/tmp/docker.sock:ro" --entrypoint "${ep[0]}" "$img"
  wait_log reg "Listening for Docker events ..." 10 && sleep 1 && [ "$(state reg)" = "running 0" ]
  expect "registrator: engine socket at /tmp/docker.sock, consul up -> Listening for Docker events, stays up" $? "$(state reg): $(logs reg | tail -n1)"
  logs reg | grep -qF "Using consul adapter: consul://127.0.0.1:$port"
  expect "registrator: logs Using consul adapter: consul://127.0.0.1:$port" $?
  read -r rc secs < <(stop_timed reg)
  [ "$rc" = 143 ] && quick "$secs"
  expect "registrator: SIGTERM -> dies at once (exit 143 as the Go binary under an init)" $? "exit=$rc after ${secs}s"

  # -retry-attempts -1: waits for the registry.
  free_port port2
  run_c reg-wait --init -v "${SOCK#unix://}:/tmp/docker.sock:ro" "$img" \
    -ip 127.0.0.1 -retry-attempts -1 -retry-interval 200 "consul://127.0.0.1:$port2"
  wait_log reg-wait "Connecting to backend (2/-1)" 10
  expect "registrator: registry down, -retry-attempts -1 -> keeps retrying" $? "$(logs reg-wait | tail -n1)"
  mkdir -p "$t/consul2-config" "$t/consul2-data"
  consul_json "$t/consul2-config/consul-agent.json" "$port2" 0.0.0.0
  run_c reg-consul2 --init -v "$t/consul2-config:/etc/consul:ro" -v "$t/consul2-data:/consul/data" \
    docker.io/consul:0.8.5 agent -config-file /etc/consul/consul-agent.json
  wait_log reg-wait "Listening for Docker events ..." 10
  expect "registrator: ... and connects once consul is up" $? "$(logs reg-wait | tail -n1)"

  free_port port3
  run_c reg-fail --init -v "${SOCK#unix://}:/tmp/docker.sock:ro" "$img" \
    -retry-attempts 1 -retry-interval 100 "consul://127.0.0.1:$port3"
  rc="$(wait_exit reg-fail 10)"
  [ "$rc" = 1 ] && [ "$(logs reg-fail | grep -c 'Connecting to backend')" = 2 ] && logs reg-fail | grep -qF "connection refused"
  expect "registrator: registry down, -retry-attempts 1 -> 2 attempts, exit 1" $? "exit=$rc: $(logs reg-fail | tail -n1)"
}

check_linkerd() {
  local img=docker.io/buoyantio/linkerd:1.4.6 t="$CHECK_TMP/linkerd" admin out outp inp rc secs cmd=()
  mapfile -t cmd < <(toml_array tasks.linkerd.container command || printf '%s\n' -log.level=DEBUG /etc/linkerd/linkerd.yaml)
  out="$(dk image inspect -f '{{json .Config.Entrypoint}} user={{.Config.User}} wd={{.Config.WorkingDir}}' "$img")"
  [ "$out" = '["/io.buoyant/linkerd/1.4.6/bundle-exec"] user= wd=/io.buoyant/linkerd/1.4.6' ]
  expect "linkerd: image entrypoint /io.buoyant/linkerd/1.4.6/bundle-exec, root" $? "$out"

  free_port admin
  free_port outp
  free_port inp
  mkdir -p "$t/etc"
  cat >"$t/etc/linkerd.yaml" <<YAML
admin:
  ip: 0.0.0.0
  port: $admin

namers:
- kind: io.l5d.consul
  host: 127.0.0.1
  port: 8500

routers:
- protocol: http
  label: outgoing
  servers:
  - ip: 0.0.0.0
    port: $outp
  interpreter:
    kind: default
    transformers:
    - kind: io.l5d.port
      port: $inp
  dtab: |
    /svc => /#/io.l5d.consul/dc1;
- protocol: http
  label: incoming
  servers:
  - ip: 0.0.0.0
    port: $inp
YAML
  chmod 0600 "$t/etc/linkerd.yaml"
  local vols=(-e SERVICE_9990_NAME=linkerd -v "$t/etc:/etc/linkerd:ro")

  run_c linkerd --init "${vols[@]}" "$img" "${cmd[@]}"
  wait_log linkerd "initialized" 10
  expect "linkerd: config 0600 root:root -> starts (it runs as root)" $? "$(state linkerd): $(logs linkerd | tail -n1)"
  http GET "http://127.0.0.1:$admin/admin/ping"
  [ "$HTTP_CODE" = 200 ] && [ "$HTTP_BODY" = pong ]
  expect "linkerd: GET /admin/ping on admin.port -> pong" $? "$HTTP_CODE $HTTP_BODY"
  http GET "http://127.0.0.1:$admin/nothing"
  out="$HTTP_CODE"
  http GET "http://127.0.0.1:$outp/"
  out="$out $HTTP_CODE"
  [ "$out" = "404 502" ]
  expect "linkerd: admin unknown path 404, router port answers (502)" $? "$out"
  read -r rc secs < <(stop_timed linkerd)
  [ "$rc" = 0 ] && quick "$secs" && logs linkerd | grep -qF "Received SIGTERM"
  expect "linkerd: SIGTERM -> exit 0 quickly" $? "exit=$rc after ${secs}s"

  run_c linkerd-shutdown --init "${vols[@]}" "$img" "${cmd[@]}"
  wait_log linkerd-shutdown "initialized" 10
  http POST "http://127.0.0.1:$admin/admin/shutdown"
  rc="$(wait_exit linkerd-shutdown 3)"
  [ "$HTTP_CODE" = 200 ] && [ "$rc" = 0 ]
  expect "linkerd: POST /admin/shutdown -> exit 0" $? "shutdown=$HTTP_CODE exit=$rc"

  run_c linkerd-missing --init -v "$t/empty:/etc/linkerd:ro" "$img" "${cmd[@]}"
  rc="$(wait_exit linkerd-missing 10)"
  [ "$rc" = 1 ] && logs linkerd-missing | grep -qF "/etc/linkerd/linkerd.yaml"
  expect "linkerd: missing config -> exit 1 naming the file" $? "exit=$rc: $(logs linkerd-missing | tail -n1)"

  printf 'admin:\n  port: %s\n' "$admin" >"$t/etc/linkerd.yaml"
  run_c linkerd-invalid --init "${vols[@]}" "$img" "${cmd[@]}"
  rc="$(wait_exit linkerd-invalid 10)"
  [ "$rc" = 1 ] && logs linkerd-invalid | grep -qF "config error"
  expect "linkerd: config without routers -> exit 1, config error" $? "exit=$rc: $(logs linkerd-invalid | tail -n1)"
}

cmd_check() {
  [ $# -eq 1 ] || usage
  cmd_build "$1" >/dev/null
  # Checks grep the output of docker commands: no pipefail (grep -q stops reading).
  set +e +o pipefail
  CHECK_ID="$$"
  CHECK_TMP="$(mktemp -d "${TMPDIR:-/tmp}/standins-check.XXXXXX")"
  chmod 0755 "$CHECK_TMP"
  trap cleanup_check EXIT
  local t0=$SECONDS
  check_consul
  check_registrator
  check_linkerd
  cleanup_check
  trap - EXIT
  log "$CHECK_FAILS failed; took $((SECONDS - t0))s"
  [ "$CHECK_FAILS" = 0 ]
}

# ---------------------------------------------------------------- main

[ $# -ge 1 ] || usage
sub="$1"
shift
case "$sub" in
  build) cmd_build "$@" ;;
  check) cmd_check "$@" ;;
  -h | --help | help) usage ;;
  *) log "unknown subcommand: $sub"; usage ;;
esac
