#!/usr/bin/env bash
# The test command: install the test peers (idempotent), run every test once with
# nextest, then the appliance checks (systemd unit, ARM builds under qemu, Yocto).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
cargo nextest run --profile ci
if [ -x scripts/ci/appliance.sh ]; then
    bash scripts/ci/appliance.sh
fi
