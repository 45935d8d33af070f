#!/usr/bin/env bash
# Debian packages of asb-gateway for amd64, arm64 and armhf, with cargo-deb (metadata in
# Cargo.toml [package.metadata.deb]; changelog, maintainer scripts and man page in debian/).
#
#   scripts/package.sh [--no-build] [--deb-version VERSION] [--out DIR] [ARCH...]
#
# ARCH is amd64, arm64 or armhf (default: all three). Unless --no-build, one
# `cargo build --release --locked --bin asb-gateway --target …` for the chosen targets:
# cargo finds the release builds scripts/ci/appliance.sh already made up to date and
# does nothing. Then `cargo deb --no-build --strip --target …` per architecture, with the
# target's own strip (Debian's binutils-<triple>). Output: DIR (default
# $CARGO_TARGET_DIR/debian, i.e. target/debian/), never committed; the paths of the
# packages are printed last, one per line.
# --deb-version overrides the version (default: Cargo.toml's version, revision 1), e.g.
# for the "next version" of the upgrade test in scripts/ci/package.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

build=1
deb_version=
out=$TARGET_DIR/debian
arches=()
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --deb-version) deb_version=$2; shift ;;
    --out) out=$2; shift ;;
    amd64 | arm64 | armhf) arches+=("$1") ;;
    *) echo "usage: $0 [--no-build] [--deb-version V] [--out DIR] [amd64|arm64|armhf ...]" >&2; exit 1 ;;
    esac
    shift
done
((${#arches[@]})) || arches=(amd64 arm64 armhf)

# Debian architecture -> Rust target, GNU triple (for the strip tool).
rust_target() {
    case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    armhf) echo armv7-unknown-linux-gnueabihf ;;
    esac
}
gnu_triple() {
    case "$1" in
    amd64) echo x86_64-linux-gnu ;;
    arm64) echo aarch64-linux-gnu ;;
    armhf) echo arm-linux-gnueabihf ;;
    esac
}

cargo deb --version >/dev/null 2>&1 || { echo "package: cargo-deb missing: run scripts/setup/package.sh" >&2; exit 1; }
for arch in "${arches[@]}"; do
    command -v "$(gnu_triple "$arch")-strip" >/dev/null \
        || { echo "package: $(gnu_triple "$arch")-strip missing: run scripts/setup/package.sh" >&2; exit 1; }
done

if [ "$build" = 1 ]; then
    cargo build --quiet --release --locked --bin asb-gateway \
        $(for arch in "${arches[@]}"; do printf -- '--target %s ' "$(rust_target "$arch")"; done)
fi

mkdir -p "$out"
debs=()
for arch in "${arches[@]}"; do
    target=$(rust_target "$arch")
    bin="$TARGET_DIR/$target/release/asb-gateway"
    [ -x "$bin" ] || { echo "package: $bin missing (build it, or drop --no-build)" >&2; exit 1; }
    args=(--no-build --strip --target "$target" --output "$out")
    [ -n "$deb_version" ] && args+=(--deb-version "$deb_version")
    # cargo-deb takes the strip command from STRIP_<target triple>: name it explicitly.
    deb=$(env "STRIP_$target=$(command -v "$(gnu_triple "$arch")-strip")" \
        cargo deb --quiet "${args[@]}" | tail -1)
    [ -f "$deb" ] || { echo "package: cargo deb printed no package for $arch" >&2; exit 1; }
    debs+=("$deb")
    size=$(stat -c %s "$deb")
    awk -v d="$(basename "$deb")" -v s="$size" \
        'BEGIN { printf "package: %s: %d bytes (%.2f MiB)\n", d, s, s / 1048576 }' >&2
done
printf '%s\n' "${debs[@]}"
