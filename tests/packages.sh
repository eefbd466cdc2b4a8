#!/usr/bin/env bash
# The packages: a release build, the .deb (cargo-deb) and the RPM for Amazon Linux 2023
# (cargo-generate-rpm; x86_64 here, aarch64 with --target aarch64-unknown-linux-gnu), their file
# lists (dpkg-deb -c, rpm -qpl) checked against what must ship, and the release binary's size.
# Installs the tools when missing (crates.io, Debian's rpm).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "packages.sh: $*" >&2; }

command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@3.8.0
command -v cargo-generate-rpm >/dev/null || cargo install --locked --quiet cargo-generate-rpm@0.21.1
if ! command -v rpm >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rpm >&2 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rpm >&2; }
fi

TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --quiet
size=$(stat -c %s "$TARGET/release/nodeagent")
echo "== release binary: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }') MiB; goal <= 15 MiB)"

# Kept beside the build (outside the clone) for tests/systemd-boot.sh, which installs the .deb.
OUT=$TARGET/packages
rm -rf "$OUT" && mkdir -p "$OUT"
cargo deb --no-build --quiet --output "$OUT/nodeagent.deb" >/dev/null
cargo generate-rpm --target-dir "$TARGET" --output "$OUT/nodeagent.rpm"

must_ship=(
  /usr/bin/nodeagent
  /usr/lib/systemd/system/nodeagent.service
  /usr/lib/systemd/system/nodeagent-prepare.service
  /usr/lib/sysusers.d/nodeagent.conf
  /usr/lib/tmpfiles.d/nodeagent.conf
  /etc/nodeagent/nodeagent.toml
  /usr/share/nodeagent/templates/consul-agent.json
  /usr/share/nodeagent/templates/linkerd.yaml
  /usr/share/nodeagent/templates/registrator-start.sh
  /usr/share/nodeagent/sample-facts.json
  /usr/share/nodeagent/iam-policy.json
  /usr/share/nodeagent/examples/consul-1.toml
  /usr/share/nodeagent/examples/consul-1-facts.json
  /usr/share/nodeagent/examples/consul-1/consul-agent.json
  /usr/share/nodeagent/examples/consul-1/ca.pem
  /usr/share/nodeagent/examples/consul-1/registrator-start.sh
  /usr/share/doc/nodeagent/README.md
)
status=0
echo "== dpkg-deb -c nodeagent.deb"
deb_files=$(dpkg-deb -c "$OUT/nodeagent.deb" | awk '{print $6}' | sed 's|^\.||')
dpkg-deb -c "$OUT/nodeagent.deb"
echo "== rpm -qpl nodeagent.rpm"
rpm_files=$(rpm -qpl "$OUT/nodeagent.rpm")
echo "$rpm_files"
for path in "${must_ship[@]}"; do
  grep -qx -- "$path" <<<"$deb_files" || { log ".deb lacks $path"; status=1; }
  grep -qx -- "$path" <<<"$rpm_files" || { log "RPM lacks $path"; status=1; }
done
configs=$(rpm -qpc "$OUT/nodeagent.rpm")
[ "$configs" = /etc/nodeagent/nodeagent.toml ] || { log "RPM config files: $configs"; status=1; }
dpkg-deb -I "$OUT/nodeagent.deb" conffiles | grep -qx /etc/nodeagent/nodeagent.toml ||
  { log ".deb conffiles lack /etc/nodeagent/nodeagent.toml"; status=1; }
[ "$status" = 0 ] && echo "both packages ship every file, the configuration as a config file"
exit $status
