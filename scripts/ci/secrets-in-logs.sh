#!/usr/bin/env bash
# After the test run: grep every daemon log the run kept (tests/support/daemon.rs writes
# each one to $CARGO_TARGET_TMPDIR/daemon-logs/) for every secret the tests use — the
# string constants named *SECRET*, *PASSWORD*, *TOKEN*, *WRONG*, *KEY* in tests/ — and
# fail if one is found. Tests also grep their own daemon's log; this covers the whole run,
# every log level the tests turned on included.
set -euo pipefail
cd "$(dirname "$0")/../.."
logs="${CARGO_TARGET_DIR:-target}/tmp/daemon-logs"
secrets="$(grep -rhoE 'const [A-Z_]*(SECRET|PASSWORD|TOKEN|WRONG|KEY)[A-Z_]*: &str = "[^"]{6,}"' tests/ \
    | sed -E 's/.*= "(.*)"/\1/' | sort -u \
    | grep -vxF 'dGhlIHNhbXBsZSBub25jZQ==')"  # RFC 6455's sample nonce (support::ws_raw::KEY)
n_secrets=$(printf '%s\n' "$secrets" | grep -c . || true)
n_logs=$(find "$logs" -name '*.log' 2>/dev/null | wc -l)
[ "$n_secrets" -ge 5 ] || { echo "secrets-in-logs: only $n_secrets secrets found in tests/" >&2; exit 1; }
[ "$n_logs" -ge 20 ] || { echo "secrets-in-logs: only $n_logs daemon logs in $logs" >&2; exit 1; }
found=0
while IFS= read -r s; do
    if hits=$(grep -rlF -- "$s" "$logs"); then
        echo "secrets-in-logs: FAIL: a test secret appears in: $hits" >&2
        found=1
    fi
done <<<"$secrets"
[ "$found" = 0 ] || exit 1
echo "secrets-in-logs: $n_secrets test secrets, $n_logs daemon logs: none found"
