"""``parity-sandbox node start|stop``: a Ray node that says what it can run.

``start`` probes the host (the runtimes that work here, as ``doctor`` finds them; the OCI
runtimes of its Docker daemon; GPUs), starts ``ray start --block`` in a session of its own
with those capabilities as resources (see ``parity_sandbox.cluster._ray``), waits for the node
to join, starts the node's agent on it, and writes a state file with the processes it
started. ``stop`` stops exactly those processes (by PID, and the processes they started,
found through ``/proc``), never any other Ray process on the host.

Addresses: the node listens on ``--node-ip`` (default ``127.0.0.1``, loopback only). Ray 2.60
listens on every interface once a node's address is not loopback: a multi-host cluster needs
its hosts' firewall to admit only its own nodes (and Ray's token authentication, on by
default, stands between it and anyone else).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from parity_sandbox._config import Config
from parity_sandbox._exceptions import RuntimeUnavailable, SandboxError
from parity_sandbox.runtimes import executor_class, names

#: How long ``start`` waits for its node to join and its agent to answer.
START_TIMEOUT = 90.0
#: How long ``stop`` waits for its processes after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
#: Seconds after which the head takes a node that stopped answering for dead (its tasks
#: then run elsewhere); Ray's own default is about 15 s. A node stopped for less comes back.
FAILURE_AFTER = 5.0


def health_check_env(failure_after: float) -> dict[str, str]:
    """The head's settings that make it take a silent node for dead after ``failure_after``
    seconds: a check every second (or sooner), each answered within that time."""
    period = min(1000, max(100, int(failure_after * 1000 / 3)))
    return {
        "RAY_health_check_period_ms": str(period),
        "RAY_health_check_timeout_ms": str(period),
        "RAY_health_check_failure_threshold": str(max(1, round(failure_after * 1000 / period))),
    }


#: The ``ray start`` processes this process started and has not stopped, by PID (kept, so
#: that they are waited for when stopped, and never taken for leaked).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class NodeState:
    """What ``start`` started, as its state file keeps it."""

    name: str
    address: str
    node_id: str
    pid: int
    temp_dir: str
    head: bool
    resources: dict[str, float]


def probe(
    config: Config,
    gpus: int | None = None,
    *,
    runtimes: Collection[str] | None = None,
    oci_runtimes: Collection[str] | None = None,
) -> dict[str, float]:
    """The capabilities of this host as Ray resources: each runtime that works here, each
    OCI runtime of the Docker daemon, and ``GPU`` (``gpus``, or those the daemon can give).
    ``runtimes`` and ``oci_runtimes`` keep only those (a node may offer less than it has)."""
    from parity_sandbox.cluster._ray import PLENTY, oci_resource, runtime_resource

    resources: dict[str, float] = {}
    for name in names():
        if runtimes is not None and name not in runtimes:
            continue
        ok, _ = executor_class(name).diagnose(config)
        if ok:
            resources[runtime_resource(name)] = PLENTY
    if runtime_resource("docker") in resources:
        from parity_sandbox.runtimes.docker.executor import DockerExecutor

        with contextlib.suppress(SandboxError), DockerExecutor(config, reap=False) as docker:
            for oci in docker.runtimes:
                if oci in ("runc", "runsc") and (oci_runtimes is None or oci in oci_runtimes):
                    resources[oci_resource(oci)] = PLENTY
            if gpus is None and docker.has_gpu_runtime():
                gpus = _nvidia_gpus()
    if gpus:
        resources["GPU"] = float(gpus)
    return resources


def _nvidia_gpus() -> int:
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def ray_start_args(
    *,
    address: str,
    head: bool,
    node_ip: str,
    temp_dir: Path,
    resources: Mapping[str, float],
    num_cpus: int | None,
    ports_from: int | None,
) -> list[str]:
    """The ``ray start --block`` command line of a node (pure)."""
    custom = {name: amount for name, amount in resources.items() if name != "GPU"}
    args = [
        sys.executable,
        "-m",
        "parity_sandbox.cluster.launch",
        "start",
        "--block",
        f"--node-ip-address={node_ip}",
        f"--temp-dir={temp_dir}",
        f"--resources={json.dumps(custom, sort_keys=True)}",
        f"--num-gpus={int(resources.get('GPU', 0))}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if ports_from is not None:
        base = ports_from
        args += [
            f"--node-manager-port={base + 1}",
            f"--object-manager-port={base + 2}",
            f"--dashboard-agent-listen-port={base + 3}",
            f"--dashboard-agent-grpc-port={base + 4}",
            f"--metrics-export-port={base + 5}",
            f"--runtime-env-agent-port={base + 6}",
            f"--min-worker-port={base + 10}",
            f"--max-worker-port={base + 99}",
        ]
    if head:
        port = address.rpartition(":")[2]
        args += ["--head", f"--port={port}", "--include-dashboard=false"]
    else:
        args.append(f"--address={address}")
    return args


def start(
    address: str,
    *,
    head: bool = False,
    name: str | None = None,
    node_ip: str = "127.0.0.1",
    temp_dir: Path,
    state_dir: Path,
    config: Config,
    num_cpus: int | None = None,
    gpus: int | None = None,
    ports_from: int | None = None,
    runtimes: Collection[str] | None = None,
    oci_runtimes: Collection[str] | None = None,
    extra_resources: Mapping[str, float] | None = None,
    failure_after: float = FAILURE_AFTER,
) -> NodeState:
    """Start a node (the head, with ``head``) of the cluster at ``address`` with its agent;
    return what was started, also written to ``<state_dir>/node-<name>.json``. ``gpus``,
    ``runtimes`` and ``oci_runtimes`` say what it offers (default: what ``probe`` finds);
    ``ports_from`` fixes its ports (``ports_from + 1`` to ``+ 99``; default: Ray's choice);
    ``failure_after`` (the head's) is how long a node may be silent before it counts as dead.

    Raises:
        RuntimeUnavailable: the node did not join, or its agent did not start.
    """
    from parity_sandbox.cluster import _ray
    from parity_sandbox.cluster.agent import start_agent

    name = name or secrets.token_hex(4)
    marker = f"psb_node_{name}"
    found = probe(config, gpus, runtimes=runtimes, oci_runtimes=oci_runtimes)
    resources = {**found, **(extra_resources or {}), marker: 1.0}
    temp_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    _ray.use_token(config.ray.token_file)
    env = dict(os.environ)
    if head:
        env.update(health_check_env(failure_after))
    args = ray_start_args(
        address=address,
        head=head,
        node_ip=node_ip,
        temp_dir=temp_dir,
        resources=resources,
        num_cpus=num_cpus,
        ports_from=ports_from,
    )
    log = (temp_dir / "node.log").open("ab")
    with log:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _children[process.pid] = process
    try:
        node_id = _joined(address, marker, process, config)
        agent = start_agent(node_id, config.model_dump_json())
        _ray.ray.get(agent.describe.remote(), timeout=START_TIMEOUT)
    except BaseException:
        stop_processes(process.pid)
        raise
    finally:
        _ray.disconnect()
    state = NodeState(name, address, node_id, process.pid, str(temp_dir), head, resources)
    state_file(state_dir, name).write_text(json.dumps(asdict(state), indent=2))
    return state


def _joined(address: str, marker: str, process: subprocess.Popen[bytes], config: Config) -> str:
    """Connect to the cluster and wait for the node that advertises ``marker``; its id."""
    from parity_sandbox.cluster import _ray

    deadline = time.monotonic() + START_TIMEOUT
    connected = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeUnavailable(
                f"ray start exited with {process.returncode} (see its log, node.log)"
            )
        if not connected:
            if not _answers(address):  # the GCS is not up yet (ray.init would wait long)
                time.sleep(0.2)
                continue
            try:
                _ray.connect(address, config.ray.token_file)
                connected = True
            except RuntimeUnavailable:
                time.sleep(0.5)
                continue
        for node in _ray.ray.nodes():  # type: ignore[no-untyped-call]
            if node.get("Alive") and marker in node.get("Resources", {}):
                return str(node["NodeID"])
        time.sleep(0.2)
    raise RuntimeUnavailable(f"the node did not join the cluster at {address} in time")


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def state_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"node-{name}.json"


def stop(state_dir: Path, name: str | None = None) -> list[NodeState]:
    """Stop the nodes this host started (``name``: that one only); those stopped."""
    files = [state_file(state_dir, name)] if name else sorted(state_dir.glob("node-*.json"))
    states = []
    for path in files:
        try:
            states.append((path, NodeState(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError):
            continue
    # The head last: the others report to it until they stop.
    states.sort(key=lambda each: each[1].head)
    for path, state in states:
        stop_processes(state.pid)
        path.unlink(missing_ok=True)
    return [state for _, state in states]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process it started, and those they started (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def stop_processes(pid: int) -> None:
    """Stop ``pid`` and its descendants: SIGTERM, then SIGKILL after ``STOP_GRACE``.

    Ray's processes of a node are the children of its ``ray start`` (the raylet, the GCS)
    and theirs (workers); those that were orphaned already are found by the session: the
    node's processes share ``ray start``'s session, which ``start`` made for it.
    """
    pids = processes(pid)
    for each in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and any(alive(each) for each in pids):
        time.sleep(0.1)
    for each in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, signal.SIGKILL)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()


def processes(pid: int) -> set[int]:
    """The live processes of the node whose ``ray start`` is ``pid``: it, its descendants,
    and the members of its session (those orphaned already)."""
    found = set(descendants(pid)) | _session_members(pid)
    return {each for each in found if alive(each)}


def _session_members(sid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[4]) == sid:
                members.add(int(entry.name))
    return members


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
