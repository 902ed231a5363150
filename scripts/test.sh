#!/usr/bin/env bash
# Set up (the toolchain, the venv, a Docker engine with gVisor and the test images, Redis and
# PostgreSQL), then run the whole check: lint, types and every test, Docker ones included
# (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/docker-setup.sh
bash scripts/build-cpython-suite-image.sh
bash scripts/services-setup.sh
bash scripts/fetch-itkwasm.sh
export WASM_FIXTURE_DIR="$PWD/tests/fixtures/wasm/build"
# The Docker, Redis, PostgreSQL, promtool, Chromium, Ray, ITK-wasm and CPython-suite tests must
# run here: a missing engine, server, tool or image fails them instead of skipping them.
export PARITY_TEST_DOCKER=required PARITY_TEST_REDIS=required PARITY_TEST_POSTGRES=required
export PARITY_TEST_ITKWASM=required PARITY_TEST_RAY=required PARITY_TEST_CPYTHON_SUITE=required
export PARITY_TEST_PROMTOOL=required PARITY_TEST_CHROMIUM=required
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
