#!/bin/sh
# One request to the linkerd stand-in's admin server (run by nc -ll -e).
# $1 = the linkerd process to signal on /admin/shutdown, $2 = admin ip.
MAIN_PID=$1
BIND_IP=$2
# shellcheck disable=SC1091
. /usr/libexec/linkerd-standin/http.sh
case "$path" in
  /admin/ping)
    respond 200 OK "text/plain;charset=utf-8" "pong"
    ;;
  /admin/shutdown)
    if [ "$method" != POST ]; then
      respond 405 "Method Not Allowed" "text/plain;charset=utf-8" ""
      exit 0
    fi
    respond 200 OK "text/plain;charset=utf-8" ""
    exec 1>&- 0<&-
    kill -USR1 "$MAIN_PID" 2>/dev/null
    ;;
  /admin/metrics.json)
    respond 200 OK "application/json;charset=utf-8" "{}"
    ;;
  *)
    respond 404 "Not Found" "text/plain;charset=utf-8" ""
    ;;
esac
exit 0
