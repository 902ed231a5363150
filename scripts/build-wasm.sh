#!/usr/bin/env bash
# Compile every SRC_DIR/*.c into OUT_DIR/<name>.wasm as a WASI preview 1 module (a command,
# unless its source asks otherwise).
#
# Usage: scripts/build-wasm.sh SRC_DIR OUT_DIR
# Environment: CC (default clang-14), SYSROOT (default /usr, where Debian's wasi-libc lives).
# A module is rebuilt only when its source is newer; each is written under a temporary name
# and renamed, so an interrupted build never leaves a truncated module that looks current.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SRC_DIR OUT_DIR" >&2
    exit 2
fi
src_dir=$1
out_dir=$2
CC=${CC:-clang-14}
SYSROOT=${SYSROOT:-/usr}

if ! command -v "$CC" >/dev/null 2>&1 || [ ! -d "$SYSROOT/include/wasm32-wasi" ]; then
    echo "error: no WASI C toolchain ($CC, $SYSROOT/include/wasm32-wasi); install the Debian" \
         "packages clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 (scripts/bootstrap.sh does)" >&2
    exit 3
fi

mkdir -p "$out_dir"
shopt -s nullglob
for src in "$src_dir"/*.c; do
    name=$(basename "$src" .c)
    dst="$out_dir/$name.wasm"
    if [ -e "$dst" ] && [ "$dst" -nt "$src" ]; then
        continue
    fi
    tmp="$dst.tmp.$$"
    # A source may ask for more flags on a line "// build-flags: ..." (a reactor module:
    # -mexec-model=reactor).
    read -r -a extra <<< "$(sed -n 's|^// build-flags: ||p' "$src" | head -n 1)"
    if ! "$CC" --target=wasm32-wasi --sysroot="$SYSROOT" -O2 -Wl,--stack-first ${extra[@]+"${extra[@]}"} \
            -o "$tmp" "$src"; then
        rm -f "$tmp"
        echo "error: failed to compile $src" >&2
        exit 1
    fi
    mv -f "$tmp" "$dst"
done
