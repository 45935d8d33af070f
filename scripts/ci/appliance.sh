#!/usr/bin/env bash
# The appliance checks (DESIGN §7), run by .ci/run after scripts/setup/appliance.sh,
# in this order:
#   (a) systemd-analyze verify of the unit: empty output, and a typo makes it fail
#   (b) systemd-analyze security --offline=yes under a threshold
#   (e) oelint-adv on the Yocto recipe (only the network-dependent HOMEPAGE ping
#       suppressed)
#   (f) the Yocto crates include in sync with Cargo.lock (and the license checksum)
#   (c) release builds for aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf
#       with Debian's cross gcc, and x86_64-unknown-linux-gnu, printing the stripped
#       binary sizes
#   (h) the appliance build (--no-default-features) for aarch64 in profile release-small
#       within 3.5 MiB
#   (g) the Debian packages of the three release builds (scripts/ci/package.sh: lintian,
#       contents, install/upgrade/purge of the amd64 package in a scratch root)
#   (d) the library's unit tests on aarch64 under qemu-aarch64 (profile cross-test)
# Skip the slow ARM parts and the packages with APPLIANCE_SKIP_ARM=1 (for a quick local
# run only).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# Exposure threshold for `systemd-analyze security`, in tenths (15 = 1.5; the unit scores 1.1).
SECURITY_THRESHOLD=15
UNIT=systemd/asb-gateway.service
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
T0=$(date +%s)
step() { echo; echo "== appliance: $* ($(( $(date +%s) - T0 )) s)"; }
fail() { echo "appliance: FAIL: $*" >&2; exit 1; }

for tool in systemd-analyze qemu-aarch64 aarch64-linux-gnu-gcc arm-linux-gnueabihf-gcc; do
    command -v "$tool" >/dev/null || fail "$tool missing: run scripts/setup/appliance.sh"
done
cargo deb --version >/dev/null 2>&1 || fail "cargo-deb missing: run scripts/setup/package.sh"
[ -x .venv/bin/oelint-adv ] || fail "oelint-adv missing: run scripts/setup/appliance.sh"

# ---------------------------------------------------------------- (a) verify
step "(a) systemd-analyze verify $UNIT"
# The binary the test build made (`cargo build` alone would rebuild every dependency
# shared with the dev-dependencies, with other features: 1.5 min for nothing).
cargo test --quiet --no-run --test it
BIN="$TARGET_DIR/debug/asb-gateway"
# verify resolves ExecStart= and the units it depends on; give it a root holding the
# system's units, the built binary at /usr/bin/asb-gateway and the unit under test.
VROOT="$TMP/root"
mkdir -p "$VROOT/usr/lib/systemd" "$VROOT/usr/bin" "$VROOT/etc/systemd/system"
SYSUNITS=/usr/lib/systemd/system
[ -d "$SYSUNITS" ] || SYSUNITS=/lib/systemd/system
cp -a "$SYSUNITS" "$VROOT/usr/lib/systemd/system"
install -m 0755 "$BIN" "$VROOT/usr/bin/asb-gateway"
# ExecReload runs /bin/kill: a merged-/usr root with the host's kill.
install -m 0755 /usr/bin/kill "$VROOT/usr/bin/kill"
ln -s usr/bin "$VROOT/bin"
# verify_unit FILE: systemd-analyze verify must exit 0 and print nothing (it exits 0 on
# unknown keys and bad values, which only show up as output).
verify_unit() {
    cp "$1" "$VROOT/etc/systemd/system/asb-gateway.service"
    local out rc=0
    out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify --root="$VROOT" asb-gateway.service 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        printf '%s\n' "$out"
        return 1
    fi
}
verify_unit "$UNIT" || fail "systemd-analyze verify $UNIT is not clean"
echo "verify: clean"
# Self-test: the same check must reject a typo'd key and a bad value.
sed 's/^WatchdogSec=/WatchdogSecc=/' "$UNIT" > "$TMP/typo.service"
sed 's/^ProtectSystem=strict/ProtectSystem=strictly/' "$UNIT" > "$TMP/badvalue.service"
for broken in "$TMP/typo.service" "$TMP/badvalue.service"; do
    cmp -s "$broken" "$UNIT" && fail "self-test did not change the unit"
    if verify_unit "$broken" >"$TMP/out" 2>&1; then
        fail "verify accepted a broken unit ($(basename "$broken"))"
    fi
    echo "verify self-test: $(basename "$broken") rejected: $(head -1 "$TMP/out")"
done

# The example config is valid the way systemd runs it: connection string from the
# credential (a placeholder here).
CRED="$TMP/credentials"
mkdir -p "$CRED"
echo 'Endpoint=sb://example.servicebus.windows.net/;SharedAccessKeyName=K;SharedAccessKey=V' \
    > "$CRED/asb-connection-string"
CREDENTIALS_DIRECTORY="$CRED" "$BIN" check-config --config systemd/config.example.toml \
    || fail "systemd/config.example.toml does not pass check-config"

# ---------------------------------------------------------------- (b) security
step "(b) systemd-analyze security --offline=yes --threshold=$SECURITY_THRESHOLD"
SYSTEMD_LOG_COLOR=0 systemd-analyze security --offline=yes --threshold="$SECURITY_THRESHOLD" \
    --no-pager "$UNIT" > "$TMP/security" 2>&1 || {
    grep -F "✗" "$TMP/security" || true
    tail -1 "$TMP/security"
    fail "exposure above ${SECURITY_THRESHOLD} tenths"
}
tail -1 "$TMP/security"

# ---------------------------------------------------------------- (e) oelint-adv
RECIPE=yocto/meta-asb-gateway/recipes-core/asb-gateway/asb-gateway_0.1.0.bb
step "(e) oelint-adv $RECIPE"
# oelint.vars.homepageping needs the network (it fetches HOMEPAGE): the only suppression.
.venv/bin/oelint-adv --quiet --mode all --release whinlatter \
    --suppress oelint.vars.homepageping "$RECIPE" yocto/meta-asb-gateway/conf/layer.conf \
    || fail "oelint-adv findings"
echo "oelint-adv: clean"

# ---------------------------------------------------------------- (f) crates include
step "(f) Yocto crates include vs Cargo.lock"
python3 scripts/yocto-crates.py --check || fail "crates include out of date"
cargo test --quiet --test it -- yocto::

if [ "${APPLIANCE_SKIP_ARM:-0}" = 1 ]; then
    step "ARM builds skipped (APPLIANCE_SKIP_ARM=1)"
    exit 0
fi

# ---------------------------------------------------------------- (c) release builds
# One cargo run for the three targets: each ends in a long single-threaded LTO step, and
# together they keep both cores busy. x86_64 is here for the amd64 package (g).
RELEASE_TARGETS="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-gnu"
step "(c) release builds for $RELEASE_TARGETS"
cargo build --quiet --release --locked --bin asb-gateway \
    $(for t in $RELEASE_TARGETS; do printf -- '--target %s ' "$t"; done)
for target in $RELEASE_TARGETS; do
    out="$TARGET_DIR/$target/release/asb-gateway"
    file -b "$out" 2>/dev/null || true
    size=$(stat -c %s "$out")
    awk -v t="$target" -v s="$size" \
        'BEGIN { printf "stripped size %s: %d bytes (%.2f MiB)\n", t, s, s / 1048576 }'
done

# ---------------------------------------------------------------- (h) release-small
# The size-tuned profile (Cargo.toml; docs/appliance.md, "Figures") for boxes short of flash:
# the aarch64 appliance build must stay within 3.5 MiB.
SMALL_LIMIT=$((3584 * 1024))
step "(h) aarch64 appliance build, profile release-small, within $SMALL_LIMIT bytes"
cargo build --quiet --profile release-small --locked --no-default-features --bin asb-gateway \
    --target aarch64-unknown-linux-gnu
out="$TARGET_DIR/aarch64-unknown-linux-gnu/release-small/asb-gateway"
size=$(stat -c %s "$out")
awk -v s="$size" 'BEGIN { printf "stripped size aarch64, release-small, no emulator: %d bytes (%.2f MiB)\n", s, s / 1048576 }'
[ "$size" -le "$SMALL_LIMIT" ] ||
    fail "the release-small aarch64 build is $size bytes, over $SMALL_LIMIT: BENCHMARKS.md, \"Issue 18, part five\", has the cargo bloat command and what was cut"

# ---------------------------------------------------------------- (g) Debian packages
step "(g) Debian packages from the release builds (scripts/ci/package.sh)"
bash scripts/ci/package.sh

# ---------------------------------------------------------------- (d) tests under qemu
# Profile cross-test = dev without debug info: the same code and checks, built faster.
step "(d) cargo test --lib --profile cross-test --target aarch64-unknown-linux-gnu (qemu-aarch64)"
cargo test --lib --locked --profile cross-test --target aarch64-unknown-linux-gnu

step "appliance checks passed"
