#!/usr/bin/env bash
# Setup for the panel tests: headless Chromium (Debian package) for tests/page_browser.rs,
# sslscan (Debian) and Python `websockets` (in .venv) for the TLS tests of
# tests/it/panel_security.rs, and `prometheus-client` (in .venv), whose parser reads
# /metrics in tests/it/latency.rs. Idempotent: installs only what is missing; apt is shared,
# so it runs under a lock.
set -euo pipefail
cd "$(dirname "$0")/../.."
WEBSOCKETS_VERSION=15.0.1
PROMETHEUS_CLIENT_VERSION=0.21.1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
command -v sslscan >/dev/null 2>&1 || need+=(sslscan)
if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO flock /tmp/apt.lock apt-get update -q
    $SUDO flock /tmp/apt.lock apt-get install -y -q --no-install-recommends "${need[@]}"
fi
echo "panels setup: $(chromium --version 2>/dev/null || echo 'chromium ?'); sslscan present"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -m pip show websockets 2>/dev/null | grep -qx "Version: $WEBSOCKETS_VERSION"; then
    .venv/bin/python -m pip install -q "websockets==$WEBSOCKETS_VERSION"
fi
if ! .venv/bin/python -m pip show prometheus-client 2>/dev/null | grep -qx "Version: $PROMETHEUS_CLIENT_VERSION"; then
    .venv/bin/python -m pip install -q "prometheus-client==$PROMETHEUS_CLIENT_VERSION"
fi
echo "panels setup: websockets $WEBSOCKETS_VERSION, prometheus-client $PROMETHEUS_CLIENT_VERSION in .venv"
