#!/usr/bin/env bash
# Install what this project needs on a fresh Debian machine with Rust (idempotent).
#   scripts/setup.sh          what the demo needs (nothing beyond cargo today)
#   scripts/setup.sh --tests  also every test peer: mosquitto, RabbitMQ, Chromium,
#                             cross linkers, qemu-user, the Python venv, ...
# Each part of the project keeps its own installer in scripts/setup/*.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }

if [ "${1:-}" = "--tests" ]; then
    command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
    if [ "$(id -u)" = 0 ] && [ ! -f /tmp/.asbgw-apt-updated ]; then
        flock /tmp/apt.lock apt-get update -qq && touch /tmp/.asbgw-apt-updated
    fi
    for part in scripts/setup/*.sh; do
        # The benchmark peers (Node.js, npm packages) are for scripts/bench.sh only.
        [ "$part" = scripts/setup/bench.sh ] && continue
        echo "setup: $part"
        bash "$part"
    done
fi
echo "setup: done"
