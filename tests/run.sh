#!/usr/bin/env bash
# Every test: formatting, lints, unit tests and the integration tests against the test world
# (moto + fixtures and private Docker engines, set up from nothing by tests/world/setup.sh and
# tests/world/dockerd.sh). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "run.sh: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
bash tests/world/setup.sh >/dev/null     # the venv with moto; fails loudly if it cannot be made
bash tests/world/dockerd.sh install      # dockerd + busybox-static; the tests start private engines
bash tests/world/systemd-root.sh >/dev/null  # a Debian root with systemd (debootstrap, cached)

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
bash tests/soak.sh 180                   # the chaos soak, 3 minutes (an hour: tests/soak.sh 3600)
bash tests/units.sh                      # systemd-analyze verify + security exposure (<= 5.0)
bash tests/packages.sh                   # release build, .deb and RPM, their file lists
bash tests/systemd-boot.sh               # the .deb in a Debian root booted by systemd, against the world
bash tests/ami.sh                        # packer validate; the CloudFormation example (cfn-lint)
