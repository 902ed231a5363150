#!/usr/bin/env bash
# Make a Docker engine with runc and gVisor (runsc) ready on this machine, and build the test
# image; safe to run again. Needs root (or sudo) and the .venv that bootstrap.sh makes.
#   - Debian packages: docker.io, runsc (gVisor), busybox-static, and gcc/libc6-dev, which
#     build the container helper and the test probe as static binaries; iproute2 and
#     nftables, with which the executor gives a task granted a network its veth and rules
#   - /etc/docker/daemon.json: runsc registered with --network=none (a task sees only
#     loopback), and runsc-egress (scripts/runsc-egress, installed as /usr/local/lib/parity-sandbox/runsc-egress)
#     with --network=sandbox for tasks granted a network under gVisor (their only interface is the
#     veth to their proxy); no default bridge and no iptables rules
#   - dockerd started (or restarted to pick up the configuration) and waited for
#   - the image parity-sandbox-test/busybox: busybox plus the probe in tests/fixtures/docker
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(docker.io runsc busybox-static gcc libc6-dev iproute2 nftables)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "docker-setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# The wrapper can change without a restart of dockerd: it is run afresh for every command.
wrapper=/usr/local/lib/parity-sandbox/runsc-egress
if ! cmp -s scripts/runsc-egress "$wrapper" 2>/dev/null; then
    $sudo install -D -m 0755 scripts/runsc-egress "$wrapper"
fi

config=/etc/docker/daemon.json
wanted='{
  "runtimes": {
    "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--oci-seccomp"]},
    "runsc-egress": {"path": "'"$wrapper"'", "runtimeArgs": ["--network=sandbox", "--oci-seccomp"]}
  },
  "bridge": "none",
  "iptables": false
}'
changed=0
if ! cmp -s <(echo "$wanted") "$config" 2>/dev/null; then
    if [ -s "$config" ]; then
        $sudo cp "$config" "$config.before-parity-sandbox"
        echo "docker-setup: replacing $config (old one kept as $config.before-parity-sandbox)" >&2
    fi
    $sudo mkdir -p /etc/docker
    echo "$wanted" | $sudo tee "$config" >/dev/null
    changed=1
fi

python=${PYTHON:-.venv/bin/python}
daemon_ok() {
    "$python" - <<'PY' 2>/dev/null
import sys, docker
try:
    info = docker.from_env(timeout=5).info()
except Exception:
    sys.exit(1)
runtimes = info.get("Runtimes", {})
sys.exit(0 if "runsc" in runtimes and "runsc-egress" in runtimes else 2)
PY
}
wait_for_daemon() {
    for _ in $(seq 1 120); do
        daemon_ok && return 0
        sleep 0.5
    done
    echo "docker-setup: dockerd did not come up; see /var/log/parity-sandbox-dockerd.log" >&2
    return 1
}

state=0
daemon_ok || state=$?
if [ "$state" -ne 0 ] || [ "$changed" -eq 1 ]; then
    if [ -d /run/systemd/system ]; then
        $sudo systemctl restart docker
    else
        if pgrep -x dockerd >/dev/null; then
            echo "docker-setup: restarting dockerd for the new configuration" >&2
            $sudo pkill -x dockerd || true
            for _ in $(seq 1 60); do pgrep -x dockerd >/dev/null || break; sleep 0.5; done
        fi
        echo "docker-setup: starting dockerd" >&2
        $sudo bash -c 'setsid nohup dockerd >/var/log/parity-sandbox-dockerd.log 2>&1 </dev/null &'
    fi
fi
wait_for_daemon

"$python" scripts/build_test_image.py
