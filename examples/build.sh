#!/usr/bin/env bash
# Build every examples/*.c into examples/build/<name>.wasm (WASI, wasm32).
#
# Environment:
#   CC       C compiler with the wasm32 backend (default: clang-14)
#   SYSROOT  sysroot holding the wasi-libc headers/libraries (default: /usr)
#
# A module is only rebuilt when its .c file is newer than its .wasm.
set -euo pipefail

CC="${CC:-clang-14}"
SYSROOT="${SYSROOT:-/usr}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/build"

if ! command -v "$CC" >/dev/null 2>&1 || [ ! -d "$SYSROOT/include/wasm32-wasi" ]; then
    echo "error: WASI toolchain not found ($CC, $SYSROOT/include/wasm32-wasi); install the Debian packages: clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32" >&2
    exit 1
fi

mkdir -p "$out"
shopt -s nullglob
for src in "$here"/*.c; do
    name="$(basename "$src" .c)"
    dst="$out/$name.wasm"
    if [ -e "$dst" ] && [ "$dst" -nt "$src" ]; then
        echo "up to date: $name.wasm"
        continue
    fi
    echo "building:   $name.wasm"
    # Compile to a temporary name first so an interrupted build never leaves
    # a truncated .wasm that looks up to date.
    tmp="$dst.tmp.$$"
    if ! "$CC" --target=wasm32-wasi --sysroot="$SYSROOT" -O2 -Wl,--stack-first \
            -o "$tmp" "$src"; then
        rm -f "$tmp"
        echo "error: failed to compile $src" >&2
        exit 1
    fi
    mv -f "$tmp" "$dst"
done
