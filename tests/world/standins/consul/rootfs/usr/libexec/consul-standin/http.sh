#!/bin/sh
# One request to the consul stand-in's HTTP API. Run by `nc -ll -p PORT -e` with the
# connection on stdin/stdout; $1 = the agent's state directory (see /bin/consul).
# Logs one line per request to fd 3 (the agent's stdout).
ST=$1
LIB=/usr/libexec/consul-standin
CR=$(printf '\r')
# shellcheck disable=SC1091
. "$ST/env"

ts() { date '+%Y/%m/%d %H:%M:%S'; }
log() { echo "    $(ts) $*" >&3; }

respond() { # CODE REASON CONTENT-TYPE BODY
  len=$(printf '%s' "$4" | wc -c)
  printf 'HTTP/1.1 %s %s\r\nContent-Type: %s\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
    "$1" "$2" "$3" "$len" "$4"
}
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }

# Which local address was this connection made to? nc listens on all addresses;
# a connection to an address the agent would not listen on is dropped unanswered.
ino=$(readlink /proc/self/fd/0 2>/dev/null)
ino=${ino#socket:\[}
ino=${ino%\]}
set -- $(awk -v ino="$ino" -f "$LIB/sockaddr.awk" /proc/net/tcp /proc/net/tcp6 2>/dev/null)
local_ip=${1:-?}
remote=${3:-?}
case "$HTTP_ADDR" in
  0.0.0.0 | "") ;;
  *) if [ "$local_ip" != "$HTTP_ADDR" ]; then exit 0; fi ;;
esac

# Request line and headers, up to the blank line; then the body (Content-Length).
IFS= read -r -t 10 line || exit 0
line=${line%"$CR"}
method=${line%% *}
target=${line#* }
target=${target%% *}
clen=0
while IFS= read -r -t 10 h; do
  h=${h%"$CR"}
  [ -z "$h" ] && break
  case "$h" in
    [Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:*) clen=$(echo ${h#*:}) ;;
  esac
done
case "$clen" in '' | *[!0-9]*) clen=0 ;; esac
[ "$clen" -gt 0 ] && head -c "$clen" >/dev/null

path=${target%%\?*}
query=
case "$target" in *\?*) query=${target#*\?} ;; esac

# qparam NAME: its (URL-decoded) value; status 1 when absent.
qparam() {
  case "&$query&" in
    *"&$1="*) v=${query#*"$1="}; v=${v%%&*} ;;
    *"&$1&"*) v= ;;
    *) return 1 ;;
  esac
  printf '%s' "$v" | sed 's/+/ /g; s/%20/ /g; s/%2[Cc]/,/g; s/%3[Aa]/:/g; s/%2[Ff]/\//g'
}

log "[DEBUG] agent: http: Request $method $target (0s) from=$remote"

allow() { # METHOD: 405 unless the request uses it
  if [ "$method" != "$1" ]; then
    respond 405 "Method Not Allowed" "text/plain; charset=utf-8" ""
    exit 0
  fi
}

leader=$LEADER
[ -e "$ST/left" ] && leader=

case "$path" in
  /v1/status/leader)
    allow GET
    respond 200 OK application/json "$(json_str "$leader")"
    ;;
  /v1/status/peers)
    allow GET
    if [ -n "$leader" ]; then body="[$(json_str "$leader")]"; else body="[]"; fi
    respond 200 OK application/json "$body"
    ;;
  /v1/agent/self)
    allow GET
    respond 200 OK application/json "{\"Config\":{\"Datacenter\":$(json_str "$DATACENTER"),\"NodeName\":$(json_str "$NODE_NAME"),\"NodeID\":$(json_str "$NODE_ID"),\"Server\":$SERVER,\"ClientAddr\":$(json_str "$CLIENT_ADDR"),\"AdvertiseAddr\":$(json_str "$ADVERTISE_ADDR"),\"Version\":$(json_str "$VERSION"),\"Revision\":\"standin\"},\"Member\":{\"Name\":$(json_str "$NODE_NAME"),\"Addr\":$(json_str "$ADVERTISE_ADDR"),\"Port\":8301,\"Status\":1}}"
    ;;
  /v1/agent/members)
    allow GET
    respond 200 OK application/json "[{\"Name\":$(json_str "$NODE_NAME"),\"Addr\":$(json_str "$ADVERTISE_ADDR"),\"Port\":8301,\"Status\":1}]"
    ;;
  /v1/agent/services)
    allow GET
    respond 200 OK application/json "{}"
    ;;
  /v1/agent/checks)
    allow GET
    if [ -e "$ST/maint" ]; then
      respond 200 OK application/json "{\"_node_maintenance\":{\"Node\":$(json_str "$NODE_NAME"),\"CheckID\":\"_node_maintenance\",\"Name\":\"Node Maintenance Mode\",\"Status\":\"critical\",\"Notes\":$(json_str "$(cat "$ST/maint")"),\"Output\":\"\",\"ServiceID\":\"\",\"ServiceName\":\"\"}}"
    else
      respond 200 OK application/json "{}"
    fi
    ;;
  /v1/agent/maintenance)
    allow PUT
    if ! enable=$(qparam enable); then
      respond 400 "Bad Request" "text/plain; charset=utf-8" "Missing value for enable"
      exit 0
    fi
    case "$enable" in
      1 | t | T | TRUE | true | True)
        reason=$(qparam reason) || reason=
        [ -n "$reason" ] || reason="Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
        printf '%s' "$reason" > "$ST/maint"
        log "[INFO] agent: Node entered maintenance mode"
        ;;
      0 | f | F | FALSE | false | False)
        if [ -e "$ST/maint" ]; then
          rm -f "$ST/maint"
          log "[INFO] agent: Node left maintenance mode"
        fi
        ;;
      *)
        respond 400 "Bad Request" "text/plain; charset=utf-8" "Invalid value for enable: \"$enable\""
        exit 0
        ;;
    esac
    respond 200 OK "text/plain; charset=utf-8" ""
    ;;
  /v1/agent/leave)
    allow PUT
    : > "$ST/left"
    respond 200 OK "text/plain; charset=utf-8" ""
    # The answer is out before the agent goes away.
    exec 1>&- 0<&-
    kill -USR1 "$AGENT_PID" 2>/dev/null
    ;;
  *)
    respond 404 "Not Found" "text/plain; charset=utf-8" "404 page not found
"
    ;;
esac
exit 0
