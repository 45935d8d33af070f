#!/usr/bin/env bash
# Run the whole nextest suite N times (default 5) with retries off while the machine is
# loaded (stress-ng: every core busy plus I/O), and list each test that failed at least
# once with its failure count. Not part of .ci/run (it takes N suite runs); its result
# belongs in the closing note of any change to tests or timing.
#   scripts/stress-tests.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
bash scripts/setup.sh --tests >/dev/null
if ! command -v stress-ng >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "stress-tests: install stress-ng (apt-get install stress-ng)" >&2; exit 1; }
    apt-get install -y -qq stress-ng >/dev/null
fi
cargo nextest run --profile stress --no-run
out="$(mktemp -d)"
stress-ng --cpu "$(nproc)" --io 1 --timeout 0 --quiet &
load=$!
trap 'kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true' EXIT
for i in $(seq 1 "$runs"); do
    start=$(date +%s)
    if cargo nextest run --profile stress >"$out/run-$i.log" 2>&1; then rc=0; else rc=$?; fi
    echo "stress-tests: run $i/$runs exit $rc in $(( $(date +%s) - start )) s: $(grep -E '^\s+Summary' "$out/run-$i.log" | tail -1 | sed 's/^ *//')"
done
kill "$load" 2>/dev/null || true
echo "stress-tests: failures per test over $runs runs under load (logs in $out):"
# nextest prints each failure twice (at once and in the summary): count runs, not lines.
for log in "$out"/run-*.log; do
    grep -E '^\s+(FAIL|TIMEOUT|SIGSEGV|SIGABRT) ' "$log" \
        | sed -E 's/^\s+[A-Z]+ \[[^]]*\] (\([^)]*\) )?//' | sort -u || true
done | sort | uniq -c | sort -rn
if grep -qE '^\s+(FAIL|TIMEOUT|SIGSEGV|SIGABRT) ' "$out"/run-*.log; then exit 1; fi
echo "stress-tests: 0 failures"
