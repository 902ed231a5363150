"""Metrics (``parity_sandbox.metrics``): what the executors count matches what happened, over
real runs (a mixed batch of 200 WASM tasks with known outcomes, Docker tasks under runc), the
hooks (cache, pool, reaps) count, several processes add up in multiprocess mode, and without
metrics nothing imports ``prometheus_client``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import TEST_IMAGE, WasmFixtures
from parity_sandbox import (
    Config,
    DockerExecutor,
    Limits,
    Network,
    RuntimeUnavailable,
    Status,
    Task,
    WasmExecutor,
)
from service_server import CLI, free_port

pytest.importorskip("prometheus_client")

from parity_sandbox.metrics import Metrics

WASM = {"runtime": "wasm", "oci_runtime": "none"}


def tasks(m: Metrics, status: str, **labels: str) -> float:
    return m.value("parity_sandbox_tasks_total", **(labels or WASM), status=status)


def events(m: Metrics, kind: str, runtime: str = "wasm") -> float:
    return m.value("parity_sandbox_security_events_total", runtime=runtime, kind=kind)


def test_a_mixed_batch_of_200_tasks_is_counted_as_it_ran(
    wasm: WasmFixtures, tmp_path: Path
) -> None:
    metrics = Metrics()
    config = Config(cache_dir=tmp_path / "modules", timeout="10s", cache={"path": tmp_path / "c"})
    batch = (
        [Task(wasm_file=wasm.hello) for _ in range(78)]
        + [Task(wasm_file=wasm.exit_code, args=("5",)) for _ in range(40)]
        + [Task(wasm_file=wasm.trap) for _ in range(20)]
        + [Task(wasm_file=wasm.membomb, limits=Limits(memory="32m")) for _ in range(20)]
        + [
            Task(wasm_file=wasm.flood, args=("5000",), limits=Limits(output=1000))
            for _ in range(20)
        ]
        + [Task(wasm_file=wasm.loop, limits=Limits(timeout=0.3)) for _ in range(10)]
        # refused while prepared (a WebAssembly task has no sockets): no run, an event
        + [Task(wasm_file=wasm.hello, network=Network(allow=("example.org:443",)))] * 2
    )
    with WasmExecutor(config, metrics=metrics, workers=2) as executor:
        results = list(executor.map(batch))
        # the same deterministic task ten times: one run, then nine answers from the cache
        again = [
            executor.execute(Task(wasm_file=wasm.hello, args=("det",), deterministic=True))
            for _ in range(10)
        ]
    statuses = [result.status for result in results]
    assert statuses.count(Status.SUCCEEDED) == 98
    assert statuses.count(Status.FAILED) == 40
    assert statuses.count(Status.ERROR) == 22  # 20 traps, 2 refused
    assert statuses.count(Status.RESOURCE_LIMIT) == 20
    assert statuses.count(Status.TIMEOUT) == 10
    assert [result.cached for result in again] == [False] + [True] * 9

    assert tasks(metrics, "succeeded") == 98 + 10
    assert tasks(metrics, "failed") == 40
    assert tasks(metrics, "error") == 20  # the refused ones never ran: events only
    assert tasks(metrics, "resource_limit") == 20
    assert tasks(metrics, "timeout") == 10
    runs = 188 + 1
    assert metrics.value("parity_sandbox_task_duration_seconds_count", **WASM) == runs
    assert metrics.value("parity_sandbox_queue_wait_seconds_count", runtime="wasm") == runs
    took = sum(result.duration for result in [*results, again[0]])
    assert metrics.value("parity_sandbox_task_duration_seconds_sum", **WASM) == pytest.approx(took)
    assert metrics.value("parity_sandbox_limit_hits_total", runtime="wasm", limit="memory") == 20
    assert events(metrics, "limit_hit") == 20
    assert events(metrics, "guest_trap") == 20
    assert events(metrics, "output_truncated") == 20
    assert events(metrics, "timeout") == 10
    assert events(metrics, "input_rejected") == 2
    assert events(metrics, "oom_kill") == 0
    assert metrics.value("parity_sandbox_cache_misses_total", runtime="wasm") == 1
    assert metrics.value("parity_sandbox_cache_hits_total", runtime="wasm") == 9
    # a worker killed at its task's deadline is replaced; nothing else killed one
    assert metrics.value("parity_sandbox_worker_restarts_total", runtime="wasm") == 10
    assert metrics.value("parity_sandbox_runtime_errors_total", runtime="wasm") == 0
    text, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    failed = b'parity_sandbox_tasks_total{oci_runtime="none",runtime="wasm",status="failed"}'
    assert failed + b" 40.0" in text


def test_queue_wait_counts_from_acceptance(wasm: WasmFixtures, tmp_path: Path) -> None:
    metrics = Metrics()
    with WasmExecutor(Config(cache_dir=tmp_path), metrics=metrics, workers=1) as executor:
        accepted = time.time() - 5.0  # the service accepted it five seconds ago
        executor.execute(executor.prepare(Task(wasm_file=wasm.hello), accepted_at=accepted))
    waited = metrics.value("parity_sandbox_queue_wait_seconds_sum", runtime="wasm")
    assert 5.0 <= waited < 10.0
    assert metrics.value("parity_sandbox_queue_wait_seconds_bucket", runtime="wasm", le="2.5") == 0


def test_a_damaged_cache_entry_is_counted(wasm: WasmFixtures, tmp_path: Path) -> None:
    metrics = Metrics()
    cache = tmp_path / "results.sqlite3"
    config = Config(cache_dir=tmp_path, cache={"path": cache})
    task = Task(wasm_file=wasm.hello, deterministic=True)
    with WasmExecutor(config, metrics=metrics, workers=1) as executor:
        executor.execute(task)
    with sqlite3.connect(cache) as db:
        assert db.execute("UPDATE results SET data = ?", (b'{"v": 1}',)).rowcount == 1
    with (
        WasmExecutor(config, metrics=metrics, workers=1) as executor,
        pytest.warns(RuntimeWarning, match="result cache"),
    ):
        assert not executor.execute(task).cached
    assert metrics.value("parity_sandbox_cache_damaged_total", what="entry") == 1
    assert metrics.value("parity_sandbox_cache_misses_total", runtime="wasm") == 2


def test_a_leftover_root_reaped_is_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    stale = Path(tempfile.gettempdir()) / f"parity-sandbox-wasm-999999999-{os.getpid()}"
    stale.mkdir()
    (stale / ".lock").touch()  # nobody holds its lock: its executor died
    with WasmExecutor(Config(cache_dir=tmp_path), metrics=metrics, workers=1):
        pass
    assert not stale.exists()
    assert metrics.value("parity_sandbox_leftovers_reaped_total", runtime="wasm") >= 1


def _docker(metrics: Metrics, **docker: object) -> DockerExecutor:
    try:
        return DockerExecutor(Config(timeout="20s", docker=docker), metrics=metrics)
    except RuntimeUnavailable as exc:
        if os.environ.get("PARITY_TEST_DOCKER") == "required":
            pytest.fail(f"the Docker engine is required here: {exc}")
        pytest.skip(f"no Docker engine: {exc}")


@pytest.mark.docker
def test_docker_tasks_are_counted_with_their_oci_runtime() -> None:
    metrics = Metrics()
    runc = {"runtime": "docker", "oci_runtime": "runc"}
    batch = [
        Task(image=TEST_IMAGE, command=("sh", "-c", "exit 0")),
        Task(image=TEST_IMAGE, command=("sh", "-c", "exit 3")),
        Task(image=TEST_IMAGE, command=("probe", "memory"), limits={"memory": "64m"}),
        Task(image=TEST_IMAGE, command=("sleep", "30"), limits={"timeout": "1s"}),
    ]
    with _docker(metrics) as executor:
        results = list(executor.map(batch))
    assert [result.status for result in results] == [
        Status.SUCCEEDED,
        Status.FAILED,
        Status.RESOURCE_LIMIT,
        Status.TIMEOUT,
    ]
    for status in ("succeeded", "failed", "resource_limit", "timeout"):
        assert tasks(metrics, status, **runc) == 1, status
    assert metrics.value("parity_sandbox_task_duration_seconds_count", **runc) == 4
    assert metrics.value("parity_sandbox_limit_hits_total", runtime="docker", limit="memory") == 1
    assert events(metrics, "oom_kill", "docker") == 1
    assert events(metrics, "timeout", "docker") == 1
    assert metrics.value("parity_sandbox_runtime_errors_total", runtime="docker") == 0


@pytest.mark.docker
def test_the_warm_pool_counts_hits_misses_and_its_size() -> None:
    metrics = Metrics()
    task = Task(image=TEST_IMAGE, command=("true",))
    pool = {"enabled": True, "min": 1, "max": 2, "max_total": 2}
    with _docker(metrics, pool=pool) as executor:
        executor.execute(task)  # no profile yet: a miss, and the profile gets warm containers
        assert executor.warm(task, wait=30.0) >= 1
        text = metrics.exposition()[0].decode()
        assert 'parity_sandbox_warm_pool_size{runtime="docker"}' in text
        assert metrics.value("parity_sandbox_warm_pool_size", runtime="docker") >= 1
        executor.execute(task)
    assert metrics.value("parity_sandbox_warm_pool_misses_total", runtime="docker") == 1
    assert metrics.value("parity_sandbox_warm_pool_hits_total", runtime="docker") == 1


def test_several_processes_add_up_in_multiprocess_mode(wasm: WasmFixtures, tmp_path: Path) -> None:
    """Two batch runs write to one PROMETHEUS_MULTIPROC_DIR; ``metrics serve`` adds them up."""
    shared = tmp_path / "prom"
    shared.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    env |= {
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        "PARITY_SANDBOX_METRICS_ENABLED": "true",
        "PARITY_SANDBOX_CACHE_ENABLED": "false",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    lines = "".join(f'{{"wasm_file": "{wasm.exit_code}", "args": ["{n}"]}}\n' for n in (0, 4, 0))
    (tmp_path / "batch.jsonl").write_text(lines)
    for _ in range(2):
        done = subprocess.run(
            [*CLI, "run-batch", str(tmp_path / "batch.jsonl")],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert b"Traceback" not in done.stderr, done.stderr
    port = free_port()
    server = subprocess.Popen(
        [*CLI, "metrics", "serve", "--dir", str(shared), "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=2).status_code == 404
    finally:
        server.terminate()
        server.wait(10)
        assert server.stderr is not None
        server.stderr.close()
    succeeded = 'parity_sandbox_tasks_total{oci_runtime="none",runtime="wasm",status="succeeded"}'
    failed = 'parity_sandbox_tasks_total{oci_runtime="none",runtime="wasm",status="failed"}'
    assert f"{succeeded} 4.0" in text, text
    assert f"{failed} 2.0" in text, text


def test_without_metrics_prometheus_client_is_never_imported(wasm: WasmFixtures) -> None:
    code = (
        "import sys, parity_sandbox\n"
        "from parity_sandbox import Task, WasmExecutor\n"
        "assert 'prometheus_client' not in sys.modules\n"
        f"with WasmExecutor(workers=1) as e: r = e.execute(Task(wasm_file={str(wasm.hello)!r}))\n"
        "assert e.metrics is None and r.ok\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=60, check=True
    )
    assert done.stdout.strip() == b"False", done.stderr


def test_config_turns_on_the_process_metrics(wasm: WasmFixtures, tmp_path: Path) -> None:
    config = Config(cache_dir=tmp_path, metrics={"enabled": True})
    with WasmExecutor(config, workers=1) as one, WasmExecutor(config, workers=1) as two:
        assert one.metrics is two.metrics is Metrics.default()
        before = tasks(Metrics.default(), "succeeded")
        one.execute(Task(wasm_file=wasm.hello))
        two.execute(Task(wasm_file=wasm.hello))
    assert tasks(Metrics.default(), "succeeded") == before + 2
