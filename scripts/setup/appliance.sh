#!/usr/bin/env bash
# Setup for the appliance checks (scripts/ci/appliance.sh): ARM cross toolchains, qemu-user,
# systemd-analyze, and oelint-adv in the repo-local venv. Idempotent: skips what is there.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Rust targets for the ARM builds (rustup ships the std of each). The CI check needs the
# two gnu targets; the musl ones are for `cross`/static builds and are best effort (a
# rustup mirror may not carry every target's std).
REQUIRED_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
OPTIONAL_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
installed=$(rustup target list --installed)
for t in "${REQUIRED_TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
for t in "${OPTIONAL_TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t" >/dev/null 2>&1 \
        || echo "appliance setup: note: rust-std for $t is not available; skipping it" >&2
done

# Debian packages: cross gcc + libc for linking, qemu-user to run aarch64 tests,
# systemd for systemd-analyze.
PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf
      libc6-dev-armhf-cross qemu-user systemd binutils-aarch64-linux-gnu
      binutils-arm-linux-gnueabihf python3-venv)
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
command -v systemd-analyze >/dev/null || { echo "systemd-analyze missing after install" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 missing after install" >&2; exit 1; }

# oelint-adv (pinned) in the repo-local venv.
OELINT_VERSION=9.11.2
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -m pip show oelint-adv 2>/dev/null | grep -qx "Version: $OELINT_VERSION"; then
    .venv/bin/python -m pip install -q "oelint-adv==$OELINT_VERSION"
fi
echo "appliance setup: ok"
