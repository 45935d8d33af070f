#!/usr/bin/env bash
# Peers for the pipeline benchmark (benches/pipeline.rs): mosquitto (Debian; its
# WebSocket listener is the fan-out peer), Node.js + npm and the `ws` package (into the
# gitignored bench/node_modules), taskset (util-linux), perf (linux-perf: counts the
# servers' write/send syscalls). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)

if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO flock /tmp/apt.lock apt-get update
    $SUDO flock /tmp/apt.lock env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${need[@]}"
fi

if [ ! -f bench/node_modules/ws/package.json ]; then
    (cd bench && npm install --no-audit --no-fund --omit=dev)
fi
echo "bench setup: mosquitto $(/usr/sbin/mosquitto -h 2>/dev/null | head -n1 | awk '{print $3}'), node $(node --version), ws $(node -p "require('./bench/node_modules/ws/package.json').version")"
