#!/usr/bin/env bash
# Test dependencies of the MQTT mirror: a real MQTT broker (mosquitto) and its command
# line clients. Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO flock /tmp/apt.lock apt-get update
    $SUDO flock /tmp/apt.lock env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${need[@]}"
fi

# The tests start their own brokers on free ports; the packaged service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl stop mosquitto || true
fi
echo "mirror setup: mosquitto $(/usr/sbin/mosquitto -h 2>/dev/null | head -n1 | awk '{print $3}') ready"
