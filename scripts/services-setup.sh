#!/usr/bin/env bash
# Install the servers the tests start for themselves (on loopback, on a free port): Redis, for
# the Redis backend of the result cache. Nothing is started here; safe to run again.
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v redis-server >/dev/null; then
    echo "services-setup: installing redis-server" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        redis-server >/dev/null
fi
