"""``WasmExecutor.execute_async`` sends a worker its next task while it runs the current one
(``runtimes.wasm.lanes``): what waits behind a running task keeps its own deadline, runs
elsewhere when the one ahead kills the worker, can be cancelled alone, and never blocks the
event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import WasmFixtures
from parity_sandbox import Config, ExecutionTimeout, Limits, Result, Task, WasmExecutor


@pytest.fixture
def one_worker(cache_dir: Path) -> Iterator[WasmExecutor]:
    """One worker: a second task waits behind the first on it."""
    config = Config(cache_dir=cache_dir, cache={"enabled": False})
    with WasmExecutor(config, workers=1) as executor:
        yield executor


def sleeper(wasm: WasmFixtures, seconds: str, timeout: float, **fields: Any) -> Task:
    return Task(
        wasm_module=wasm.sleep.read_bytes(),
        args=(seconds,),
        limits=Limits(timeout=timeout),
        **fields,
    )


def test_a_task_behind_another_has_its_deadline_from_its_own_start(
    one_worker: WasmExecutor, wasm: WasmFixtures
) -> None:
    # 2 s then 1 s on one worker: the second ends 3 s after it was sent, within its 1.8 s
    # timeout only if that counts from when its run began.
    async def main() -> tuple[Result, Result]:
        return await asyncio.gather(
            one_worker.execute_async(sleeper(wasm, "2", 10)),
            one_worker.execute_async(sleeper(wasm, "1", 1.8)),
        )

    first, second = asyncio.run(main())
    assert first.ok and second.ok, (first, second)
    assert second.stdout == b"woke\n"
    assert second.usage.wall_time is not None and second.usage.wall_time < 1.8


def test_the_task_behind_one_that_times_out_runs_on_a_new_worker(
    one_worker: WasmExecutor, wasm: WasmFixtures
) -> None:
    async def main() -> tuple[Result | BaseException, Result | BaseException]:
        return await asyncio.gather(
            one_worker.execute_async(sleeper(wasm, "30", 0.5)),
            one_worker.execute_async(sleeper(wasm, "0", 5)),
            return_exceptions=True,
        )

    first, second = asyncio.run(main())
    assert isinstance(first, ExecutionTimeout), first
    assert isinstance(second, Result) and second.ok and second.stdout == b"woke\n", second


def test_cancelling_the_task_behind_leaves_the_running_one_alone(
    one_worker: WasmExecutor, wasm: WasmFixtures
) -> None:
    async def main() -> tuple[Result, bool]:
        running = asyncio.ensure_future(one_worker.execute_async(sleeper(wasm, "1", 10)))
        behind = asyncio.ensure_future(one_worker.execute_async(sleeper(wasm, "0", 10)))
        await asyncio.sleep(0.3)
        behind.cancel()
        with pytest.raises(asyncio.CancelledError):
            await behind
        return await running, behind.cancelled()

    result, cancelled = asyncio.run(main())
    assert cancelled
    assert result.ok and result.stdout == b"woke\n", result
    # The worker, killed as it would have started the cancelled task, was replaced.
    again = asyncio.run(one_worker.execute_async(sleeper(wasm, "0", 10)))
    assert again.ok and again.stdout == b"woke\n"


def test_a_big_request_waits_for_an_idle_worker_and_the_loop_stays_free(
    one_worker: WasmExecutor, wasm: WasmFixtures
) -> None:
    # 4 MiB of stdin cannot sit in a socket's buffer: sent to the busy worker, it would
    # block the event loop until the worker read it, 3 s later.
    big = b"x" * (4 << 20)

    async def main() -> tuple[tuple[Result, Result], float]:
        loop = asyncio.get_running_loop()
        longest = 0.0

        async def tick() -> None:
            nonlocal longest
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                longest = max(longest, loop.time() - before)

        ticker = asyncio.ensure_future(tick())
        try:
            results = await asyncio.gather(
                one_worker.execute_async(sleeper(wasm, "3", 10)),
                one_worker.execute_async(sleeper(wasm, "0", 10, stdin=big)),
            )
        finally:
            ticker.cancel()
        return results, longest

    started = time.monotonic()
    results, longest = asyncio.run(main())
    assert all(result.ok for result in results), results
    assert time.monotonic() - started >= 3
    assert longest < 1.5, f"the event loop was blocked for {longest:.2f} s"


def test_a_task_stuck_behind_a_long_one_moves_to_a_worker_that_idles(
    cache_dir: Path, wasm: WasmFixtures
) -> None:
    config = Config(cache_dir=cache_dir, cache={"enabled": False})
    with WasmExecutor(config, workers=2) as executor:

        async def main() -> tuple[list[Result], float]:
            # Both workers warm, then: a 3 s task, a 1 s task, and a quick one that waits
            # behind the 3 s one until the other worker idles.
            await asyncio.gather(*(executor.execute_async(sleeper(wasm, "0", 10)) for _ in "ab"))
            started = time.monotonic()
            long_one = asyncio.ensure_future(executor.execute_async(sleeper(wasm, "3", 10)))
            short_one = asyncio.ensure_future(executor.execute_async(sleeper(wasm, "1", 10)))
            await asyncio.sleep(0)  # both sent, one per worker
            quick = await executor.execute_async(sleeper(wasm, "0", 10))
            quick_at = time.monotonic() - started
            return [quick, await long_one, await short_one], quick_at

        results, quick_at = asyncio.run(main())
    assert all(result.ok and result.stdout == b"woke\n" for result in results), results
    # Behind the 3 s task it would end after 3 s; moved, soon after the 1 s one ends.
    assert quick_at < 2.5, f"the quick task ended {quick_at:.2f} s after it was sent"


def test_start_async_sends_the_task_before_the_loop_turns(
    one_worker: WasmExecutor, wasm: WasmFixtures
) -> None:
    task = sleeper(wasm, "1", 10)

    async def main() -> tuple[Result, float]:
        await one_worker.execute_async(sleeper(wasm, "0", 10))  # the worker is warm
        begun = one_worker.start_async(one_worker.prepare(task))
        assert begun is not None
        time.sleep(1.2)  # the loop is blocked: only a task already sent runs meanwhile
        waited = time.monotonic()
        result = await begun
        return result, time.monotonic() - waited

    result, waited = asyncio.run(main())
    assert result.ok and result.stdout == b"woke\n", result
    assert waited < 0.8, f"the task ran only once the loop turned ({waited:.2f} s later)"
