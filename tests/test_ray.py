"""RayExecutor on a real three-node Ray cluster on loopback, with real runtimes.

The nodes are started by ``node start`` (each with its own temp dir and ports) and offer
different things: the head WASM and Docker under runc, ``w1`` WASM and Docker under runsc
only, ``w2`` WASM and Docker under runc and one (fake) GPU. Tasks must land where they can
run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TEST_IMAGE, WasmFixtures
from parity_sandbox import (
    Config,
    ExecutionTimeout,
    InvalidInput,
    RuntimeUnavailable,
    Status,
    Task,
)
from raycluster import Cluster, cluster_or_skip
from test_result_cache import redis_url  # noqa: F401 - a fixture

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = cluster_or_skip(tmp_path_factory.mktemp("ray"))
    try:
        nodes.add("head", head=True, runtimes=("wasm", "docker"), oci_runtimes=("runc",))
        nodes.add("w1", runtimes=("wasm", "docker"), oci_runtimes=("runsc",))
        nodes.add("w2", runtimes=("wasm", "docker"), oci_runtimes=("runc",), gpus=1)
        yield nodes
    finally:
        nodes.shut()


@pytest.fixture(scope="module")
def ray_executor(cluster: Cluster) -> Iterator[object]:
    yield from cluster.executor()


def _agent_tasks(cluster: Cluster) -> dict[str, int]:
    """How many tasks each node's agent was given, by node name."""
    import ray

    from parity_sandbox.cluster.agent import start_agent

    return {
        name: ray.get(start_agent(state.node_id).describe.remote(), timeout=30)["tasks"]
        for name, state in cluster.started.items()
    }


# -- the contract -----------------------------------------------------------------------------


def test_a_wasm_task_runs_on_a_node_and_says_which(
    ray_executor: object, cluster: Cluster, wasm: WasmFixtures
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    result = ray_executor.execute(Task(wasm_file=wasm.args, args=["a b", "c"]))
    assert result.status is Status.SUCCEEDED
    assert result.stdout == b"3\nargs.wasm\na b\nc\n" or result.stdout.startswith(b"3\n")
    assert result.attempts == 1
    assert result.runtime is not None and result.runtime.name == "wasm"
    assert result.runtime.node in {state.node_id for state in cluster.started.values()}


def test_submit_map_and_execute_async_keep_the_contract(
    ray_executor: object, wasm: WasmFixtures
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    futures = [
        ray_executor.submit(Task(wasm_file=wasm.echo_stdin, input=b"%d" % i)) for i in range(6)
    ]
    assert [f.result(60).stdout for f in futures] == [b"%d" % i for i in range(6)]

    async def both() -> list[bytes]:
        results = await asyncio.gather(
            ray_executor.execute_async(Task(wasm_file=wasm.echo_stdin, input=b"x")),
            ray_executor.execute_async(Task(wasm_file=wasm.echo_stdin, input=b"y")),
        )
        return [r.stdout for r in results]

    assert asyncio.run(both()) == [b"x", b"y"]
    # A bad task in a batch does not end it: its error result takes its place.
    tasks = [
        Task(wasm_file=wasm.echo_stdin, input=b"1"),
        Task(wasm_file=wasm.echo_stdin, network={"allow": ["example.org:443"]}),
        Task(wasm_file=wasm.loop, limits={"timeout": "1s"}),
        Task(wasm_file=wasm.echo_stdin, input=b"4"),
    ]
    results = list(ray_executor.map(tasks))
    assert [r.status for r in results] == [
        Status.SUCCEEDED,
        Status.ERROR,
        Status.TIMEOUT,
        Status.SUCCEEDED,
    ]
    assert results[1].error is not None and results[1].error.type == "InvalidInput"
    assert results[2].runtime is not None  # the node's own timeout: a run, not a lost node
    assert results[3].stdout == b"4"


def test_errors_come_back_as_the_library_raises_them(
    ray_executor: object, wasm: WasmFixtures
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    with pytest.raises(InvalidInput) as rejected:
        ray_executor.execute(Task(wasm_file=wasm.hello, network={"allow": ["example.org:443"]}))
    assert rejected.value.field == "network"
    with pytest.raises(ExecutionTimeout) as late:
        ray_executor.execute(Task(wasm_file=wasm.print_then_loop, limits={"timeout": "1s"}))
    assert late.value.result is not None and late.value.result.stdout  # the partial output


def test_the_result_cache_answers_a_repeated_deterministic_task(
    cluster: Cluster, wasm: WasmFixtures, tmp_path: Path
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    config = cluster.config.model_copy(
        update={"cache": Config(cache={"path": tmp_path / "cache.sqlite3"}).cache}
    )
    task = Task(wasm_file=wasm.hello, deterministic=True)
    with RayExecutor(cluster.address, config=config) as executor:
        first = executor.execute(task)
        second = executor.execute(task)
    assert not first.cached and second.cached
    assert first.spec_hash == second.spec_hash is not None
    assert second.result_hash == first.result_hash


def test_input_files_travel_with_their_task_and_outputs_come_back(
    ray_executor: object, wasm: WasmFixtures, tmp_path: Path
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    host_file = tmp_path / "a.txt"
    host_file.write_bytes(b"from the driver's host\n")
    read = ray_executor.execute(
        Task(wasm_file=wasm.read_input, args=["a.txt"], input_files={"a.txt": host_file})
    )
    assert read.stdout == b"from the driver's host\n"
    written = ray_executor.execute(Task(wasm_file=wasm.write_outputs))
    assert written.files["out/result.txt"] == b"result 42\n"
    assert written.files["out/sub/nested.txt"] == b"nested\n"


def test_a_driver_without_the_clusters_token_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    import subprocess
    import sys

    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    script = (
        "import sys\n"
        "from parity_sandbox import Config, RuntimeUnavailable\n"
        "from parity_sandbox.cluster.executor import RayExecutor\n"
        f"config = Config(ray={{'token_file': {str(wrong)!r}}})\n"
        "try:\n"
        f"    RayExecutor({cluster.address!r}, config=config).close()\n"
        "except RuntimeUnavailable as exc:\n"
        "    print('refused:', exc.message[:300]); sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 3, (done.stdout, done.stderr[-2000:])
    assert "refused" in done.stdout


def test_a_docker_task_runs_in_its_nodes_container(ray_executor: object) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    result = ray_executor.execute(Task(image=TEST_IMAGE, command=["sh", "-c", "echo hi; env"]))
    assert result.status is Status.SUCCEEDED, result.error
    assert result.stdout.startswith(b"hi\n")
    # The task is in its sandbox, not in a Ray worker: nothing of Ray reaches it.
    assert b"RAY" not in result.stdout.upper().replace(b"ARRAY", b"")
    assert result.runtime is not None and result.runtime.oci_runtime == "runc"


def test_a_wasm_task_sees_none_of_the_ray_workers_environment(
    ray_executor: object, wasm: WasmFixtures
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    result = ray_executor.execute(Task(wasm_file=wasm.env, env={"ONLY": "this"}))
    assert result.stdout == b"ONLY=this\ncount=1\n"


# -- placement --------------------------------------------------------------------------------


def test_a_runsc_task_lands_only_on_the_node_that_has_runsc(
    ray_executor: object, cluster: Cluster
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    tasks = [Task(image=TEST_IMAGE, command=["true"], oci_runtime="runsc") for _ in range(4)]
    results = list(ray_executor.map(tasks))
    assert all(r.status is Status.SUCCEEDED for r in results), [r.error for r in results]
    assert {r.runtime.node for r in results if r.runtime} == {cluster.started["w1"].node_id}
    assert {r.runtime.oci_runtime for r in results if r.runtime} == {"runsc"}


def test_a_gpu_task_lands_only_on_the_node_that_advertises_a_gpu(
    ray_executor: object, cluster: Cluster
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    before = _agent_tasks(cluster)
    # No real GPU here: the task cannot run, but where it was sent shows in the agents.
    for _ in range(3):
        (result,) = ray_executor.map([Task(image=TEST_IMAGE, command=["true"], gpus=1)])
        assert result.status is not Status.SUCCEEDED
    after = _agent_tasks(cluster)
    moved = {name: after[name] - before[name] for name in after}
    assert moved == {"head": 0, "w1": 0, "w2": 3}


@pytest.mark.parametrize(
    ("task", "named"),
    [
        (Task(image=TEST_IMAGE, command=["true"], gpus=2), "2 GPU(s) (the most a node has: 1)"),
        (
            Task(image=TEST_IMAGE, command=["true"], gpus=1, oci_runtime="runsc"),
            "all of",
        ),
        (
            Task(image=TEST_IMAGE, command=["true"], limits={"memory": "1000g"}),
            "of memory",
        ),
    ],
)
def test_a_task_no_node_can_run_fails_at_once_naming_what_is_missing(
    ray_executor: object, task: Task, named: str
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    started = time.monotonic()
    with pytest.raises(RuntimeUnavailable) as refused:
        ray_executor.execute(task)
    assert time.monotonic() - started < 2.0
    assert named in refused.value.message


# -- many tasks -------------------------------------------------------------------------------


def test_a_thousand_wasm_tasks_come_back_correct_in_order_without_duplicates(
    ray_executor: object, cluster: Cluster, wasm: WasmFixtures
) -> None:
    from parity_sandbox.cluster.executor import RayExecutor

    assert isinstance(ray_executor, RayExecutor)
    tasks = (Task(wasm_file=wasm.echo_stdin, input=b"task %d" % i) for i in range(1000))
    results = list(ray_executor.map(tasks))
    wrong = [(i, r.status, r.error) for i, r in enumerate(results) if r.stdout != b"task %d" % i]
    assert not wrong, wrong[:5]
    assert all(r.attempts == 1 for r in results)
    ran_on = {r.runtime.node for r in results if r.runtime}
    assert ran_on == {state.node_id for state in cluster.started.values()}
    # The module went into the object store once.
    assert len(ray_executor._modules) >= 1


# -- security ---------------------------------------------------------------------------------


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of each listening TCP socket the processes ``pids`` hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = fd.readlink().as_posix() if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            found.append((inodes[fields[9]], _address(fields[1], width)))
    return found


def _address(field: str, width: int) -> str:
    import ipaddress

    hex_ip, _, _ = field.partition(":")
    raw = bytes.fromhex(hex_ip)
    # /proc/net/tcp* spells each 32-bit word in host (little-endian) order.
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(ordered if width == 32 else ordered[:4]))


def test_nothing_of_the_cluster_listens_beyond_loopback(
    ray_executor: object, cluster: Cluster
) -> None:
    import ipaddress

    listening = _listening(cluster.pids())
    assert listening, "found no listening socket of the cluster: the check would see nothing"

    def loopback(text: str) -> bool:
        ip = ipaddress.ip_address(text)
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback

    outside = [(pid, ip) for pid, ip in listening if not loopback(ip)]
    assert not outside, f"cluster processes listen beyond loopback: {outside}"


# -- the shared result cache, and the service on a cluster --------------------------------------


def test_two_drivers_share_results_through_the_redis_cache(
    cluster: Cluster,
    wasm: WasmFixtures,
    redis_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    from parity_sandbox import RedisCache
    from parity_sandbox.cluster.executor import RayExecutor

    RedisCache(redis_url, 60, 1 << 30).clear()
    config = cluster.config.model_copy(
        update={"cache": Config(cache={"backend": "redis", "redis_url": redis_url}).cache}
    )
    task = Task(wasm_file=wasm.echo_stdin, input=b"shared", deterministic=True)
    with RayExecutor(cluster.address, config=config) as first:
        ran = first.execute(task)
    with RayExecutor(cluster.address, config=config) as second:
        answered = second.execute(task)
        (again,) = second.map([task])
    assert not ran.cached and ran.runtime is not None and ran.runtime.node
    assert answered.cached and again.cached
    assert answered.result_hash == ran.result_hash


def test_the_service_runs_its_tasks_on_the_cluster(
    cluster: Cluster, wasm: WasmFixtures, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import base64

    from service_server import running_service

    env = {
        "PARITY_SANDBOX_SERVICE_BACKEND": f"ray://{cluster.address}",
        "PARITY_SANDBOX_RAY_TOKEN_FILE": str(cluster.token_file),
    }
    module = base64.b64encode(wasm.echo_stdin.read_bytes()).decode()
    with (
        running_service(tmp_path_factory, env) as server,
        server.client(server.keys["alice"]) as client,
    ):
        body = {"wasm_module": module, "input": base64.b64encode(b"via ray").decode()}
        answer = client.post("/v1/tasks", params={"wait": 30}, json=body)
        assert answer.status_code == 200, answer.text
        result = answer.json()["result"]
        assert base64.b64decode(result["stdout"]) == b"via ray"
        nodes = {state.node_id for state in cluster.started.values()}
        assert result["runtime"]["node"] in nodes
