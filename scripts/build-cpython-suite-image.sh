#!/usr/bin/env bash
# Build the Docker image parity-sandbox-test/cpython-suite:bookworm from Debian's mirror, with
# no container registry: a `debootstrap --variant=minbase` root with python3 and CPython's own
# test suite (libpython3.11-testsuite), imported with `parity-sandbox image import`. Used by
# bench/cpython_suite.py and tests/test_cpython_suite.py: ordinary programs must behave the
# same in our hardened containers as in a plain one.
#
# Idempotent: an image whose label matches this script's hash is kept; the root filesystem's
# tarball is cached (about 60 s to make) under $XDG_CACHE_HOME/parity-sandbox, so a removed
# image comes back in seconds. Needs root (or sudo) for debootstrap, and the .venv of
# bootstrap.sh (VENV=DIR names another).
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
image=parity-sandbox-test/cpython-suite:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
venv=${VENV:-.venv}
label=parity_sandbox.test.inputs
wanted=$(sha256sum "$self" | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/parity-sandbox
tarball=$cache/cpython-suite-$wanted.tar
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

current=$("$venv/bin/python" - "$image" "$label" <<'PY'
import sys, docker, docker.errors
try:
    print((docker.from_env().images.get(sys.argv[1]).labels or {}).get(sys.argv[2], ""))
except docker.errors.ImageNotFound:
    print("")
PY
)
[ "$current" = "$wanted" ] && exit 0

if [ ! -s "$tarball" ]; then
    if ! command -v debootstrap >/dev/null; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            debootstrap >/dev/null
    fi
    work=$(mktemp -d /tmp/parity-cpython-suite.XXXXXX)
    trap '$sudo rm -rf "$work"' EXIT
    echo "build-cpython-suite-image: debootstrap into $work (about a minute)" >&2
    $sudo debootstrap --variant=minbase --include=python3,libpython3.11-testsuite \
        bookworm "$work/rootfs" "$mirror" >/dev/null
    # The downloaded packages and apt's lists are of no use to the tests.
    $sudo rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    mkdir -p "$cache"
    rm -f "$cache"/cpython-suite-*.tar  # those of earlier versions of this script
    $sudo tar -C "$work/rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
"$venv/bin/parity-sandbox" image import "$tarball" "$image" --label "$label=$wanted" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8
echo "build-cpython-suite-image: built $image" >&2
