#!/usr/bin/env bash
# The pipeline benchmark, peers side by side in one run (see BENCHMARKS.md, "Pipeline vs
# peers"). Installs the peers first (idempotent), builds the release binary, then runs
# benches/pipeline.rs. PIPELINE_BENCH_QUICK=1 runs a quick subset; PIPELINE_BENCH_SECS
# sets the seconds per scenario (default 6); PIPELINE_BENCH_ONLY=gateway,node,... picks peers;
# PIPELINE_BENCH_SYSCALLS=1 counts write syscalls with perf (a separate run: it slows them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup/bench.sh
# 1,000+ sockets per side
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --bin asb-gateway
cargo bench --bench pipeline -- "$@"
