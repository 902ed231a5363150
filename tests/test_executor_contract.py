"""The executor contract every runtime shares, exercised on the WASM runtime."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from conftest import WasmFixtures
from parity_sandbox import (
    Config,
    ExecutionTimeout,
    Executor,
    InvalidInput,
    Limits,
    Result,
    RuntimeUnavailable,
    Status,
    Task,
    WasmExecutor,
)
from parity_sandbox._executor import PreparedTask


def test_map_yields_results_in_order_and_never_raises(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    tasks = [Task(wasm_file=wasm.exit_code, args=(str(i),)) for i in range(20)]
    tasks.insert(5, Task(wasm_file=wasm.loop, limits=Limits(timeout=0.2)))
    tasks.insert(9, Task(wasm_file=wasm.hello.parent / "absent.wasm"))
    results = list(executor.map(tasks, max_parallel=2))
    assert len(results) == 22
    assert results[5].status is Status.TIMEOUT
    assert results[9].status is Status.ERROR
    assert results[9].error is not None and results[9].error.type == "InvalidInput"
    codes = [r.exit_code for i, r in enumerate(results) if i not in (5, 9)]
    assert codes == list(range(20))


def test_execute_is_thread_safe(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    failures: list[str] = []

    def worker(n: int) -> None:
        for i in range(10):
            stdin = f"{n}-{i}".encode()
            result = executor.execute(Task(wasm_file=wasm.echo_stdin, stdin=stdin))
            if result.stdout != stdin:
                failures.append(f"{stdin!r} -> {result.stdout!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def module_task(path: Path, form: str, **fields: Any) -> Task:
    """A task with the module at ``path``, named by its path (``WasmExecutor.execute_async``
    runs it in a thread) or given as bytes (on the event loop)."""
    if form == "file":
        return Task(wasm_file=path, **fields)
    return Task(wasm_module=path.read_bytes(), **fields)


FORMS = pytest.mark.parametrize("form", ["file", "bytes"])


@FORMS
def test_execute_async(executor: WasmExecutor, wasm: WasmFixtures, form: str) -> None:
    count = 4 * executor.max_parallel()  # more than its workers: some wait for one

    async def main() -> list[bytes]:
        tasks = [module_task(wasm.echo_stdin, form, stdin=str(i).encode()) for i in range(count)]
        results = await asyncio.gather(*(executor.execute_async(t) for t in tasks))
        return [r.stdout for r in results]

    assert asyncio.run(main()) == [str(i).encode() for i in range(count)]


@FORMS
def test_an_async_task_times_out_with_its_output(
    executor: WasmExecutor, wasm: WasmFixtures, form: str
) -> None:
    task = module_task(wasm.print_then_loop, form, limits=Limits(timeout=0.5))
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout) as caught:
        asyncio.run(executor.execute_async(task))
    assert time.monotonic() - started < 5
    result = caught.value.result
    assert result is not None and result.status is Status.TIMEOUT and result.stdout, result
    assert executor.execute(Task(wasm_file=wasm.hello)).ok


@FORMS
def test_cancelling_an_async_task_stops_it(
    executor: WasmExecutor, wasm: WasmFixtures, form: str
) -> None:
    reported: list[dict[str, object]] = []

    async def main() -> float:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: reported.append(c))
        job = asyncio.ensure_future(
            executor.execute_async(module_task(wasm.sleep, form, limits=Limits(timeout=60)))
        )
        await asyncio.sleep(0.5)
        started = time.monotonic()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        took = time.monotonic() - started
        await asyncio.sleep(0.5)  # the stopped run ends meanwhile
        gc.collect()
        return took

    assert asyncio.run(main()) < 1.0
    # nothing left for asyncio to complain about ("exception was never retrieved")
    assert reported == []
    # The worker that ran it was killed; a new task still runs.
    assert executor.execute(Task(wasm_file=wasm.hello)).ok


def test_closing_ends_async_tasks_that_wait_for_a_worker(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    executor = WasmExecutor(Config(cache_dir=cache_dir), workers=1)
    sleeper = Task(wasm_module=wasm.sleep.read_bytes(), limits=Limits(timeout=60))

    async def main() -> list[BaseException | Result]:
        jobs = [asyncio.ensure_future(executor.execute_async(sleeper)) for _ in range(3)]
        await asyncio.sleep(0.5)  # one runs, two wait for the worker
        await asyncio.to_thread(executor.close)
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 10)

    ends = asyncio.run(main())
    assert len(ends) == 3 and all(isinstance(end, RuntimeUnavailable) for end in ends), ends


def test_close_is_idempotent_and_final(wasm: WasmFixtures, cache_dir: Path) -> None:
    executor = WasmExecutor(Config(cache_dir=cache_dir), workers=1)
    with executor:
        assert executor.execute(Task(wasm_file=wasm.hello)).ok
    assert executor.closed
    executor.close()
    with pytest.raises(RuntimeUnavailable, match="closed"):
        executor.execute(Task(wasm_file=wasm.hello))


def test_close_stops_a_running_task(wasm: WasmFixtures, cache_dir: Path) -> None:
    executor = WasmExecutor(Config(cache_dir=cache_dir), workers=1)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            executor.execute(Task(wasm_file=wasm.sleep, limits=Limits(timeout=60)))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    executor.close()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert isinstance(outcome.get("error"), RuntimeUnavailable)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_timeouts_hold_while_a_map_consumer_pauses(wasm: WasmFixtures, cache_dir: Path) -> None:
    from test_wasm_cleanup import worker_pids

    with WasmExecutor(Config(cache_dir=cache_dir), workers=2) as executor:
        tasks = [
            Task(wasm_file=wasm.hello),
            Task(wasm_file=wasm.print_then_loop, limits=Limits(timeout=0.5)),
        ]
        results = executor.map(tasks, max_parallel=2)
        assert next(results).ok
        time.sleep(2.5)  # the consumer looks away; the loop must still be stopped at 0.5 s
        busy = {pid: _cpu_seconds(pid) for pid in worker_pids(str(executor._root))}
        assert all(seconds < 1.5 for seconds in busy.values()), busy
        late = next(results)
        assert late.status is Status.TIMEOUT and late.stdout == b"started\n"


def test_the_caller_can_fork_after_running_tasks(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    # wasmtime runs only in workers: a fork() in the caller's process must not hang (a fork
    # after a WASI run in-process hangs the child).
    assert executor.execute(Task(wasm_file=wasm.hello)).ok
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 7
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    pytest.fail("the forked child hung")


class _Echo(Executor):
    """A runtime-less executor: tests the contract's own logic (map, async, close)."""

    runtime_name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    def max_parallel(self) -> int:
        return 3

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        task = prepared.task
        if task.id == "bad":
            raise InvalidInput("bad task", field="id")
        if task.id == "slow":
            assert cancel is not None
            if cancel.wait(5):
                self.cancelled += 1
                raise ExecutionTimeout("stopped")
        return Result(status=Status.SUCCEEDED, exit_code=0, stdout=task.input, task_id=task.id)


def test_the_generic_map_keeps_order_and_turns_errors_into_results() -> None:
    tasks = [Task(wasm_module=b"\0asm", stdin=bytes([i]), id=f"t{i}") for i in range(10)]
    tasks[4] = Task(wasm_module=b"\0asm", id="bad")
    with _Echo() as executor:
        results = list(executor.map(tasks))
    assert [r.task_id for r in results[:4]] == ["t0", "t1", "t2", "t3"]
    assert results[4].status is Status.ERROR and results[4].error is not None
    assert results[4].error.type == "InvalidInput"
    assert [r.stdout for r in results[5:]] == [bytes([i]) for i in range(5, 10)]


def test_closing_the_generic_map_early_cancels_what_runs() -> None:
    executor = _Echo()
    tasks = [Task(wasm_module=b"\0asm", id="t0")] + [
        Task(wasm_module=b"\0asm", id="slow") for _ in range(3)
    ]
    results = executor.map(tasks)
    assert next(results).task_id == "t0"
    started = time.monotonic()
    results.close()
    assert time.monotonic() - started < 2
    assert executor.cancelled >= 1
    executor.close()


def test_submit_returns_a_future_of_the_result(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    futures = [executor.submit(Task(wasm_file=wasm.exit_code, args=(str(i),))) for i in range(6)]
    assert all(isinstance(future, Future) for future in futures)
    assert [future.result(timeout=30).exit_code for future in futures] == list(range(6))
    late = executor.submit(Task(wasm_file=wasm.loop, limits=Limits(timeout=0.2)))
    with pytest.raises(ExecutionTimeout):
        late.result(timeout=30)  # raises as execute does


def test_close_cancels_waiting_submissions_and_stops_running_ones(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    executor = WasmExecutor(Config(cache_dir=cache_dir), workers=1)
    sleepers = [executor.submit(Task(wasm_file=wasm.sleep, args=("60",))) for _ in range(3)]
    time.sleep(1.0)
    started = time.monotonic()
    executor.close()
    assert time.monotonic() - started < 10
    assert all(future.done() for future in sleepers)
    outcomes = []
    for future in sleepers:
        if future.cancelled():
            outcomes.append("cancelled")
        else:
            with pytest.raises(RuntimeUnavailable, match="closed"):
                future.result()
            outcomes.append("stopped")
    assert "stopped" in outcomes and "cancelled" in outcomes
    with pytest.raises(RuntimeUnavailable):
        executor.submit(Task(wasm_file=wasm.hello))


def test_a_closed_executor_refuses_at_the_call(wasm: WasmFixtures, cache_dir: Path) -> None:
    """Not at the first result: a generator that checks late lets a caller believe a batch
    was accepted."""
    executor = WasmExecutor(Config(cache_dir=cache_dir), workers=1)
    executor.close()
    task = Task(wasm_file=wasm.hello)
    with pytest.raises(RuntimeUnavailable):
        executor.map([task])
    with pytest.raises(RuntimeUnavailable):
        executor.execute_many([task])
    with pytest.raises(RuntimeUnavailable):
        asyncio.run(executor.execute_async(task))
    with _Echo() as generic:
        pass
    with pytest.raises(RuntimeUnavailable):
        generic.map([task])


def test_use_cache_is_taken_everywhere(wasm: WasmFixtures, cache_dir: Path, tmp_path: Path) -> None:
    config = Config(cache_dir=cache_dir, cache={"path": tmp_path / "results.sqlite3"})
    task = Task(wasm_file=wasm.hello, deterministic=True)
    with WasmExecutor(config, workers=1) as executor:
        assert not executor.execute(task).cached
        assert executor.execute(task).cached
        assert [r.cached for r in executor.map([task, task])] == [True, True]
        assert [r.cached for r in executor.map([task], use_cache=False)] == [False]
        assert not executor.execute_many([task], use_cache=False)[0].cached
        assert not asyncio.run(executor.execute_async(task, use_cache=False)).cached
        assert asyncio.run(executor.execute_async(task)).cached
        assert not executor.submit(task, use_cache=False).result(timeout=30).cached
        assert executor.submit(task).result(timeout=30).cached


def test_limits_a_runtime_ignores_are_named_once_in_one_wording(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    with WasmExecutor(Config(cache_dir=cache_dir), workers=1) as executor:
        with pytest.warns(RuntimeWarning, match=r"wasm runtime ignores limits\.cpu, limits\.pids"):
            executor.execute(Task(wasm_file=wasm.hello, limits=Limits(cpu=0.5, pids=8)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            executor.execute(Task(wasm_file=wasm.hello, limits=Limits(cpu=0.5)))  # said once
        with pytest.warns(RuntimeWarning, match=r"ignores limits\.open_files"):
            executor.execute(Task(wasm_file=wasm.hello, limits=Limits(open_files=64)))
