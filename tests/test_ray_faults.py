"""RayExecutor when nodes fail: SIGKILLed mid-task (the tasks run again elsewhere), SIGSTOPped
(the driver's deadline holds, and nothing of the task is left once the node runs again).

The cluster's head runs WASM only; the nodes that Docker tasks need are started by each test,
so it knows where those tasks are, and killed or stopped by it (every process of the node).
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from conftest import TEST_IMAGE, WasmFixtures
from parity_sandbox import ExecutionError, ExecutionTimeout, Result, Status, Task
from parity_sandbox.runtimes.docker import host as docker_host
from raycluster import Cluster, cluster_or_skip

pytestmark = [pytest.mark.docker, pytest.mark.slow]

#: How long the head waits before it takes a silent node for dead: longer than a stop here.
FAILURE_AFTER = 20.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = cluster_or_skip(tmp_path_factory.mktemp("ray-faults"))
    try:
        nodes.add("head", head=True, runtimes=("wasm",), failure_after=FAILURE_AFTER)
        yield nodes
    finally:
        nodes.shut()


@pytest.fixture(scope="module")
def ray_executor(cluster: Cluster) -> Iterator[object]:
    yield from cluster.executor()


def _containers(task_ids: set[str], *, running: bool = False) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        # The low-level list: the high-level one inspects each container after listing it,
        # and a container reaped in between makes that a 404.
        found = client.api.containers(
            all=not running, filters={"label": f"{docker_host.MANAGED}=true"}
        )
        return [
            str(c["Id"])
            for c in found
            if (c.get("Labels") or {}).get(docker_host.TASK_ID) in task_ids
        ]
    finally:
        client.close()


def _wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:g} s")


def test_a_killed_nodes_tasks_finish_on_another_node_on_their_second_attempt(
    ray_executor: object, cluster: Cluster
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    victim = cluster.add("v1", runtimes=("docker",), oci_runtimes=("runc",))
    other = cluster.add("v2", runtimes=("docker",), oci_runtimes=("runc",))
    try:
        ids = {f"kill-{secrets.token_hex(4)}" for _ in range(4)}
        futures: list[Future[Result]] = [
            ray_executor.submit(
                Task(id=i, image=TEST_IMAGE, command=["sh", "-c", "sleep 4; echo done"])
            )
            for i in sorted(ids)
        ]
        _wait_for(lambda: len(_containers(ids, running=True)) == 4, 30, "4 containers running")
        killed_at = time.monotonic()
        cluster.kill("v1")
        results = [future.result(60) for future in futures]
        took = time.monotonic() - killed_at
        assert all(r.status is Status.SUCCEEDED and r.stdout == b"done\n" for r in results)
        again = [r for r in results if r.attempts == 2]
        assert again, "no task ran on the killed node"  # placement spreads them over both
        assert all(r.runtime is not None and r.runtime.node == other.node_id for r in again)
        assert all(r.attempts == 1 for r in results if r not in again)
        assert took < 30, f"the tasks of the killed node took {took:.1f} s to finish elsewhere"
        # What the killed node's agent left (its containers) is reaped by a live agent.
        _wait_for(lambda: not _containers(ids), 60, "the killed node's containers were reaped")
        assert victim.node_id not in {r.runtime.node for r in results if r.runtime}
    finally:
        cluster.stop("v2")


def test_a_stopped_nodes_task_ends_by_its_deadline_and_leaves_nothing_behind(
    ray_executor: object, cluster: Cluster
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    cluster.add("v3", runtimes=("docker",), oci_runtimes=("runc",))
    try:
        task_id = f"stop-{secrets.token_hex(4)}"
        task = Task(id=task_id, image=TEST_IMAGE, command=["sleep", "60"], limits={"timeout": "3s"})
        submitted = time.monotonic()
        future = ray_executor.submit(task)
        _wait_for(
            lambda: future.done() or _containers({task_id}, running=True), 60, "the task started"
        )
        assert not future.done(), f"the task ended before it was stopped: {future.exception()}"
        cluster.signal("v3", signal.SIGSTOP)
        try:
            with pytest.raises((ExecutionTimeout, ExecutionError)):
                future.result(60)
            waited = time.monotonic() - submitted
        finally:
            cluster.signal("v3", signal.SIGCONT)
        limit = 3 + cluster.config.ray.grace + 3  # timeout, grace, and the start
        assert waited < limit, f"the caller waited {waited:.1f} s for a stopped node"
        # Running again, the node's agent ends the task it was stopped in and removes it.
        _wait_for(lambda: not _containers({task_id}), 60, "the stopped task's container went")
    finally:
        cluster.stop("v3")


def test_map_loses_and_duplicates_nothing_when_nodes_are_killed(
    ray_executor: object, cluster: Cluster, wasm: WasmFixtures
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    cluster.add("m1", runtimes=("wasm",))
    cluster.add("m2", runtimes=("wasm",))
    try:
        tasks = [Task(wasm_file=wasm.echo_stdin, input=b"n%d" % i) for i in range(600)]
        results: list[Result] = []
        for i, result in enumerate(ray_executor.map(tasks)):
            results.append(result)
            if i == 100:
                cluster.kill("m1")
            if i == 300:
                cluster.kill("m2")
        assert [r.stdout for r in results] == [b"n%d" % i for i in range(600)]
        assert {r.attempts for r in results} <= {1, 2}
    finally:
        for name in ("m1", "m2"):
            if name in cluster.started:
                cluster.stop(name)
