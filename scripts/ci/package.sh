#!/usr/bin/env bash
# The Debian package checks (issue 21), run by scripts/ci/appliance.sh after the release
# builds of the three targets (scripts/setup/package.sh installs the tools). Every check
# fails the script; the self-tests (S) prove the checks can fail.
#   (1) scripts/package.sh --no-build: amd64, arm64 and armhf packages, and their sizes
#   (2) each package: Architecture, Version, Depends (only libc6, and no newer glibc
#       symbol than it names), the exact file list, conffiles = everything under /etc,
#       the unit and example config as in the repository, the binary's ELF machine per
#       `file`, stripped, and `--version` run natively or under qemu-user
#   (3) lintian: no error, and no warning outside the list justified in the README
#   (4) amd64 into a scratch root (dpkg --root --force-script-chrootless, DPKG_ROOT):
#       files, conffile, the unit enabled, the "not started" message, systemd-analyze
#       verify (empty output) and security of the installed unit; the operator edits the
#       config, adds the connection string and state; the next version (cargo-deb
#       --deb-version) upgrades over it and the edits survive; remove keeps config and
#       state; purge leaves the root as it was
#   (5) the maintainer scripts' systemd branch, which a scratch root cannot reach (no
#       systemd running): under `unshare --mount` with /run/systemd/system present and
#       recording stand-ins for systemctl and deb-systemd-invoke: first install starts
#       nothing, upgrade try-restarts, removal stops, upgrade's prerm does not stop
#   (S) a next version without conffiles loses the edit and (4) catches it; the amd64
#       package fails the ARM checks of (2); a purge that forgets /etc/asb-gateway is caught
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT_DIR=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
T0=$(date +%s)
step() { echo; echo "== package: $* ($(( $(date +%s) - T0 )) s)"; }
fail() { echo "package: FAIL: $*" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
DEB_VERSION="$VERSION-1"
NEXT_VERSION="$VERSION-2"
# glibc: what debian/… Cargo.toml's depends names.
DEPENDS="libc6 (>= 2.34)"
GLIBC_MAX=2.34
# lintian warnings that are expected, each justified in README.md "Debian packages".
LINTIAN_JUSTIFIED="initial-upload-closes-no-bugs"
SECURITY_THRESHOLD=15
# The package's files (directories aside).
EXPECTED_FILES="./etc/asb-gateway/config.toml
./lib/systemd/system/asb-gateway.service
./usr/bin/asb-gateway
./usr/share/doc/asb-gateway/README.md
./usr/share/doc/asb-gateway/appliance.md
./usr/share/doc/asb-gateway/changelog.Debian.gz
./usr/share/doc/asb-gateway/copyright
./usr/share/doc/asb-gateway/panels.md
./usr/share/man/man1/asb-gateway.1.gz"

for tool in cargo-deb lintian dpkg dpkg-deb file readelf systemd-analyze unshare \
    qemu-aarch64 qemu-arm; do
    command -v "$tool" >/dev/null || fail "$tool missing: run scripts/setup.sh --tests"
done

# ---------------------------------------------------------------- (1) build
step "(1) scripts/package.sh --no-build (amd64 arm64 armhf)"
mapfile -t DEBS < <(bash scripts/package.sh --no-build --out "$TMP/debs" amd64 arm64 armhf)
[ "${#DEBS[@]}" = 3 ] || fail "scripts/package.sh made ${#DEBS[@]} packages, not 3"
deb_of() { printf '%s\n' "${DEBS[@]}" | grep "_$1\.deb\$"; }

# ---------------------------------------------------------------- (2) contents
# check_deb DEB ARCH [VERSION]: everything (2) says; prints what it checked.
check_deb() {
    local deb=$1 arch=$2 version=${3:-$DEB_VERSION} d
    d=$(mktemp -d "$TMP/deb.XXXX")
    dpkg-deb --info "$deb" > "$d/info" || { echo "dpkg-deb --info failed"; return 1; }
    local got
    got=$(dpkg-deb -f "$deb" Architecture)
    [ "$got" = "$arch" ] || { echo "Architecture: $got, want $arch"; return 1; }
    got=$(dpkg-deb -f "$deb" Version)
    [ "$got" = "$version" ] || { echo "Version: $got, want $version"; return 1; }
    got=$(dpkg-deb -f "$deb" Depends)
    [ "$got" = "$DEPENDS" ] || { echo "Depends: $got, want $DEPENDS"; return 1; }
    dpkg-deb -f "$deb" Pre-Depends Recommends | grep -q . && { echo "unexpected Pre-Depends/Recommends"; return 1; }
    # Files: exactly the expected ones; every file under /etc is a conffile, nothing else.
    dpkg-deb --contents "$deb" > "$d/contents"
    awk '$1 !~ /^d/ { print $6 }' "$d/contents" | sort > "$d/files"
    diff -u <(sort <<<"$EXPECTED_FILES") "$d/files" || { echo "file list differs"; return 1; }
    dpkg-deb --ctrl-tarfile "$deb" | tar -x -C "$d" ./conffiles 2>/dev/null || : > "$d/conffiles"
    diff -u <(grep '^\./etc/' "$d/files" | sed 's/^\.//') <(sort "$d/conffiles") \
        || { echo "conffiles differ from the files under /etc"; return 1; }
    grep -qE '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/asb-gateway$' "$d/contents" \
        || { echo "usr/bin/asb-gateway not 0755 root:root"; return 1; }
    mkdir "$d/x"
    dpkg-deb --extract "$deb" "$d/x"
    cmp -s "$d/x/lib/systemd/system/asb-gateway.service" systemd/asb-gateway.service \
        || { echo "packaged unit differs from systemd/asb-gateway.service"; return 1; }
    cmp -s "$d/x/etc/asb-gateway/config.toml" systemd/config.example.toml \
        || { echo "packaged config differs from systemd/config.example.toml"; return 1; }
    # The binary: machine, stripped, libraries, glibc symbol versions, runs.
    local bin="$d/x/usr/bin/asb-gateway" desc want run=()
    desc=$(file -b "$bin")
    case "$arch" in
    amd64) want="ELF 64-bit LSB pie executable, x86-64," ;;
    arm64) want="ELF 64-bit LSB pie executable, ARM aarch64," ; run=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
    armhf) want="ELF 32-bit LSB pie executable, ARM, EABI5" ; run=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
    esac
    [[ "$desc" == "$want"* ]] || { echo "file: $desc (want $want…)"; return 1; }
    [[ "$desc" == *", stripped" ]] || { echo "binary not stripped: $desc"; return 1; }
    local needed
    needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
    [ "$needed" = "libc.so.6 libgcc_s.so.1 libm.so.6 " ] \
        || { echo "links $needed: Depends covers libc.so.6 libgcc_s.so.1 libm.so.6 only"; return 1; }
    local glibc
    glibc=$(readelf -V -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
    dpkg --compare-versions "$glibc" le "$GLIBC_MAX" \
        || { echo "needs GLIBC_$glibc, Depends says $GLIBC_MAX"; return 1; }
    local ver
    ver=$("${run[@]}" "$bin" --version) || { echo "$arch binary does not run"; return 1; }
    [[ "$ver" == *"$VERSION"* ]] || { echo "--version says '$ver', want $VERSION"; return 1; }
    echo "$(basename "$deb"): $arch, $version, Depends: $got; $(wc -l < "$d/files") files," \
        "conffiles: $(tr '\n' ' ' < "$d/conffiles")"
    echo "  usr/bin/asb-gateway: ${desc%%, BuildID*}…, stripped; links $needed(GLIBC_$glibc); --version: $ver"
}
step "(2) dpkg-deb --info/--contents of each package"
for arch in amd64 arm64 armhf; do
    deb=$(deb_of "$arch")
    dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Architecture\|Depends\|Installed-Size\):/  &/p'
    check_deb "$deb" "$arch" || fail "$(basename "$deb")"
done
# (S) the same check on the wrong architecture's package must fail.
if out=$(check_deb "$(deb_of amd64)" arm64 2>&1); then
    fail "self-test: the amd64 package passed the arm64 checks"
fi
echo "self-test: amd64 package as arm64 rejected: $(tail -1 <<<"$out")"

# ---------------------------------------------------------------- (3) lintian
step "(3) lintian"
# run_lintian DEB: lintian's verdict (exit 1 on an error tag, 2 when it could not run) and
# its tags in $TMP/lintian.
run_lintian() {
    local rc=0
    lintian --pedantic --info --display-info --fail-on error "$1" > "$TMP/lintian" 2>&1 || rc=$?
    grep -E '^[EWIPX]: ' "$TMP/lintian" | sed 's/^/  /'
    return "$rc"
}
for deb in "${DEBS[@]}"; do
    echo "lintian --pedantic $(basename "$deb"):"
    rc=0
    run_lintian "$deb" || rc=$?
    [ "$rc" = 0 ] || { grep -v '^N:' "$TMP/lintian" | head -20; fail "lintian: rc $rc (1 = errors, 2 = did not run)"; }
    grep -q '^E: ' "$TMP/lintian" && fail "lintian errors"
    for tag in $(sed -n 's/^W: [^ ]*: \([^ ]*\).*/\1/p' "$TMP/lintian" | sort -u); do
        grep -qw -- "$tag" <<<"$LINTIAN_JUSTIFIED" || fail "lintian warning $tag is not justified in the README"
    done
done
# (S) an x86-64 binary in a package that says arm64 is a lintian error.
dpkg-deb --raw-extract "$(deb_of amd64)" "$TMP/wrongarch"
sed -i 's/^Architecture: amd64$/Architecture: arm64/' "$TMP/wrongarch/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz --build "$TMP/wrongarch" "$TMP/wrongarch.deb" > /dev/null
if run_lintian "$TMP/wrongarch.deb" > /dev/null; then
    fail "self-test: lintian passed an x86-64 binary in an arm64 package"
fi
echo "self-test: lintian rejects an amd64 binary labelled arm64: $(grep -m1 '^E: ' "$TMP/lintian")"

# ---------------------------------------------------------------- (4) scratch root
step "(4) amd64: install, upgrade, remove, purge in a scratch root (dpkg --root)"
R="$TMP/root"
# make_root: a merged-/usr Debian root with what a systemd system has there (the system's
# units and kill, for verify; /etc/systemd/system, /var/lib/systemd, /var/lib/private),
# and libc6 in dpkg's database, so that Depends is checked, not forced.
make_root() {
    rm -rf "$R"
    mkdir -p "$R/usr/bin" "$R/usr/lib/systemd" "$R/usr/sbin" "$R/etc/systemd/system" \
        "$R/var/lib/systemd" "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/var/lib/dpkg/triggers"
    install -d -m 0700 "$R/var/lib/private"
    ln -s usr/bin "$R/bin"; ln -s usr/lib "$R/lib"; ln -s usr/sbin "$R/sbin"
    local units=/usr/lib/systemd/system
    [ -d "$units" ] || units=/lib/systemd/system
    cp -a "$units" "$R/usr/lib/systemd/system"
    install -m 0755 /usr/bin/kill "$R/usr/bin/kill"
    local libc
    libc="libc6:$(dpkg --print-architecture)"
    dpkg-query -W -f='Package: ${Package}\nStatus: install ok installed\nPriority: ${Priority}\nSection: ${Section}\nMaintainer: ${Maintainer}\nArchitecture: ${Architecture}\nMulti-Arch: ${Multi-Arch}\nVersion: ${Version}\nDescription: host libc6, for the dependency check\n\n' \
        "$libc" > "$R/var/lib/dpkg/status"
    : > "$R/var/lib/dpkg/info/$libc.list"
}
make_root
snapshot() { (cd "$R" && find . -path ./var/lib/dpkg -prune -o -print | sort); }
snapshot > "$TMP/before"
DPKG=(dpkg --root="$R" --force-script-chrootless --log=/dev/null)
# No systemd runs here: the scripts' systemctl/deb-systemd-invoke branch is not taken
# under DPKG_ROOT; (5) runs it. deb-systemd-helper works on $DPKG_ROOT (init-system-helpers
# >= 1.60 honours it).
status() { dpkg-query --admindir="$R/var/lib/dpkg" -W -f='${db:Status-Abbrev} ${Version}' asb-gateway 2>/dev/null || echo "absent"; }
CONF="$R/etc/asb-gateway/config.toml"
WANTS="$R/etc/systemd/system/multi-user.target.wants/asb-gateway.service"

# install_upgrade_remove NEXT_DEB: (4) from the first install to the purge; returns
# non-zero (with a reason) at the first defect.
install_upgrade_remove() {
    local next=$1 out
    out=$("${DPKG[@]}" --install "$(deb_of amd64)" 2>&1) || { echo "$out"; echo "install failed"; return 1; }
    printf '%s\n' "$out" | sed 's/^/  dpkg: /'
    [ "$(status)" = "ii  $DEB_VERSION" ] || { echo "status after install: $(status)"; return 1; }
    grep -q "installed and enabled, but not started" <<<"$out" \
        || { echo "first install did not say how to configure and start"; return 1; }
    diff -u <(sort <<<"$EXPECTED_FILES" | sed 's/^\.//') \
        <(dpkg-query --admindir="$R/var/lib/dpkg" -L asb-gateway | while read -r f; do
            [ -d "$R$f" ] || echo "$f"; done | sort) || { echo "installed files differ"; return 1; }
    local conffiles
    conffiles=$(dpkg-query --admindir="$R/var/lib/dpkg" -W -f='${Conffiles}' asb-gateway)
    grep -qx " /etc/asb-gateway/config.toml $(md5sum < systemd/config.example.toml | cut -d' ' -f1)" \
        <<<"$conffiles" || { echo "config.toml not registered as conffile: '$conffiles'"; return 1; }
    [ "$(readlink "$WANTS")" = /lib/systemd/system/asb-gateway.service ] \
        || { echo "unit not enabled (no $WANTS)"; return 1; }
    echo "  installed: $(status); conffile:$conffiles; enabled: $(readlink "$WANTS")"
    local v rc=0
    v=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify --root="$R" asb-gateway.service 2>&1) || rc=$?
    [ "$rc" = 0 ] && [ -z "$v" ] || { echo "$v"; echo "systemd-analyze verify of the installed unit: rc $rc"; return 1; }
    echo "  systemd-analyze verify --root: clean"
    SYSTEMD_LOG_COLOR=0 systemd-analyze security --offline=yes --root="$R" \
        --threshold="$SECURITY_THRESHOLD" --no-pager asb-gateway.service > "$TMP/security" 2>&1 \
        || { tail -3 "$TMP/security"; echo "installed unit's exposure above $SECURITY_THRESHOLD tenths"; return 1; }
    echo "  systemd-analyze security --offline=yes --root: $(tail -1 "$TMP/security")"
    # The installed binary accepts the installed config with a placeholder credential.
    mkdir -p "$TMP/cred"
    echo 'Endpoint=sb://example.servicebus.windows.net/;SharedAccessKeyName=K;SharedAccessKey=V' \
        > "$TMP/cred/asb-connection-string"
    CREDENTIALS_DIRECTORY="$TMP/cred" "$R/usr/bin/asb-gateway" check-config --config "$CONF" >/dev/null \
        || { echo "installed binary rejects the installed config"; return 1; }

    # The operator: edits the config, adds the connection string; the service leaves state
    # (DynamicUser=yes: systemd keeps it in /var/lib/private behind a symlink).
    sed -i 's/^max_panels = 64 .*/max_panels = 32/' "$CONF"
    echo "# edited by the operator" >> "$CONF"
    cmp -s "$CONF" systemd/config.example.toml && { echo "the edit changed nothing"; return 1; }
    local edited
    edited=$(sha256sum < "$CONF")
    install -m 0600 "$TMP/cred/asb-connection-string" "$R/etc/asb-gateway/connection-string"
    mkdir -p "$R/var/lib/private/asb-gateway"
    echo "snapshot" > "$R/var/lib/private/asb-gateway/journal.snapshot"
    ln -s private/asb-gateway "$R/var/lib/asb-gateway"

    out=$("${DPKG[@]}" --install "$next" 2>&1) || { echo "$out"; echo "upgrade failed"; return 1; }
    printf '%s\n' "$out" | sed 's/^/  dpkg: /'
    [ "$(status)" = "ii  $NEXT_VERSION" ] || { echo "status after upgrade: $(status)"; return 1; }
    [ "$(sha256sum < "$CONF")" = "$edited" ] || { echo "the upgrade overwrote the edited config"; return 1; }
    grep -q "not started" <<<"$out" && { echo "upgrade printed the first-install message"; return 1; }
    [ -L "$WANTS" ] || { echo "upgrade disabled the unit"; return 1; }
    [ -f "$R/etc/asb-gateway/connection-string" ] && [ -f "$R/var/lib/asb-gateway/journal.snapshot" ] \
        || { echo "upgrade lost the connection string or the state"; return 1; }
    echo "  upgraded to $NEXT_VERSION: edited config kept, still enabled, credential and state kept"

    "${DPKG[@]}" --remove asb-gateway > /dev/null 2>&1 || { echo "remove failed"; return 1; }
    [ "$(status)" = "rc  $NEXT_VERSION" ] || { echo "status after remove: $(status)"; return 1; }
    [ ! -e "$R/usr/bin/asb-gateway" ] && [ ! -e "$R/lib/systemd/system/asb-gateway.service" ] \
        || { echo "remove left the binary or the unit"; return 1; }
    [ "$(sha256sum < "$CONF")" = "$edited" ] && [ -f "$R/etc/asb-gateway/connection-string" ] \
        && [ -f "$R/var/lib/asb-gateway/journal.snapshot" ] \
        || { echo "remove did not keep config, credential and state"; return 1; }
    echo "  removed: $(status); binary and unit gone; config, credential, state kept"

    "${DPKG[@]}" --purge asb-gateway > /dev/null 2>&1 || { echo "purge failed"; return 1; }
    [ "$(status)" = absent ] || [ "$(status)" = "un  " ] || { echo "status after purge: $(status)"; return 1; }
    diff -u "$TMP/before" <(snapshot) || { echo "purge left files behind (above)"; return 1; }
    echo "  purged: nothing left (the root is as before the install)"
}
reset_root() { make_root; snapshot > "$TMP/before"; }
bash scripts/package.sh --no-build --deb-version "$NEXT_VERSION" --out "$TMP/next" amd64 > "$TMP/next.list"
NEXT=$(cat "$TMP/next.list")
check_deb "$NEXT" amd64 "$NEXT_VERSION" > /dev/null || fail "next version package"
install_upgrade_remove "$NEXT" || fail "scratch root (above)"

# (S) a next version whose config is not a conffile: the upgrade overwrites the edit.
mkdir "$TMP/broken"
dpkg-deb --raw-extract "$NEXT" "$TMP/broken/pkg"
rm "$TMP/broken/pkg/DEBIAN/conffiles"
dpkg-deb --root-owner-group -Zxz --build "$TMP/broken/pkg" "$TMP/broken/noconf.deb" > /dev/null
reset_root
if out=$(install_upgrade_remove "$TMP/broken/noconf.deb" 2>&1); then
    fail "self-test: an upgrade without conffiles kept the edit, or the check missed it"
fi
grep -q "the upgrade overwrote the edited config" <<<"$out" \
    || { printf '%s\n' "$out"; fail "self-test: wrong failure for a package without conffiles"; }
echo "self-test: next version without conffiles caught: the upgrade overwrote the edited config"

# (S) a postrm whose purge forgets /etc/asb-gateway.
dpkg-deb --raw-extract "$NEXT" "$TMP/broken/nopurge"
sed -i 's|"${DPKG_ROOT:-}/etc/asb-gateway" ||' "$TMP/broken/nopurge/DEBIAN/postrm"
cmp -s "$TMP/broken/nopurge/DEBIAN/postrm" debian/postrm && fail "self-test did not change postrm"
dpkg-deb --root-owner-group -Zxz --build "$TMP/broken/nopurge" "$TMP/broken/nopurge.deb" > /dev/null
reset_root
if out=$(install_upgrade_remove "$TMP/broken/nopurge.deb" 2>&1); then
    fail "self-test: a purge that keeps /etc/asb-gateway passed"
fi
grep -q "purge left files behind" <<<"$out" || { printf '%s\n' "$out"; fail "self-test: wrong failure for the purge"; }
echo "self-test: purge that keeps /etc/asb-gateway caught: $(grep -m1 '^+\./etc/asb-gateway' <<<"$out")"
reset_root

# ---------------------------------------------------------------- (5) systemd branch
step "(5) maintainer scripts with systemd running (unshare --mount, recording stand-ins)"
# The packaged scripts, run as dpkg would on a live system (DPKG_ROOT empty), with
# /run/systemd/system present in a private /run and systemctl, deb-systemd-invoke and
# deb-systemd-helper replaced by stand-ins that log their arguments.
S="$TMP/scripts"
mkdir -p "$S/bin"
dpkg-deb --ctrl-tarfile "$(deb_of amd64)" | tar -x -C "$S" ./postinst ./prerm ./postrm
for t in systemctl deb-systemd-invoke deb-systemd-helper; do
    printf '#!/bin/sh\necho "%s $*" >> "%s/calls"\n' "$t" "$S" > "$S/bin/$t"
    chmod +x "$S/bin/$t"
done
# calls_for SCRIPT ARGS...: the systemctl/deb-systemd-invoke calls it makes, one a line.
calls_for() {
    : > "$S/calls"
    unshare --mount sh -c 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system &&
        PATH="$0/bin:$PATH" DPKG_ROOT= sh "$@" >/dev/null' "$S" "$@" \
        || { echo "running $* failed"; return 1; }
    grep -v '^deb-systemd-helper' "$S/calls" || true
}
expect_calls() {
    local want=$1 got; shift
    got=$(calls_for "$@") || fail "$got"
    [ "$got" = "$want" ] || fail "$(basename "$1") ${*:2}: calls '${got//$'\n'/; }', want '${want//$'\n'/; }'"
    echo "$(basename "$1") ${*:2}: ${got//$'\n'/; }"
}
expect_calls "systemctl --system daemon-reload" "$S/postinst" configure ""
expect_calls "systemctl --system daemon-reload
deb-systemd-invoke try-restart asb-gateway.service" "$S/postinst" configure "$DEB_VERSION"
expect_calls "" "$S/prerm" upgrade "$NEXT_VERSION"
expect_calls "deb-systemd-invoke stop asb-gateway.service" "$S/prerm" remove
expect_calls "systemctl --system daemon-reload" "$S/postrm" remove
# (S) a postinst that starts the unit on first install is caught.
sed 's/if \[ -n "\$2" \]; then/if true; then/' "$S/postinst" > "$S/postinst.starts"
cmp -s "$S/postinst" "$S/postinst.starts" && fail "self-test did not change postinst"
[ "$(calls_for "$S/postinst.starts" configure "")" != "systemctl --system daemon-reload" ] \
    || fail "self-test: a postinst that restarts on first install was not noticed"
echo "self-test: a postinst that (re)starts on first install is noticed"

# ---------------------------------------------------------------- sizes
step "package sizes"
for deb in "${DEBS[@]}"; do
    size=$(stat -c %s "$deb")
    awk -v d="$(basename "$deb")" -v s="$size" -v i="$(dpkg-deb -f "$deb" Installed-Size)" \
        'BEGIN { printf "%s: %d bytes (%.2f MiB), installed %d KiB\n", d, s, s / 1048576, i }'
done
step "package checks passed"
