#!/bin/sh
# Stand-in for hashicorp/docker-consul 0.X/docker-entrypoint.sh (the entrypoint of
# consul:0.8.5; hashicorp/consul:1.x keeps the same steps), in POSIX sh.
# The real one starts `#!/usr/bin/dumb-init /bin/sh`; there is no dumb-init here:
# run the container with --init (nodeagent does) to get an init as PID 1.
# Runs as root. Steps, as in the original:
#   CONSUL_BIND_INTERFACE / CONSUL_CLIENT_INTERFACE -> -bind= / -client= of that IPv4;
#   CONSUL_LOCAL_CONFIG -> written to /consul/config/local.json;
#   first arg "-..."      -> `consul "$@"`;
#   first arg "agent"     -> `consul agent -data-dir=/consul/data -config-dir=/consul/config ...`;
#   "version" or another consul subcommand -> `consul "$@"`;
#   command is consul     -> chown -R consul:consul /consul/data and /consul/config when
#                            not owned by the consul uid, then `su-exec consul:consul`;
#   exec the result.
set -e

CONSUL_BIND=
if [ -n "$CONSUL_BIND_INTERFACE" ]; then
  CONSUL_BIND_ADDRESS=$(ip -o -4 addr list "$CONSUL_BIND_INTERFACE" | head -n1 | awk '{print $4}' | cut -d/ -f1)
  if [ -z "$CONSUL_BIND_ADDRESS" ]; then
    echo "Could not find IP for interface '$CONSUL_BIND_INTERFACE', exiting"
    exit 1
  fi
  CONSUL_BIND="-bind=$CONSUL_BIND_ADDRESS"
  echo "==> Found address '$CONSUL_BIND_ADDRESS' for interface '$CONSUL_BIND_INTERFACE', setting bind option..."
fi

CONSUL_CLIENT=
if [ -n "$CONSUL_CLIENT_INTERFACE" ]; then
  CONSUL_CLIENT_ADDRESS=$(ip -o -4 addr list "$CONSUL_CLIENT_INTERFACE" | head -n1 | awk '{print $4}' | cut -d/ -f1)
  if [ -z "$CONSUL_CLIENT_ADDRESS" ]; then
    echo "Could not find IP for interface '$CONSUL_CLIENT_INTERFACE', exiting"
    exit 1
  fi
  CONSUL_CLIENT="-client=$CONSUL_CLIENT_ADDRESS"
  echo "==> Found address '$CONSUL_CLIENT_ADDRESS' for interface '$CONSUL_CLIENT_INTERFACE', setting client option..."
fi

CONSUL_DATA_DIR=/consul/data
CONSUL_CONFIG_DIR=/consul/config

if [ -n "$CONSUL_LOCAL_CONFIG" ]; then
  echo "$CONSUL_LOCAL_CONFIG" > "$CONSUL_CONFIG_DIR/local.json"
fi

case "$1" in
  -*) set -- consul "$@" ;;
esac

if [ "$1" = 'agent' ]; then
  shift
  # Unquoted on purpose, as in the original: empty options vanish.
  # shellcheck disable=SC2086
  set -- consul agent \
    -data-dir="$CONSUL_DATA_DIR" \
    -config-dir="$CONSUL_CONFIG_DIR" \
    $CONSUL_BIND \
    $CONSUL_CLIENT \
    "$@"
elif [ "$1" = 'version' ]; then
  set -- consul "$@"
elif consul --help "$1" 2>&1 | grep -q "consul $1"; then
  # As the original: a subcommand is whatever consul's help knows.
  set -- consul "$@"
fi

if [ "$1" = 'consul' ]; then
  if [ "$(stat -c %u /consul/data)" != "$(id -u consul)" ]; then
    chown consul:consul -R /consul/data
  fi
  if [ "$(stat -c %u /consul/config)" != "$(id -u consul)" ]; then
    chown consul:consul -R /consul/config
  fi
  if [ -n "${CONSUL_ALLOW_PRIVILEGED_PORTS+x}" ]; then
    # The original runs `setcap cap_net_bind_service=+ep /bin/consul`; a script
    # cannot carry file capabilities.
    echo "docker-entrypoint.sh (stand-in): CONSUL_ALLOW_PRIVILEGED_PORTS is not imitated" >&2
  fi
  set -- su-exec consul:consul "$@"
fi

exec "$@"
