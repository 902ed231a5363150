#!/usr/bin/env bash
# Download the WASI modules of a real third-party program from PyPI, for the tests that run
# them unchanged (tests/test_itkwasm.py): ITK-wasm's compress-stringify pipelines, WASI
# reactors. Into tests/fixtures/itkwasm/ (not in git); done once, safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=tests/fixtures/itkwasm
wheel=itkwasm_compress_stringify_wasi-3.5.0-py3-none-any.whl
if [ ! -s "$dest/$wheel" ]; then
    mkdir -p "$dest"
    .venv/bin/python -m pip download --quiet --no-deps --dest "$dest" \
        "itkwasm-compress-stringify-wasi==3.5.0"
fi
