#!/usr/bin/env bash
# Prepare the Python "test world" used by the integration tests.
#
# Ensures a virtualenv at ${NODEAGENT_WORLD_HOME:-$HOME/.cache/nodeagent-world}/venv
# with moto[server] pinned below. Idempotent and fast when already done.
# The ONLY line on stdout is the venv's python path (last line); everything
# else goes to stderr, so callers can do: PY=$(tests/world/setup.sh | tail -n1)
set -euo pipefail

MOTO_REQ='moto[server]==5.2.1'
MOTO_VERSION='5.2.1'
PYTHON="${PYTHON:-python3}"
HOME_DIR="${NODEAGENT_WORLD_HOME:-$HOME/.cache/nodeagent-world}"
VENV="$HOME_DIR/venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.nodeagent-world-stamp"

log() { echo "setup.sh: $*" >&2; }

venv_ok() {
  [ -x "$VPY" ] && "$VPY" -c 'import sys' >/dev/null 2>&1 \
    && "$VPY" -m pip --version >/dev/null 2>&1
}

# Installed-distribution check (cheap: no imports of the packages themselves).
CHECK="from importlib.metadata import version as v
assert v('moto') == '$MOTO_VERSION'
for p in ('boto3', 'botocore', 'werkzeug', 'flask', 'flask-cors'): v(p)"

# Already done? The stamp records what was installed; the check catches a
# venv whose packages were removed (or whose base python vanished) behind our back.
ready() {
  [ -x "$VPY" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$MOTO_REQ" ] \
    && "$VPY" -c "$CHECK" >/dev/null 2>&1
}
if ready; then
  echo "$VPY"
  exit 0
fi

# Serialize concurrent runs (e.g. several test binaries starting at once).
mkdir -p "$HOME_DIR"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$HOME_DIR/.setup.lock"
  flock 9
  if ready; then
    echo "$VPY"
    exit 0
  fi
fi

make_venv() {
  rm -rf "$VENV"
  mkdir -p "$HOME_DIR"
  "$PYTHON" -m venv "$VENV" >&2 && venv_ok
}

if ! venv_ok; then
  log "creating venv at $VENV with $PYTHON"
  if ! make_venv; then
    if command -v apt-get >/dev/null 2>&1; then
      log "venv creation failed; installing python3-venv with apt-get"
      apt-get update >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2
      make_venv || { log "venv creation failed again"; exit 1; }
    else
      log "venv creation failed and apt-get is not available"
      exit 1
    fi
  fi
fi

log "installing $MOTO_REQ into $VENV"
rm -f "$STAMP"
"$VPY" -m pip install --disable-pip-version-check --quiet "$MOTO_REQ" >&2
"$VPY" -c "$CHECK" >&2
"$VPY" -c "import moto.server, boto3" >&2
echo "$MOTO_REQ" > "$STAMP"
log "ready"
echo "$VPY"
