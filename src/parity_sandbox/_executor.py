"""The executor contract that every runtime implements.

Modelled on ``concurrent.futures.Executor``: ``execute`` is the one method a runtime writes (as
``_execute``); ``execute_async`` and ``map`` are built on it here, as are the context manager and
the idempotent ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self

from parity_sandbox._cache import ResultCache, open_cache
from parity_sandbox._config import Config
from parity_sandbox._exceptions import RuntimeUnavailable, SandboxError
from parity_sandbox._models import ErrorInfo, Result, Status, Task


class Cancelled(SandboxError):
    """Internal: the caller stopped waiting (an async cancel, or a closed ``map``)."""


class Executor(ABC):
    """Runs tasks in one runtime. Thread-safe; use as a context manager or call ``close()``."""

    #: The runtime's name in the registry and in results.
    runtime_name: ClassVar[str]

    def __init__(self, config: Config | None = None, *, cache: ResultCache | None = None) -> None:
        self.config = config if config is not None else Config()
        self._closed = False
        self._close_lock = threading.Lock()
        #: Results of deterministic and cacheable tasks, by spec hash (``None``: no caching).
        self.cache = cache if cache is not None else open_cache(self.config)

    # -- the one method a runtime implements -------------------------------------------------

    @abstractmethod
    def _execute(self, task: Task, cancel: threading.Event | None) -> Result:
        """Run ``task``; stop it early and raise ``Cancelled`` once ``cancel`` is set."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources; called once."""

    def spec_hash(self, task: Task) -> str:
        """``task``'s spec hash under this executor's configuration (see ``Task.spec_hash``)."""
        return task.spec_hash(self.config)

    def max_parallel(self) -> int:
        """How many tasks this executor runs at once when nothing else is said."""
        return 1

    # -- the contract ------------------------------------------------------------------------

    def execute(self, task: Task, *, use_cache: bool = True) -> Result:
        """Run one task and return its result.

        A task that exits, whatever its exit code, gives a result; ``status`` says how it ended.
        A deterministic or cacheable task's result may come from the result cache (then
        ``result.cached`` is true); ``use_cache=False`` always runs it.

        Raises:
            InvalidInput: the task was rejected before it ran.
            ExecutionTimeout: it ran past its timeout (``.result`` holds the partial output).
            ResourceLimitExceeded: it hit a limit (``.limit`` says which).
            ExecutionError: it crashed, or the process running it died.
            RuntimeUnavailable: the runtime cannot run tasks here, or the executor is closed.
        """
        self._check_open()
        if not use_cache:
            return self._execute(task, None)
        return self._execute_cached(task, None)

    def _execute_cached(self, task: Task, cancel: threading.Event | None) -> Result:
        """``_execute``, answered from the result cache where the task allows it."""
        key = self._cache_key(task)
        if key is not None:
            assert self.cache is not None
            hit = self.cache.get(key)
            if hit is not None:
                return hit.model_copy(update={"task_id": task.id, "labels": task.labels})
        result = self._execute(task, cancel)
        if key is not None:
            assert self.cache is not None
            self.cache.put(key, result)
        return result

    def _cache_key(self, task: Task) -> str | None:
        """The spec hash a task is cached under, or ``None`` when it is not cached."""
        if self.cache is None or not (task.deterministic or task.cacheable):
            return None
        return self.spec_hash(task)

    async def execute_async(self, task: Task) -> Result:
        """Run one task without blocking the event loop; cancelling the await stops the task."""
        self._check_open()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._execute_cached, task, cancel)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def map(
        self,
        tasks: Iterable[Task],
        *,
        max_parallel: int | None = None,
        memory_budget: int | None = None,
    ) -> Generator[Result, None, None]:
        """Run many tasks, up to ``max_parallel`` at once, yielding their results in order.

        Unlike ``execute``, a task that times out, hits a limit or is rejected does not raise:
        its result (``status`` ``timeout``, ``resource_limit`` or ``error``) is yielded in its
        place, so one bad task does not end a batch. Closing the iterator early stops the
        tasks still running.

        Args:
            tasks: the tasks; read lazily, a few ahead of the results.
            max_parallel: tasks at once (default: what the runtime sustains, see
                ``max_parallel()``).
            memory_budget: bytes the memory limits of the tasks running at once may add up to
                (default: the memory the host has available now); a task above the budget on
                its own runs alone.
        """
        self._check_open()
        yield from run_all(
            ((self, task) for task in tasks),
            width=max(1, max_parallel or self.max_parallel()),
            memory_budget=memory_budget if memory_budget is not None else available_memory(),
        )

    def execute_many(
        self,
        tasks: Iterable[Task],
        *,
        max_parallel: int | None = None,
        memory_budget: int | None = None,
    ) -> list[Result]:
        """``map``, collected into a list."""
        return list(self.map(tasks, max_parallel=max_parallel, memory_budget=memory_budget))

    def memory_of(self, task: Task) -> int:
        """The host memory ``task`` takes here, what batch admission counts: its memory limit,
        plus the input bytes the host holds for it outside that limit."""
        runtime: Literal["wasm", "docker"] = "docker" if self.runtime_name == "docker" else "wasm"
        limit = self.config.limits_for(runtime).merged(task.limits).memory or 0
        return limit + _input_bytes(task)

    def _result_of(self, task: Task, cancel: threading.Event) -> Result:
        try:
            return self._execute_cached(task, cancel)
        except SandboxError as exc:
            return self._error_result(task, exc)

    @staticmethod
    def _error_result(task: Task | None, exc: SandboxError) -> Result:
        """The result ``map`` yields for a task that raised ``exc`` (or could not be made)."""
        if exc.result is not None:
            return exc.result
        return Result(
            status=Status.ERROR,
            error=ErrorInfo(type=type(exc).__name__, message=exc.message),
            task_id=task.id if task is not None else None,
            labels=task.labels if task is not None else {},
        )

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    def close(self) -> None:
        """Stop every task still running and release the runtime. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._close()
        finally:
            if self.cache is not None:
                self.cache.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeUnavailable(f"this {type(self).__name__} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def available_memory() -> int:
    """The memory the host has available now (``MemAvailable``), or its total."""
    with contextlib.suppress(OSError, ValueError), Path("/proc/meminfo").open() as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class _MemoryGate:
    """Admits tasks while the memory limits of those admitted fit in a budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.running = 0
        self._changed = threading.Condition()

    def _fits(self, need: int) -> bool:
        # One task above the budget still runs, alone: refusing it would stall the batch.
        return self.running == 0 or self.used + need <= self.budget

    def try_acquire(self, need: int) -> bool:
        with self._changed:
            if not self._fits(need):
                return False
            self.used += need
            self.running += 1
            return True

    def acquire(self, need: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._fits(need))
            self.used += need
            self.running += 1

    def release(self, need: int) -> None:
        with self._changed:
            self.used -= need
            self.running -= 1
            self._changed.notify_all()


def _input_bytes(task: Task) -> int:
    """The bytes ``task`` brings (stdin, input files; host files by their size now)."""
    total = len(task.input)
    for content in task.input_files.values():
        if isinstance(content, Path):
            with contextlib.suppress(OSError):  # preparing the task will say what is wrong
                total += content.stat().st_size
        else:
            total += len(content)
    return total


def run_all(
    work: Iterable[tuple[Executor | None, Task | SandboxError]],
    *,
    width: int,
    memory_budget: int,
) -> Generator[Result, None, None]:
    """Run each task on its executor, ``width`` at once within ``memory_budget``; yield the
    results in order. A ``SandboxError`` in place of a task (a task that could not even be
    made) is yielded as its error result. Closing the generator stops what still runs."""
    cancel = threading.Event()
    gate = _MemoryGate(memory_budget)
    pending: deque[Future[Result]] = deque()
    pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="parity-sandbox-map")

    def run_one(executor: Executor, task: Task, need: int) -> Result:
        try:
            return executor._result_of(task, cancel)
        finally:
            gate.release(need)

    try:
        for executor, task in work:
            if isinstance(task, SandboxError) or executor is None:
                assert isinstance(task, SandboxError)
                done: Future[Result] = Future()
                done.set_result(Executor._error_result(None, task))  # a task never made
                pending.append(done)
            else:
                need = executor.memory_of(task)
                while not gate.try_acquire(need):  # yield results while memory frees up
                    if not pending:
                        gate.acquire(need)
                        break
                    yield pending.popleft().result()
                pending.append(pool.submit(run_one, executor, task, need))
            while len(pending) >= 2 * width:  # keep the next tasks queued behind
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
