#!/usr/bin/env bash
# Test dependencies of the fault-injection suite (tests/faults.rs) and the soak bench
# (benches/soak.rs): a real MQTT broker (mosquitto) started by the tests on free ports.
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)

if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO flock /tmp/apt.lock apt-get update
    $SUDO flock /tmp/apt.lock env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${need[@]}"
fi

# The tests start their own brokers; the packaged service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl stop mosquitto || true
fi
echo "faults setup: mosquitto ready"
