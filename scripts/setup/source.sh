#!/usr/bin/env bash
# Test dependencies of the source (issue 3): RabbitMQ 3.10 with its AMQP 1.0 plugin
# (Debian package), for the interop test tests/it/source_rabbitmq.rs, which starts its own
# node (own epmd, free loopback ports, temp dirs) and stops it by pid.
# And tinyproxy, the plant's HTTP proxy in tests/it/locked_down.rs (each test starts its
# own on a free port). Idempotent: skips what is already installed. Does not leave a
# system-wide node or proxy running.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    flock /tmp/apt.lock $SUDO apt-get update -qq
    # RUNLEVEL=1: invoke-rc.d must not start a system-wide node during the install.
    flock /tmp/apt.lock $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends rabbitmq-server
    # If the package started the system service anyway (e.g. under systemd), stop it:
    # the tests run their own node.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        $SUDO systemctl stop rabbitmq-server || true
        $SUDO systemctl disable rabbitmq-server >/dev/null 2>&1 || true
    fi
fi

if [ ! -x /usr/bin/tinyproxy ] && [ ! -x /usr/sbin/tinyproxy ]; then
    flock /tmp/apt.lock $SUDO apt-get update -qq
    flock /tmp/apt.lock $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends tinyproxy
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet tinyproxy 2>/dev/null; then
        $SUDO systemctl stop tinyproxy || true
        $SUDO systemctl disable tinyproxy >/dev/null 2>&1 || true
    fi
fi

# The plugin ships with the server package; check that it is there.
if ! ls /usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/ | grep -q '^rabbitmq_amqp1_0'; then
    echo "rabbitmq_amqp1_0 plugin not found" >&2
    exit 1
fi
command -v epmd >/dev/null 2>&1 || { echo "epmd not found (erlang-base)" >&2; exit 1; }
echo "source setup: rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server), tinyproxy $(dpkg-query -W -f='${Version}' tinyproxy) ready"
