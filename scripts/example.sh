#!/usr/bin/env bash
# The main job: set up, then count the words of a sample text inside the WASM sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/parity-sandbox run \
    --input sample.txt=examples/data/sample.txt \
    --memory 64m --timeout 10s \
    examples/build/wordcount.wasm -- /input/sample.txt
