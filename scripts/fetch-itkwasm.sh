#!/usr/bin/env bash
# Download the WASI modules of real third-party programs from PyPI, for the tests that run
# them unchanged (tests/test_itkwasm.py): ITK-wasm's compress-stringify, downsample and
# compare-images pipelines, WASI reactors. Into tests/fixtures/itkwasm/ (not in git); done
# once, safe to run again. PYTHON= names another interpreter with pip (default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=tests/fixtures/itkwasm
python=${PYTHON:-.venv/bin/python}
# Pinned: the tests name these wheels, and a new release may change the bytes they compare.
for pin in itkwasm-compress-stringify-wasi==3.5.0 itkwasm-downsample-wasi==2.0.2 \
    itkwasm-compare-images-wasi==5.4.2; do
    wheel="${pin%%==*}"
    wheel="${wheel//-/_}-${pin##*==}-py3-none-any.whl"
    if [ ! -s "$dest/$wheel" ]; then
        mkdir -p "$dest"
        "$python" -m pip download --quiet --no-deps --dest "$dest" "$pin"
    fi
done
