#!/usr/bin/env bash
# Set up (the toolchain, the venv, a Docker engine with gVisor and the test image, Redis and
# PostgreSQL), then run the whole check: lint, types and every test, Docker ones included
# (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/docker-setup.sh
bash scripts/services-setup.sh
export WASM_FIXTURE_DIR="$PWD/tests/fixtures/wasm/build"
# The Docker, Redis and PostgreSQL tests must run here: a missing engine or server fails them
# instead of skipping them.
export PARITY_TEST_DOCKER=required PARITY_TEST_REDIS=required PARITY_TEST_POSTGRES=required
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
