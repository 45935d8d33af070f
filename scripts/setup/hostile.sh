#!/usr/bin/env bash
# Test dependencies of the hostile-input and security tests: mosquitto (the security test
# runs the daemon against a password-protected broker). Idempotent: installs only what
# is missing.
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
echo "hostile setup: mosquitto ready"
