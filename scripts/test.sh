#!/usr/bin/env bash
# README test command: installs everything (scripts/setup.sh), checks the layers, lint and
# format, builds the docs site, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SOURCES=(stepnet_jax tests scripts configs train.py evaluate.py)
.venv/bin/lint-imports                                # the layer contracts in pyproject.toml
.venv/bin/ruff check "${SOURCES[@]}"
.venv/bin/ruff format --check "${SOURCES[@]}"
export NO_MKDOCS_2_WARNING=1
SITE=$(mktemp -d)
.venv/bin/mkdocs build --strict --quiet --site-dir "$SITE"   # broken links, missing pages, docstring warnings fail
rm -rf "$SITE"
# Two workers (STEPNET_TEST_WORKERS=0 runs in one process); a file's tests stay on one worker,
# so its fixtures are built once. The 20 slowest tests are listed at the end: the suite must stay
# under 10 minutes on 2 cores, so a new test is paid for by trimming one of them.
exec .venv/bin/python -m pytest -q -n "${STEPNET_TEST_WORKERS:-2}" --dist loadfile --durations=20 "$@"
