#!/usr/bin/env bash
# README test command: installs everything (scripts/setup.sh), then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
