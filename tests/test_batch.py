"""Batches: admission by memory, results in order, and ``parity-sandbox run-batch``."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import TEST_IMAGE, WasmFixtures, containers_of
from parity_sandbox import Config, DockerExecutor, Result, Status, Task, WasmExecutor
from parity_sandbox._batch import read_tasks
from parity_sandbox._executor import Executor, PreparedTask, available_memory
from test_cli import CLI, run_cli

MiB = 1 << 20


class Counting(Executor):
    """Counts the tasks in flight. Batch admission is host-side scheduling: what it admits
    does not depend on the runtime, so this stands in for one (no sandboxing claim here)."""

    runtime_name = "docker"

    def __init__(self) -> None:
        super().__init__(Config(cache={"enabled": False}))
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        task = prepared.task
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.02)
        with self._lock:
            self.running -= 1
        return Result(status=Status.SUCCEEDED, exit_code=0, task_id=task.id)


def tasks(count: int, memory: str) -> list[Task]:
    return [
        Task(image=TEST_IMAGE, command=["true"], id=str(i), limits={"memory": memory})
        for i in range(count)
    ]


def test_admission_keeps_the_sum_of_memory_limits_within_the_budget() -> None:
    with Counting() as executor:
        results = list(executor.map(tasks(24, "256m"), max_parallel=8, memory_budget=600 * MiB))
        assert executor.peak == 2  # 3 x 256 MiB would not fit in 600 MiB
        assert [r.task_id for r in results] == [str(i) for i in range(24)]
        executor.peak = 0
        list(executor.map(tasks(24, "64m"), max_parallel=8, memory_budget=600 * MiB))
        assert executor.peak == 8  # now the cores (max_parallel) are the bound


def test_a_task_larger_than_the_budget_runs_alone() -> None:
    with Counting() as executor:
        mixed = [*tasks(3, "64m"), *tasks(1, "2g"), *tasks(3, "64m")]
        results = executor.execute_many(mixed, max_parallel=4, memory_budget=1024 * MiB)
        assert len(results) == 7 and all(r.ok for r in results)
    assert available_memory() > 0


def line(**task: object) -> bytes:
    return json.dumps(task).encode()


def test_task_lines_are_data_never_host_paths() -> None:
    stdin = base64.b64encode(b"in\n").decode()
    parsed = list(
        read_tasks(
            [
                line(image=TEST_IMAGE, command=["cat"], stdin=stdin),
                b"   \n",
                b"not json\n",
                b"[1]\n",
                line(image=TEST_IMAGE, input_files={"x": "/etc/passwd"}),
                line(image=TEST_IMAGE, input_files={"../x": ""}),
            ]
        )
    )
    assert len(parsed) == 5  # the blank line is skipped
    first = parsed[0]
    assert isinstance(first, Task) and first.input == b"in\n"
    messages = [str(item) for item in parsed[1:]]
    assert "line 3" in messages[0] and "JSON" in messages[0]
    assert "line 4" in messages[1]
    assert "line 5" in messages[2]  # a path is not base64 content: refused, never read
    assert "line 6" in messages[3] and ".." in messages[3]


def test_run_batch_cli(wasm: WasmFixtures, cache_dir: Path, tmp_path: Path) -> None:
    lines = [
        line(wasm_file=str(wasm.hello)),
        b"{broken",
        line(wasm_file=str(wasm.exit_code), args=["3"]),
        line(wasm_file=str(wasm.hello), id="last"),
    ]
    source = tmp_path / "tasks.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "results.jsonl"
    done = run_cli("run-batch", str(source), "-o", str(out), cache=cache_dir)
    assert done.returncode == 1, done.stderr  # not every task succeeded
    assert b"4/4" in done.stderr and b"Traceback" not in done.stderr
    results = [Result.from_json(text) for text in out.read_text().splitlines()]
    assert [r.status for r in results] == [
        Status.SUCCEEDED,
        Status.ERROR,
        Status.FAILED,
        Status.SUCCEEDED,
    ]
    assert results[0].stdout == b"hello\n" and results[3].task_id == "last"
    assert results[2].exit_code == 3
    assert results[1].error is not None and "line 2" in results[1].error.message
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(lines[0] + b"\n")
    assert run_cli("run-batch", str(ok), cache=cache_dir).returncode == 0
    missing = run_cli("run-batch", str(tmp_path / "nope.jsonl"), cache=cache_dir)
    assert missing.returncode == 65 and b"cannot read" in missing.stderr


@pytest.mark.docker
def test_run_batch_cli_with_a_warm_pool(tmp_path: Path, cache_dir: Path) -> None:
    source = tmp_path / "tasks.jsonl"
    source.write_bytes(
        b"".join(line(image=TEST_IMAGE, command=["echo", str(i)]) + b"\n" for i in range(12))
    )
    done = run_cli("run-batch", str(source), "--warm-pool", "--parallel", "2", cache=cache_dir)
    assert done.returncode == 0, done.stderr
    results = [Result.from_json(text) for text in done.stdout.decode().splitlines()]
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(12)]
    assert any(r.runtime is not None and r.runtime.warm for r in results)


@pytest.mark.docker
def test_ctrl_c_in_run_batch_stops_the_tasks_and_leaves_nothing(
    tmp_path: Path, docker_executor: DockerExecutor
) -> None:
    source = tmp_path / "tasks.jsonl"
    source.write_bytes(
        b"".join(
            line(image=TEST_IMAGE, command=["sleep", "600"], limits={"timeout": "700s"}) + b"\n"
            for _ in range(3)
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    child = subprocess.Popen(
        [*CLI, "run-batch", str(source), "--warm-pool"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        running: list[str] = []
        while len(running) < 3 and time.monotonic() < deadline:
            running = containers_of(docker_executor, child.pid)
            time.sleep(0.1)
        assert len(running) >= 3  # the tasks run (and the pool may be warming more)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    assert child.returncode == 130, stderr
    assert b"interrupted" in stderr and b"Traceback" not in stderr
    assert containers_of(docker_executor, child.pid) == []


def stamps(result: Result) -> tuple[int, int]:
    fields = dict(line.split("=") for line in result.stdout_text.split())
    return int(fields["start"]), int(fields["end"])


def overlapping(results: list[Result]) -> int:
    spans = sorted(stamps(result) for result in results)
    return sum(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


def test_wasm_admission_counts_each_tasks_own_memory_limit(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    config = Config(cache_dir=cache_dir, cache={"enabled": False}, memory_limit="16m")
    with WasmExecutor(config, workers=2) as executor:
        big = [Task(wasm_file=wasm.stamp_sleep, args=("300",), limits={"memory": "96m"})] * 4
        # 2 x 96 MiB do not fit in 150 MiB, whatever the configured default (16 MiB) says
        serial = executor.execute_many(big, max_parallel=2, memory_budget=150 * MiB)
        assert all(r.ok for r in serial)
        assert overlapping(serial) == 0
        small = [Task(wasm_file=wasm.stamp_sleep, args=("600",), limits={"memory": "32m"})] * 4
        parallel = executor.execute_many(small, max_parallel=2, memory_budget=150 * MiB)
        assert overlapping(parallel) >= 1
