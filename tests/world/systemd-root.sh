#!/usr/bin/env bash
# The systemd part of the test world: a minimal Debian 12 root filesystem with systemd as PID 1,
# for the boot test that installs nodeagent's .deb into it and boots it in a private Docker
# engine (tests/systemd-boot.sh).
#
#   tests/world/systemd-root.sh     ensure the tarball; prints its path
#
# Built once with debootstrap (Debian's packages; ~6 min, ~240 MB) and cached outside the clone
# under NODEAGENT_WORLD_HOME (default $HOME/.cache/nodeagent-world). Idempotent; a half-made
# tarball is never left behind (built under a temporary name, then renamed).
set -euo pipefail

# Bump when the recipe changes: a cached tarball with another recipe is rebuilt.
RECIPE=1
HOME_DIR="${NODEAGENT_WORLD_HOME:-$HOME/.cache/nodeagent-world}"
TARBALL="$HOME_DIR/bookworm-systemd-r$RECIPE.tar"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
log() { echo "systemd-root.sh: $*" >&2; }

if [ -s "$TARBALL" ]; then
  echo "$TARBALL"
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
fi

mkdir -p "$HOME_DIR"
WORK=$(mktemp -d "$HOME_DIR/systemd-root.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "debootstrap bookworm into $WORK/root (a few minutes, once)"
# minbase + systemd: PID 1, journald and systemctl; dbus for systemctl's bus.
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$WORK/root" \
  http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
  { tail -n 30 "$WORK/debootstrap.log" >&2; log "debootstrap failed (log above)"; exit 1; }
# A container has no consoles or udev to wait for, and no machine id yet (systemd makes one
# at each boot; its first-boot wizard would wait on a console).
rm -f "$WORK/root/etc/machine-id" "$WORK/root/var/lib/dbus/machine-id"
for unit in getty@tty1.service systemd-udevd.service systemd-udev-trigger.service \
  systemd-firstboot.service; do
  ln -sf /dev/null "$WORK/root/etc/systemd/system/$unit"
done
rm -rf "$WORK/root/var/cache/apt/archives/"*.deb "$WORK/root/var/lib/apt/lists/"*
tar -C "$WORK/root" -cf "$WORK/root.tar" .
mv "$WORK/root.tar" "$TARBALL"
log "made $TARBALL ($(du -h "$TARBALL" | cut -f1))"
echo "$TARBALL"
