#!/bin/sh
# One connection to a linkerd stand-in router server (run by nc -ll -e).
# $1 = protocol, $2 = label, $3 = the server's ip. HTTP routers answer 502:
# there is no service discovery behind the stand-in; other protocols hang up.
PROTO=$1
LABEL=$2
BIND_IP=$3
if [ "$PROTO" != http ] && [ "$PROTO" != h2 ]; then exit 0; fi
# shellcheck disable=SC1091
. /usr/libexec/linkerd-standin/http.sh
respond 502 "Bad Gateway" "text/plain" "No hosts are available for $LABEL (nodeagent test stand-in: no service discovery)"
exit 0
