#!/usr/bin/env bash
# Setup for the Debian packages (scripts/package.sh) and their checks (scripts/ci/package.sh):
# cargo-deb, lintian, and the strip/readelf of each target's binutils. Idempotent: skips
# what is there. The ARM cross toolchains and qemu-user come from scripts/setup/appliance.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

# cargo-deb, pinned; ~65 s to build on 2 cores, once per fresh machine. Built in cargo's
# own temporary directory, not the project's target dir.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    env -u CARGO_TARGET_DIR cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi

PKGS=(lintian file binutils binutils-x86-64-linux-gnu binutils-aarch64-linux-gnu
      binutils-arm-linux-gnueabihf util-linux)
need=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO flock /tmp/apt.lock apt-get update -qq
    $SUDO flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for tool in lintian file readelf x86_64-linux-gnu-strip aarch64-linux-gnu-strip \
    arm-linux-gnueabihf-strip unshare; do
    command -v "$tool" >/dev/null || { echo "package setup: $tool missing after install" >&2; exit 1; }
done
cargo deb --version >/dev/null || { echo "package setup: cargo-deb missing after install" >&2; exit 1; }
echo "package setup: ok ($(cargo deb --version 2>&1 | head -1))"
