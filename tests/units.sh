#!/usr/bin/env bash
# The systemd units, checked by systemd itself: `systemd-analyze verify` on the units with the
# binary installed into a temporary root (next to the system's own units), then
# `systemd-analyze security --offline=true`, whose exposure score is printed and must be at
# most 5.0. Installs Debian's systemd (for systemd-analyze) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "units.sh: $*" >&2; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
  log "installing systemd for systemd-analyze"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd >&2 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd >&2; }
fi
# The binary as the tests build it (`cargo build` alone would rebuild every dependency: the
# tests' tokio features differ).
cargo test --locked --no-run --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug/nodeagent
SYSTEM_UNITS=$(ls -d /usr/lib/systemd/system /lib/systemd/system 2>/dev/null | head -n1)

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/usr/bin" "$ROOT/usr/lib/systemd" "$ROOT/etc/systemd/system"
cp -a "$SYSTEM_UNITS" "$ROOT/usr/lib/systemd/system"
install -m 0755 "$BIN" "$ROOT/usr/bin/nodeagent"
install -m 0644 systemd/*.service "$ROOT/etc/systemd/system/"

echo "== systemd-analyze verify"
out=$(systemd-analyze verify --root="$ROOT" "$ROOT"/etc/systemd/system/nodeagent*.service 2>&1) || {
  echo "$out"; log "systemd-analyze verify failed"; exit 1; }
if [ -n "$out" ]; then echo "$out"; log "systemd-analyze verify printed warnings"; exit 1; fi
echo "clean: nodeagent.service nodeagent-prepare.service"

echo "== systemd-analyze security --offline=true"
status=0
for unit in nodeagent.service nodeagent-prepare.service; do
  line=$(systemd-analyze security --offline=true --root="$ROOT" "$unit" 2>&1 | grep "Overall exposure level") || {
    log "no exposure score for $unit"; exit 1; }
  echo "$line"
  score=$(echo "$line" | sed -E 's/.*: ([0-9.]+).*/\1/')
  awk -v s="$score" 'BEGIN { exit !(s <= 5.0) }' || { log "$unit: exposure $score is over 5.0"; status=1; }
done
exit $status
