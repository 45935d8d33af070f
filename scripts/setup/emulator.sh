#!/usr/bin/env bash
# Setup for the emulator tests (tests/it/emulator.rs): the official Azure Service Bus
# Python SDK in the repo-local virtualenv .venv, used by the interop test
# `python_sdk_sends_to_topic`. Idempotent: skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/../.."

AZURE_SERVICEBUS_VERSION=7.15.0

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    flock /tmp/apt.lock apt-get install -y python3-venv
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('azure-servicebus') != '$AZURE_SERVICEBUS_VERSION')" 2>/dev/null; then
    echo "azure-servicebus $AZURE_SERVICEBUS_VERSION already installed in .venv"
else
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "azure-servicebus==$AZURE_SERVICEBUS_VERSION"
    echo "installed azure-servicebus $AZURE_SERVICEBUS_VERSION into .venv"
fi
