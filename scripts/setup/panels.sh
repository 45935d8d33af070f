#!/usr/bin/env bash
# Setup for the panel tests: headless Chromium (Debian package) for tests/page_browser.rs.
# Idempotent: skips what is already installed. apt is shared, so it runs under a lock.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "panels setup: chromium present ($(chromium --version 2>/dev/null || echo unknown))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO flock /tmp/apt.lock apt-get update -q
$SUDO flock /tmp/apt.lock apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
echo "panels setup: installed $(chromium --version 2>/dev/null || echo chromium)"
