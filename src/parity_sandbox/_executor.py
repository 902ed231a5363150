"""The executor contract that every runtime implements.

Modelled on ``concurrent.futures.Executor``: ``execute`` is the one method a runtime writes (as
``_execute``); ``execute_async`` and ``map`` are built on it here, as are the context manager and
the idempotent ``close``.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import ClassVar, Self

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
        self, tasks: Iterable[Task], *, max_parallel: int | None = None
    ) -> Generator[Result, None, None]:
        """Run many tasks, up to ``max_parallel`` at once, yielding their results in order.

        Unlike ``execute``, a task that times out, hits a limit or is rejected does not raise:
        its result (``status`` ``timeout``, ``resource_limit`` or ``error``) is yielded in its
        place, so one bad task does not end a batch. Closing the iterator early stops the
        tasks still running.
        """
        self._check_open()
        width = max(1, max_parallel or self.max_parallel())
        cancel = threading.Event()
        pending: deque[Future[Result]] = deque()
        source = iter(tasks)
        pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="parity-sandbox-map")
        try:
            for task in source:
                pending.append(pool.submit(self._result_of, task, cancel))
                if len(pending) >= 2 * width:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _result_of(self, task: Task, cancel: threading.Event) -> Result:
        try:
            return self._execute_cached(task, cancel)
        except SandboxError as exc:
            return self._error_result(task, exc)

    @staticmethod
    def _error_result(task: Task, exc: SandboxError) -> Result:
        """The result ``map`` yields for a task that raised ``exc``."""
        if exc.result is not None:
            return exc.result
        return Result(
            status=Status.ERROR,
            error=ErrorInfo(type=type(exc).__name__, message=exc.message),
            task_id=task.id,
            labels=task.labels,
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
