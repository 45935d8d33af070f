#!/usr/bin/env bash
# The test command: install the test peers (idempotent), run every test once with
# nextest, then the appliance checks (systemd unit, ARM builds under qemu, Yocto).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
# Each daemon the tests start leaves its log here for the secret grep below.
rm -rf "${CARGO_TARGET_DIR:-target}/tmp/daemon-logs"
cargo nextest run --profile ci
bash scripts/ci/secrets-in-logs.sh
if [ -x scripts/ci/appliance.sh ]; then
    bash scripts/ci/appliance.sh
fi
