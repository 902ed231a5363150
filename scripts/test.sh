#!/usr/bin/env bash
# Set up, then run the whole check: lint, types and every test (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export WASM_FIXTURE_DIR="$PWD/tests/fixtures/wasm/build"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
