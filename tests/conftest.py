"""Shared fixtures: WASM test programs compiled from C at test time, shared executors, and
the Docker engine (runc and runsc) with its test image."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from parity_sandbox import (
    Config,
    DockerExecutor,
    Result,
    RuntimeUnavailable,
    SandboxError,
    Task,
    WasmExecutor,
)
from parity_sandbox.runtimes.docker import host as docker_host
from postgres import postgres_server  # noqa: F401 - a fixture, for every test module

FIXTURES = Path(__file__).parent / "fixtures" / "wasm"
BUILD_SCRIPT = Path(__file__).parent.parent / "scripts" / "build-wasm.sh"


@pytest.fixture(scope="session")
def wasm_dir() -> Path:
    """Directory of the compiled fixtures (built once; rebuilt when a source changes)."""
    out = Path(os.environ.get("WASM_FIXTURE_DIR", FIXTURES / "build"))
    subprocess.run(["bash", str(BUILD_SCRIPT), str(FIXTURES), str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def wasm(wasm_dir: Path) -> WasmFixtures:
    return WasmFixtures(wasm_dir)


class WasmFixtures:
    """``wasm.hello`` is the path of the compiled ``hello.c`` fixture, and so on."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def __getattr__(self, name: str) -> Path:
        path = self._dir / f"{name}.wasm"
        if not path.is_file():
            raise AttributeError(f"no compiled fixture {name}.wasm in {self._dir}")
        return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("module-cache")


@pytest.fixture(scope="module")
def executor(cache_dir: Path) -> Iterator[WasmExecutor]:
    """One executor per test module (its workers stay warm between tests)."""
    # No result cache: tests that run a task twice must see two runs.
    config = Config(cache_dir=cache_dir, timeout="10s", cache={"enabled": False})
    with WasmExecutor(config) as ex:
        yield ex


# -- Docker ---------------------------------------------------------------------------------

#: Built by scripts/docker-setup.sh: busybox plus the probe of tests/fixtures/docker/probe.c.
TEST_IMAGE = "parity-sandbox-test/busybox:latest"
OCI_RUNTIMES = ("runc", "runsc")


def _docker_required() -> bool:
    """scripts/test.sh sets PARITY_TEST_DOCKER=required: there a missing engine is a failure."""
    return os.environ.get("PARITY_TEST_DOCKER") == "required"


def _docker_executor(**docker: Any) -> Iterator[DockerExecutor]:
    """An executor for the Docker tests; skips them only where no engine is required."""
    try:
        executor = DockerExecutor(Config(timeout="20s", cache={"enabled": False}, docker=docker))
    except RuntimeUnavailable as exc:
        if _docker_required():
            pytest.fail(f"the Docker engine is required here: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    with executor:
        yield executor


@pytest.fixture(scope="session")
def docker_executor() -> Iterator[DockerExecutor]:
    """One executor for the Docker tests (cold path)."""
    yield from _docker_executor()


@pytest.fixture(params=OCI_RUNTIMES)
def oci_runtime(request: pytest.FixtureRequest, docker_executor: DockerExecutor) -> str:
    """Each test that takes this runs under runc and under runsc (gVisor)."""
    name: str = request.param
    if name not in docker_executor.runtimes:
        if _docker_required():
            pytest.fail(f"the Docker daemon has no {name} runtime")
        pytest.skip(f"the Docker daemon has no {name} runtime")
    return name


def managed_containers(executor: DockerExecutor, task_id: str | None = None) -> list[str]:
    """Ids of containers (running or not) labelled as ours, or as ``task_id``'s, once the
    executor has removed those of finished tasks (it does that in the background).

    The labels are the runtime's own constants, so a renamed label cannot make this find
    nothing (``test_the_container_finders_find_a_running_task`` checks it finds one)."""
    # Generous: under load, a gVisor sandbox can take over half a minute to die (after a
    # fork bomb, say); what matters here is that it is removed.
    assert executor.drain(150), "containers of finished tasks were not removed within 150 s"
    label = f"{docker_host.TASK_ID}={task_id}" if task_id else f"{docker_host.MANAGED}=true"
    found = executor._api.containers(all=True, filters={"label": label})
    return [str(item["Id"]) for item in found]


def containers_of(executor: DockerExecutor, pid: int) -> list[str]:
    """Ids of our containers (running or not) that process ``pid`` owns."""
    found = executor._api.containers(all=True, filters={"label": f"{docker_host.MANAGED}=true"})
    return [
        str(c["Id"])
        for c in found
        if (c.get("Labels") or {}).get(docker_host.OWNER, "").split(":")[1:2] == [str(pid)]
    ]


@pytest.fixture(scope="session")
def warm_docker_executor() -> Iterator[DockerExecutor]:
    """An executor with a warm pool; idle profiles drain away soon (many tests, many)."""
    pool = {"enabled": True, "min": 0, "max": 2, "idle_timeout": "20s"}
    yield from _docker_executor(pool=pool)


class WarmOnly:
    """An executor whose every ``execute`` runs in a warm container, or fails the test."""

    def __init__(self, executor: DockerExecutor) -> None:
        self._executor = executor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._executor, name)

    def execute(self, task: Task, **options: Any) -> Result:
        ready = self._executor.warm(task, wait=60)
        pool = self._executor._pool
        assert ready >= 1, f"no warm container came up: {pool and pool.last_error!r}"
        try:
            result = self._executor.execute(task, **options)
        except SandboxError as exc:
            if exc.result is not None:
                assert exc.result.runtime is not None and exc.result.runtime.warm, "ran cold"
            raise
        assert result.runtime is not None and result.runtime.warm, "ran cold"
        return result
