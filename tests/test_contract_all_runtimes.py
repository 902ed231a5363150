"""The executor contract, run against every registered runtime: WASM, Docker under runc and
under runsc, the fake runtime of ``tests/plugins`` (registered with one line), the remote
executor over a real service, and the Ray executor over a real three-node cluster (WASM and
Docker tasks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TEST_IMAGE, WasmFixtures, _docker_required
from parity_sandbox import (
    Config,
    Executor,
    PreparedTask,
    RuntimeUnavailable,
    Task,
    runtimes,
)
from raycluster import Cluster, cluster_or_skip
from service_server import Service

PLUGINS = Path(__file__).parent / "plugins"


@dataclass
class Subject:
    """An executor of one runtime, and how to make a task of it that echoes its stdin."""

    executor: Executor
    task: Callable[..., Task]
    said: Callable[[bytes], bytes]


def _docker(oci: str) -> Callable[[Config], Executor]:
    def make(config: Config) -> Executor:
        from parity_sandbox import DockerExecutor

        try:
            executor = DockerExecutor(config)
        except RuntimeUnavailable as exc:
            if _docker_required():
                pytest.fail(f"the Docker engine is required here: {exc}")
            pytest.skip(f"no Docker engine: {exc}")
        if oci not in executor.runtimes:
            executor.close()
            pytest.fail(f"the Docker daemon has no {oci} runtime")
        return executor

    return make


@pytest.fixture(scope="module")
def contract_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service for the remote executor's run of the contract."""
    pytest.importorskip("fastapi")
    server = Service(tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("cache"))
    server.make_key("contract")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def contract_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-node Ray cluster for the Ray executor's run of the contract."""
    nodes = cluster_or_skip(tmp_path_factory.mktemp("ray"))
    try:
        nodes.add("head", head=True, runtimes=("wasm",))
        nodes.add("n1", runtimes=("wasm", "docker"), oci_runtimes=("runc",))
        nodes.add("n2", runtimes=("wasm", "docker"), oci_runtimes=("runc",))
        yield nodes
    finally:
        nodes.close()


@pytest.fixture(
    params=[
        "wasm",
        pytest.param("docker-runc", marks=pytest.mark.docker),
        pytest.param("docker-runsc", marks=pytest.mark.docker),
        "fake",
        "remote",
        pytest.param("ray-wasm", marks=pytest.mark.slow),
        pytest.param("ray-docker", marks=[pytest.mark.docker, pytest.mark.slow]),
    ]
)
def subject(
    request: pytest.FixtureRequest,
    wasm: WasmFixtures,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Subject]:
    config = Config(cache_dir=tmp_path, cache={"path": tmp_path / "results.sqlite3"})
    name: str = request.param
    if name == "wasm":
        from parity_sandbox import WasmExecutor

        executor: Executor = WasmExecutor(config, workers=1)
        echo = wasm.echo_stdin
        yield Subject(executor, lambda **f: Task(wasm_file=echo, **f), lambda said: said)
    elif name.startswith("docker-"):
        oci = name.removeprefix("docker-")
        executor = _docker(oci)(config)
        yield Subject(
            executor,
            lambda **f: Task(image=TEST_IMAGE, command=["cat"], oci_runtime=oci, **f),
            lambda said: said,
        )
    elif name.startswith("ray-"):
        from parity_sandbox.cluster.executor import RayExecutor

        cluster = request.getfixturevalue("contract_cluster")
        ray_config = config.model_copy(update={"ray": cluster.config.ray})
        executor = RayExecutor(cluster.address, config=ray_config)
        if name == "ray-wasm":
            echo = wasm.echo_stdin
            yield Subject(executor, lambda **f: Task(wasm_file=echo, **f), lambda said: said)
        else:
            yield Subject(
                executor,
                lambda **f: Task(image=TEST_IMAGE, command=["cat"], runtime="docker", **f),
                lambda said: said,
            )
    elif name == "remote":
        from parity_sandbox import RemoteExecutor

        server = request.getfixturevalue("contract_service")
        executor = RemoteExecutor(server.url, server.keys["contract"], config=config)
        echo = wasm.echo_stdin
        yield Subject(executor, lambda **f: Task(wasm_file=echo, **f), lambda said: said)
    else:
        monkeypatch.syspath_prepend(str(PLUGINS))
        runtimes.register("fake", "fake_runtime:FakeExecutor")
        try:
            executor = runtimes.executor_class("fake")(config)
            yield Subject(
                executor,
                lambda **f: Task(wasm_module=b"\0asm\x01\0\0\0", runtime="fake", **f),
                lambda said: b"|" + said + b"|",
            )
        finally:
            del runtimes.RUNTIMES["fake"]
    executor.close()


def test_execute_returns_the_result_and_echoes_the_task(subject: Subject) -> None:
    task = subject.task(stdin=b"hello", id="t1", labels={"k": "v"})
    result = subject.executor.execute(task)
    assert result.ok and result.stdout == subject.said(b"hello")
    assert (result.task_id, result.labels) == ("t1", {"k": "v"})


def test_map_and_submit_keep_each_task_with_its_result(subject: Subject) -> None:
    tasks = [subject.task(stdin=str(i).encode()) for i in range(5)]
    results = list(subject.executor.map(tasks, max_parallel=2))
    assert [r.stdout for r in results] == [subject.said(str(i).encode()) for i in range(5)]
    futures = [subject.executor.submit(task) for task in tasks]
    assert all(isinstance(future, Future) for future in futures)
    assert [f.result(timeout=60).stdout for f in futures] == [r.stdout for r in results]


def test_a_prepared_task_keeps_its_spec_hash(subject: Subject) -> None:
    task = subject.task(stdin=b"x", cacheable=True)
    prepared = subject.executor.prepare(task)
    assert isinstance(prepared, PreparedTask)
    assert prepared.spec_hash == subject.executor.spec_hash(task)
    result = subject.executor.execute(prepared)
    assert result.spec_hash == prepared.spec_hash


def test_the_result_cache_and_use_cache(subject: Subject) -> None:
    task = subject.task(stdin=b"cache me", cacheable=True)
    assert not subject.executor.execute(task).cached
    assert subject.executor.execute(task).cached
    assert not subject.executor.execute(task, use_cache=False).cached
    assert [r.cached for r in subject.executor.map([task], use_cache=False)] == [False]


def test_a_closed_executor_refuses_at_every_entry(subject: Subject) -> None:
    executor = subject.executor
    executor.close()
    task = subject.task(stdin=b"")
    with pytest.raises(RuntimeUnavailable):
        executor.execute(task)
    with pytest.raises(RuntimeUnavailable):
        executor.submit(task)
    with pytest.raises(RuntimeUnavailable):
        executor.prepare(task)
    with pytest.raises(RuntimeUnavailable):
        executor.map([task])
    with pytest.raises(RuntimeUnavailable):
        executor.execute_many([task])
