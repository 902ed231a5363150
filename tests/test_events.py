"""Security events in results: each kind produced by a real task, in the runtime that sees it."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import TEST_IMAGE, WasmFixtures
from parity_sandbox import (
    Config,
    DockerExecutor,
    EventKind,
    Limits,
    Result,
    SecurityEvent,
    Status,
    Task,
    TaskError,
    WasmExecutor,
)
from parity_sandbox.runtimes.docker import host as docker_host

MiB = 1 << 20


def outcome(executor: WasmExecutor | DockerExecutor, task: Task) -> Result:
    """The result, also of a task that ``execute`` reports by raising."""
    try:
        return executor.execute(task)
    except TaskError as error:
        assert error.result is not None
        return error.result


def kinds(result: Result) -> list[EventKind]:
    return [event.kind for event in result.events]


def event(result: Result, kind: EventKind) -> SecurityEvent:
    found = [e for e in result.events if e.kind is kind]
    assert len(found) == 1, result.events
    return found[0]


# -- WebAssembly -----------------------------------------------------------------------------


def test_a_plain_run_has_no_events(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    assert executor.execute(Task(wasm_file=wasm.hello)).events == ()


def test_a_timeout(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    before = datetime.now(UTC)
    result = outcome(executor, Task(wasm_file=wasm.loop, limits=Limits(timeout=0.5)))
    assert result.status is Status.TIMEOUT
    assert kinds(result) == [EventKind.TIMEOUT]
    found = event(result, EventKind.TIMEOUT)
    assert found.details == {"timeout": 0.5}
    assert before <= found.time <= datetime.now(UTC) + timedelta(seconds=1)
    assert found.time.utcoffset() == timedelta(0)


def test_a_memory_limit(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = outcome(executor, Task(wasm_file=wasm.membomb, limits=Limits(memory="32m")))
    assert result.limit == "memory"
    assert kinds(result) == [EventKind.LIMIT_HIT]
    assert event(result, EventKind.LIMIT_HIT).details == {"limit": "memory"}


def test_a_guest_trap(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = outcome(executor, Task(wasm_file=wasm.trap))
    assert result.status is Status.ERROR
    assert kinds(result) == [EventKind.GUEST_TRAP]
    message = event(result, EventKind.GUEST_TRAP).details["message"]
    assert isinstance(message, str) and "unreachable" in message


def test_truncated_output(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = executor.execute(
        Task(wasm_file=wasm.flood, args=("5000", "stderr"), limits=Limits(output=1000))
    )
    assert result.stderr_truncated
    assert event(result, EventKind.OUTPUT_TRUNCATED).details == {"what": ("stderr",)}


def test_a_file_at_the_disk_cap(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = outcome(
        executor, Task(wasm_file=wasm.big_file, args=(str(8 * MiB),), limits=Limits(disk="4m"))
    )
    assert result.limit == "disk"
    assert kinds(result) == [EventKind.LIMIT_HIT, EventKind.DISK_CAP]
    assert event(result, EventKind.DISK_CAP).details == {"limit": "disk"}


def test_output_symlinks_are_reported_not_followed(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    result = executor.execute(Task(wasm_file=wasm.write_outputs))
    assert result.ok
    assert set(result.files) == {"out/result.txt", "out/sub/nested.txt"}
    # wasmtime refuses the absolute link (out/evil); the two relative ones exist.
    details = event(result, EventKind.OUTPUT_NOT_FOLLOWED).details
    assert details["count"] == 2
    paths = details["paths"]
    assert isinstance(paths, tuple) and sorted(paths) == ["out/evil_dir", "out/up"]
    assert details["kinds"] == ("symlink",) * 2


def test_a_module_rejected_by_the_worker(executor: WasmExecutor) -> None:
    (result,) = executor.map([Task(wasm_module=b"\0asm\1\0\0\0 not a module")])
    assert result.error is not None and result.error.type == "InvalidInput"
    assert event(result, EventKind.INPUT_REJECTED).details == {"field": "wasm_module"}


def test_a_task_rejected_before_it_ran(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    (result,) = executor.map([Task(wasm_file=wasm.hello, limits=Limits(memory="8g"))])
    assert result.status is Status.ERROR
    assert event(result, EventKind.INPUT_REJECTED).details == {"field": "memory"}


def test_a_worker_killed_under_its_task(wasm: WasmFixtures, cache_dir: Any) -> None:
    config = Config(cache_dir=cache_dir, timeout="20s", cache={"enabled": False})
    with WasmExecutor(config, workers=1) as executor:
        future = executor.submit(Task(wasm_file=wasm.sleep, args=("20",)))
        deadline = time.monotonic() + 10
        # The worker that runs it: the pool's only one, once the task has started there.
        while time.monotonic() < deadline:
            workers = list(executor._pool._all)
            if workers and workers[0].read_start()[0] != 0:
                break
            time.sleep(0.05)
        assert len(workers) == 1
        workers[0].proc.send_signal(signal.SIGKILL)
        with pytest.raises(TaskError) as raised:
            future.result(timeout=15)
    result = raised.value.result
    assert result is not None and result.status is Status.ERROR
    assert kinds(result) == [EventKind.WORKER_LOST]


def test_events_do_not_change_the_result_hash_and_survive_json(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    task = Task(wasm_file=wasm.flood, args=("5000",), limits=Limits(output=100), deterministic=True)
    first, second = executor.execute(task), executor.execute(task)
    assert first.events and second.events
    assert first.events[0].time != second.events[0].time or first is not second
    assert first.result_hash == second.result_hash
    assert first.result_hash == first.model_copy(update={"events": ()}).result_hash
    again = Result.from_json(first.to_json())
    assert again == first
    assert again.to_json_dict()["events"][0]["kind"] == "output_truncated"
    # A result written before events existed still loads, with none.
    old = json.loads(first.to_json())
    del old["events"]
    assert Result.from_json(json.dumps(old)).events == ()


def test_event_times_must_carry_a_zone() -> None:
    with pytest.raises(ValueError, match="time zone"):
        SecurityEvent(kind=EventKind.TIMEOUT, time=datetime(2026, 1, 1))


# -- Docker ----------------------------------------------------------------------------------


@pytest.mark.docker
def test_docker_fork_bomb_exhausts_its_pids(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    task = Task(
        image=TEST_IMAGE,
        command=("probe", "forkbomb"),
        oci_runtime=oci_runtime,
        limits={"pids": 64},
    )
    result = outcome(docker_executor, task)
    if oci_runtime == "runsc":
        # gVisor enforces the limit in its own kernel: the host's cgroup never counts a
        # refused fork, so runsc cannot see this event (as the docs say).
        assert EventKind.PIDS_EXHAUSTED not in kinds(result)
        assert b"EAGAIN" in result.stdout
        return
    assert EventKind.PIDS_EXHAUSTED in kinds(result), (result.status, result.events)
    assert event(result, EventKind.PIDS_EXHAUSTED).details == {"limit": 64}


@pytest.mark.docker
def test_docker_oom_kill(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    task = Task(
        image=TEST_IMAGE,
        command=("probe", "memory"),
        oci_runtime=oci_runtime,
        limits={"memory": "64m"},
    )
    result = outcome(docker_executor, task)
    assert result.limit == "memory"
    assert kinds(result) == [EventKind.LIMIT_HIT, EventKind.OOM_KILL]
    assert event(result, EventKind.OOM_KILL).details == {"limit": 64 * MiB}


@pytest.mark.docker
def test_docker_timeout_and_truncation(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    script = "head -c 5000 /dev/zero; sleep 60"
    task = Task(
        image=TEST_IMAGE,
        command=("sh", "-c", script),
        oci_runtime=oci_runtime,
        limits={"timeout": 2, "output": 1000},
    )
    result = outcome(docker_executor, task)
    assert result.status is Status.TIMEOUT
    assert kinds(result) == [EventKind.TIMEOUT, EventKind.OUTPUT_TRUNCATED]
    assert event(result, EventKind.OUTPUT_TRUNCATED).details == {"what": ("stdout",)}


@pytest.mark.docker
def test_docker_file_size_cap(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    task = Task(
        image=TEST_IMAGE,
        command=("dd", "if=/dev/zero", "of=/work/big", "bs=1M", "count=4"),
        oci_runtime=oci_runtime,
        limits={"file_size": "1m"},
    )
    result = outcome(docker_executor, task)
    assert result.limit == "file_size"
    assert kinds(result) == [EventKind.LIMIT_HIT, EventKind.DISK_CAP]


@pytest.mark.docker
def test_docker_output_links_and_fifos_are_reported(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    script = (
        "mkdir -p /work/out && ln -s /etc/passwd /work/out/passwd && ln -s / /work/out/root "
        "&& mkfifo /work/out/fifo && echo mine > /work/out/mine"
    )
    task = Task(image=TEST_IMAGE, command=("sh", "-c", script), oci_runtime=oci_runtime)
    result = docker_executor.execute(task)
    assert result.files == {"out/mine": b"mine\n"}
    details = event(result, EventKind.OUTPUT_NOT_FOLLOWED).details
    paths, named_kinds = details["paths"], details["kinds"]
    assert isinstance(paths, tuple) and isinstance(named_kinds, tuple)
    found = dict(zip(paths, named_kinds, strict=True))
    expected = {"out/passwd": "symlink", "out/root": "symlink", "out/fifo": "fifo"}
    if oci_runtime == "runsc":
        del expected["out/fifo"]  # a FIFO in gVisor's tmpfs is not in Docker's archive at all
    assert found == expected
    assert details["count"] == len(expected)


@pytest.mark.docker
def test_docker_container_killed_from_outside(docker_executor: DockerExecutor) -> None:
    # runc only: under runsc a sandbox SIGKILLed from outside looks like an OOM kill (its
    # cgroup is gone before it is read), and is reported as one.
    oci_runtime = "runc"
    task_id = f"lost-{uuid.uuid4().hex[:8]}"
    task = Task(
        image=TEST_IMAGE,
        command=("sleep", "30"),
        oci_runtime=oci_runtime,
        id=task_id,
        limits={"timeout": 25},
    )
    done: list[Result] = []
    runner = threading.Thread(target=lambda: done.append(outcome(docker_executor, task)))
    runner.start()
    api = docker_executor._api
    deadline = time.monotonic() + 20
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not found:
        found = api.containers(filters={"label": f"{docker_host.TASK_ID}={task_id}"})
        time.sleep(0.2)
    assert found, "the task's container never ran"
    time.sleep(1.0)  # let the task start
    api.kill(found[0]["Id"])
    runner.join(30)
    assert done, "the task did not end"
    (result,) = done
    assert result.status is Status.ERROR, result
    assert kinds(result) == [EventKind.WORKER_LOST]
