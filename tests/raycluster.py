"""A real Ray cluster on loopback for the tests: nodes started by ``parity-sandbox``'s own
``node start`` (each with its own temp dir and ports), stopped by PID.

Every process of a node is a descendant of its ``ray start`` or shares its session (see
``parity_sandbox.cluster.node.stop_processes``); ``Cluster.pids()`` lists them, so a test can
kill or stop one node's processes, and the teardown can check that none is left.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from parity_sandbox import Config
from parity_sandbox.cluster import node as nodes

#: Ports a node takes (``ports_from`` + 1 to + 99); the head's GCS takes ``ports_from``.
SPAN = 100


def _free_base() -> int:
    """A base port whose next ``SPAN`` ports are free on loopback now."""
    for _ in range(200):
        base = random.randrange(30000, 59000, SPAN)
        try:
            for port in range(base, base + SPAN):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free range of ports on loopback")


def ray_required() -> bool:
    """scripts/test.sh sets PARITY_TEST_RAY=required: there a missing ray is a failure."""
    return os.environ.get("PARITY_TEST_RAY") == "required"


class Cluster:
    """Nodes of one cluster on loopback, each started by ``node start``."""

    def __init__(self, root: Path, *, grace: float = 3.0) -> None:
        # Ray's socket paths must fit in 107 bytes: the nodes' temp dirs are kept short.
        self.root = Path(tempfile.mkdtemp(prefix="psbray-", dir="/tmp"))
        self.token_file = root / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.config = Config(
            cache={"enabled": False},
            timeout="20s",
            ray={"token_file": self.token_file, "grace": grace},
        )
        self.base = _free_base()
        self.address = f"127.0.0.1:{self.base}"
        self.state_dir = root / "state"
        self.started: dict[str, nodes.NodeState] = {}
        self.ever: list[int] = []

    def add(
        self,
        name: str,
        *,
        head: bool = False,
        runtimes: Collection[str] | None = None,
        oci_runtimes: Collection[str] | None = None,
        gpus: int = 0,
        num_cpus: int = 1,
        failure_after: float = nodes.FAILURE_AFTER,
    ) -> nodes.NodeState:
        ports_from = self.base if head else _free_base()
        state = nodes.start(
            self.address,
            head=head,
            name=name,
            temp_dir=self.root / name,
            state_dir=self.state_dir,
            config=self.config,
            num_cpus=num_cpus,
            gpus=gpus,
            ports_from=ports_from,
            runtimes=runtimes,
            oci_runtimes=oci_runtimes,
            failure_after=failure_after,
        )
        self.started[name] = state
        self.ever.append(state.pid)
        return state

    def pids(self, name: str | None = None) -> set[int]:
        """The live processes of node ``name`` (of every node started, without one)."""
        roots = [self.started[name].pid] if name else self.ever
        found: set[int] = set()
        for pid in roots:
            found |= nodes.processes(pid)
        return found

    def signal(self, name: str, signum: int) -> None:
        """Send ``signum`` to every process of node ``name`` at once."""
        for pid in self.pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.stop(name)

    def stop(self, name: str) -> None:
        nodes.stop(self.state_dir, name)
        self.started.pop(name, None)

    def close(self) -> None:
        nodes.stop(self.state_dir)
        self.started.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def shut(self) -> None:
        """Stop every node; fail if any process of the cluster is still alive after."""
        self.close()
        left = self.wait_gone()
        assert not left, f"cluster processes left after node stop: {sorted(left)}"

    def executor(self) -> Iterator[object]:
        """A ``RayExecutor`` on this cluster, closed after (for a fixture to yield from)."""
        from parity_sandbox.cluster.executor import RayExecutor

        with RayExecutor(self.address, config=self.config) as executor:
            yield executor

    def wait_gone(self, timeout: float = 30.0) -> set[int]:
        """The processes of every node ever started that are still alive after ``timeout``."""
        deadline = time.monotonic() + timeout
        left = self.pids()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.pids()
        return left


def cluster_or_skip(root: Path) -> Cluster:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        if ray_required():
            pytest.fail(f"ray is required here: {exc}")
        pytest.skip(f"ray is not installed: {exc}")
    return Cluster(root)
