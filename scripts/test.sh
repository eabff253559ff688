#!/usr/bin/env bash
# README test command: installs everything (scripts/setup.sh), then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (STEPNET_TEST_WORKERS=0 runs in one process); a file's tests stay on one worker,
# so its fixtures are built once.
exec .venv/bin/python -m pytest -q -n "${STEPNET_TEST_WORKERS:-2}" --dist loadfile "$@"
