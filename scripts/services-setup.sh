#!/usr/bin/env bash
# Install the servers and tools the tests start for themselves (on loopback, on a free port):
# Redis, for the Redis backend of the result cache, PostgreSQL (Debian's `postgresql`, whose
# server binaries live in /usr/lib/postgresql/VERSION/bin; tests/postgres.py runs them as the
# `postgres` user in a temp dir of its own), promtool (Debian's `prometheus`: the alerting
# rules' checks) and Chromium (the dashboard, loaded headless). Nothing of ours is started here, and the "main"
# cluster that Debian's package may create and start on install is stopped again: the tests
# never use it. Safe to run again.
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "services-setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null; then
    # Columns: version, cluster name, port, status, ... (an unstarted cluster says "down").
    pg_lsclusters --no-header | while read -r version cluster _ status _; do
        if [[ $status == online* ]]; then
            echo "services-setup: stopping Debian's cluster $version/$cluster" >&2
            $sudo pg_ctlcluster "$version" "$cluster" stop
        fi
    done
fi
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    # Debian's package starts a Prometheus server; the tests need only promtool.
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
