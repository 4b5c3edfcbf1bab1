#!/usr/bin/env bash
# Run the whole dittofs test suite (sets up the machine first; see scripts/setup.sh).
# Extra arguments go to pytest, e.g. scripts/test.sh -k snapshot -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# lint and types first: a style or type error fails the run as a test would
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy fsimpl plugin cli
exec .venv/bin/python -m pytest "$@"
