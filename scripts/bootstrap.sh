#!/usr/bin/env bash
# Set up everything parity-sandbox needs on a fresh Debian 12 machine; safe to run again.
#   - Debian packages: the WASI C toolchain that builds the examples and the test programs
#   - .venv with the package and its development tools
#   - the example and test WebAssembly modules
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: $python is older than Python 3.11; set PYTHON to a newer one" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.parity-sandbox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing parity-sandbox into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
    touch "$stamp"
fi

bash scripts/build-wasm.sh examples examples/build
bash scripts/build-wasm.sh tests/fixtures/wasm tests/fixtures/wasm/build
