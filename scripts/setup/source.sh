#!/usr/bin/env bash
# Test dependencies of the source (issue 3): RabbitMQ 3.10 with its AMQP 1.0 plugin, for the
# interop test (tests/source_rabbitmq.rs starts its own node on free loopback ports).
# Idempotent: skips what is already installed.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    # Do not let the package start a system-wide node: the test runs its own.
    export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
    flock /tmp/apt.lock $SUDO apt-get update -qq
    flock /tmp/apt.lock $SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server
fi

# The plugin ships with the server package; check that it is there.
if ! ls /usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/ | grep -q '^rabbitmq_amqp1_0'; then
    echo "rabbitmq_amqp1_0 plugin not found" >&2
    exit 1
fi
echo "source setup: rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server) ready"
