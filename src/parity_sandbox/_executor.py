"""The executor contract that every runtime implements.

Modelled on ``concurrent.futures.Executor``. A runtime writes two steps: ``_prepare`` turns a
``Task`` into an immutable :class:`PreparedTask` (host files read once, the program fixed by
identity, so the spec hash is fixed), and ``_run`` runs one and returns its ``Result``
however it ended. ``prepare``, ``execute``, ``submit``, ``execute_async`` and ``map`` are built
on them here, with the result cache, as are the context manager and the idempotent ``close``.
Every entry point takes a task or a prepared task, checks for a closed executor when it is
called, and takes ``use_cache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import threading
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Generator, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from parity_sandbox._cache import ResultCache, open_cache
from parity_sandbox._config import Config
from parity_sandbox._exceptions import RuntimeUnavailable, SandboxError
from parity_sandbox._hashing import digest
from parity_sandbox._inputs import read_inputs, read_module
from parity_sandbox._models import ErrorInfo, Limits, Result, Status, Task


class Cancelled(SandboxError):
    """Internal: the caller stopped waiting (an async cancel, or a closed ``map``)."""


@dataclass(frozen=True, eq=False)
class PreparedTask:
    """A task made ready to run, once: what the cache key, the run and the result all use.

    Every host file the task names was read exactly once into ``inputs`` (and a module file
    into the runtime's own form), the program is fixed by identity (a module's sha256, an
    image's id: a tag moved or a file changed afterwards changes nothing), and the limits are
    resolved. So the spec hash, computed from this snapshot alone, describes exactly the bytes
    that run. Made by ``Executor.prepare``; run by ``execute``, ``submit`` or ``map``.
    """

    task: Task
    #: The name of the runtime whose executor prepared it.
    runtime: str
    #: The limits it runs under: defaults, then the configuration, then the task.
    limits: Limits
    #: The program's identity: the module's sha256, or the image's id (``sha256:...``).
    program: str
    #: The input files' contents, as read when it was prepared.
    inputs: Mapping[str, bytes] = field(repr=False)
    #: The runtime's own form of the task (what it runs); opaque to everything else.
    form: Any = field(default=None, repr=False)
    #: The spec hash, when the runtime had to compute it while preparing (deterministic mode).
    known_spec_hash: str | None = None

    @functools.cached_property
    def spec_hash(self) -> str:
        """The task's spec hash, over this snapshot (no file is read again)."""
        if self.known_spec_hash is not None:
            return self.known_spec_hash
        module = self.task.image is None
        document = self.task.spec_document(
            self.limits,
            module_sha256=self.program if module else None,
            image_id=None if module else self.program,
            inputs=self.inputs,
            runtime=self.runtime,
        )
        return digest(document)

    @property
    def cacheable(self) -> bool:
        """Whether its result may be cached (deterministic, or vouched for by the caller)."""
        return self.task.deterministic or self.task.cacheable

    @property
    def input_bytes(self) -> int:
        """Bytes it brings: stdin and input files."""
        return len(self.task.input) + sum(map(len, self.inputs.values()))


class Executor(ABC):
    """Runs tasks in one runtime. Thread-safe; use as a context manager or call ``close()``."""

    #: The runtime's name in the registry and in results.
    runtime_name: ClassVar[str]
    #: The ``Limits`` fields this runtime applies; a task that sets another is warned (once
    #: per executor and limit) that it is ignored, with ``ignored_because``.
    applied_limits: ClassVar[frozenset[str]] = frozenset(Limits.model_fields)
    ignored_because: ClassVar[str] = ""

    def __init__(self, config: Config | None = None, *, cache: ResultCache | None = None) -> None:
        self.config = config if config is not None else Config()
        self._closed = False
        self._close_lock = threading.Lock()
        #: Limits a task set that this runtime ignores, each warned about once.
        self._warned_limits: set[str] = set()
        #: Runs ``submit``'s tasks; made on first use.
        self._submitted: ThreadPoolExecutor | None = None
        #: Set by ``close()``: stops the submitted tasks still running.
        self._stopping = threading.Event()
        #: Results of deterministic and cacheable tasks, by spec hash (``None``: no caching).
        self.cache = cache if cache is not None else open_cache(self.config)

    # -- what a runtime implements -------------------------------------------------------

    def _prepare(self, task: Task) -> PreparedTask:
        """``task`` made ready to run here; raises ``InvalidInput`` for what cannot run.

        This generic form resolves the limits, reads the input files and identifies the
        program; a runtime adds its own form (and its own checks).
        """
        self._warn_ignored_limits(task)
        limits = task.effective_limits(
            self.config.limits_for(self.runtime_name).merged(task.limits)
        )
        if task.image is not None:
            program = task.image
        else:
            program = hashlib.sha256(read_module(task)).hexdigest()
        return PreparedTask(task, self.runtime_name, limits, program, read_inputs(task))

    def _warn_ignored_limits(self, task: Task) -> None:
        """Warn, once per limit, about limits ``task`` sets that this runtime does not apply
        (called by ``_prepare``)."""
        ignored = {
            name
            for name in task.limits.model_fields_set - self.applied_limits
            if getattr(task.limits, name) is not None and name not in self._warned_limits
        }
        if not ignored:
            return
        self._warned_limits |= ignored
        names = ", ".join(f"limits.{name}" for name in sorted(ignored))
        reason = f": {self.ignored_because}" if self.ignored_because else ""
        warnings.warn(
            f"the {self.runtime_name} runtime ignores {names}{reason}",
            RuntimeWarning,
            stacklevel=5,
        )

    @abstractmethod
    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        """Run ``prepared`` once and return its result, however it ended; stop early and raise
        ``Cancelled`` once ``cancel`` is set. Raises only when nothing could run
        (``InvalidInput``, ``RuntimeUnavailable``)."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources; called once."""

    @classmethod
    def diagnose(cls, config: Config) -> tuple[bool, str]:
        """Whether this runtime can run tasks here, and the details or the fix (``doctor``).

        This generic check makes an executor and closes it; a runtime says more.
        """
        try:
            cls(config).close()
        except SandboxError as exc:
            return False, exc.message
        return True, "an executor starts"

    def prepare(self, task: Task) -> PreparedTask:
        """Make ``task`` ready to run: limits resolved, host files read once, the program
        fixed by identity, and so the spec hash fixed. ``execute``, ``submit`` and ``map``
        take the result in place of a task; they prepare a plain task themselves.

        Raises:
            InvalidInput: the task cannot run here (nothing ran).
            RuntimeUnavailable: the runtime, or the executor, is not available.
        """
        self._check_open()
        return self._prepare(task)

    def spec_hash(self, task: Task) -> str:
        """``task``'s spec hash here: under this executor's configuration, its module hashed,
        a Docker image resolved to the id a tag points at now (see ``parity_sandbox.spec_hash``)."""
        return self._prepare(task).spec_hash

    def max_parallel(self) -> int:
        """How many tasks this executor runs at once when nothing else is said."""
        return 1

    # -- the contract ------------------------------------------------------------------------

    def execute(self, task: Task | PreparedTask, *, use_cache: bool = True) -> Result:
        """Run one task (or a prepared one) and return its result.

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
        return self._outcome(task, None, use_cache)

    def _outcome(
        self, item: Task | PreparedTask, cancel: threading.Event | None, use_cache: bool
    ) -> Result:
        """``execute``'s work: the result of a task that exited; raises for any other end."""
        result = self._execute_cached(item, cancel, use_cache=use_cache)
        if result.status in (Status.SUCCEEDED, Status.FAILED):
            return result
        error = result.to_error()
        assert error is not None
        raise error

    def submit(self, task: Task | PreparedTask, *, use_cache: bool = True) -> Future[Result]:
        """Schedule ``task`` and return a ``concurrent.futures.Future`` of its result.

        ``future.result()`` returns or raises as ``execute`` does; ``future.cancel()`` stops a
        task that has not started. Up to ``max_parallel()`` submitted tasks run at once; the
        others wait their turn. ``close()`` cancels those still waiting and stops those that
        run (their futures raise ``RuntimeUnavailable``).

        Raises:
            RuntimeUnavailable: the executor is closed.
        """
        with self._close_lock:
            self._check_open()
            if self._submitted is None:
                self._submitted = ThreadPoolExecutor(
                    self.max_parallel(), thread_name_prefix=f"parity-sandbox-{self.runtime_name}"
                )
            return self._submitted.submit(self._run_submitted, task, use_cache)

    def _run_submitted(self, task: Task | PreparedTask, use_cache: bool) -> Result:
        try:
            return self._outcome(task, self._stopping, use_cache)
        except Cancelled:
            raise RuntimeUnavailable(
                f"this {type(self).__name__} was closed while the task ran"
            ) from None

    def _execute_cached(
        self, item: Task | PreparedTask, cancel: threading.Event | None, *, use_cache: bool = True
    ) -> Result:
        """Prepare (once), answer from the result cache where the task allows it, else run;
        the result, however the task ended."""
        prepared = item if isinstance(item, PreparedTask) else self._prepare(item)
        task = prepared.task
        cached = use_cache and self.cache is not None and prepared.cacheable
        if cached:
            assert self.cache is not None
            hit = self.cache.get(prepared.spec_hash)
            if hit is not None:
                return hit.model_copy(update={"task_id": task.id, "labels": task.labels})
        result = self._run(prepared, cancel)
        if prepared.cacheable and result.spec_hash is None:
            result = result.model_copy(update={"spec_hash": prepared.spec_hash})
        if cached:
            assert self.cache is not None
            self.cache.put(prepared.spec_hash, result)
        return result

    async def execute_async(self, task: Task | PreparedTask, *, use_cache: bool = True) -> Result:
        """Run one task without blocking the event loop; cancelling the await stops the task.

        Raises as ``execute`` does, ``RuntimeUnavailable`` at once for a closed executor.
        """
        self._check_open()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            None, functools.partial(self._outcome, task, cancel, use_cache)
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def map(
        self,
        tasks: Iterable[Task | PreparedTask],
        *,
        max_parallel: int | None = None,
        memory_budget: int | None = None,
        use_cache: bool = True,
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
            use_cache: ``False`` runs every task, even where the result cache has its result.

        Raises:
            RuntimeUnavailable: the executor is closed (at the call, not at the first result).
        """
        self._check_open()
        return run_all(
            ((self, task) for task in tasks),
            width=max(1, max_parallel or self.max_parallel()),
            memory_budget=memory_budget if memory_budget is not None else available_memory(),
            use_cache=use_cache,
        )

    def execute_many(
        self,
        tasks: Iterable[Task | PreparedTask],
        *,
        max_parallel: int | None = None,
        memory_budget: int | None = None,
        use_cache: bool = True,
    ) -> list[Result]:
        """``map``, collected into a list."""
        return list(
            self.map(
                tasks,
                max_parallel=max_parallel,
                memory_budget=memory_budget,
                use_cache=use_cache,
            )
        )

    def memory_of(self, task: Task | PreparedTask) -> int:
        """The host memory ``task`` takes here, what batch admission counts: its memory limit,
        plus the input bytes the host holds for it outside that limit."""
        if isinstance(task, PreparedTask):
            return (task.limits.memory or 0) + task.input_bytes
        limit = self.config.limits_for(self.runtime_name).merged(task.limits).memory or 0
        return limit + _input_bytes(task)

    def _result_of(
        self, task: Task | PreparedTask, cancel: threading.Event, use_cache: bool = True
    ) -> Result:
        try:
            return self._execute_cached(task, cancel, use_cache=use_cache)
        except SandboxError as exc:
            return self._error_result(task.task if isinstance(task, PreparedTask) else task, exc)

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
            submitted = self._submitted
        self._stopping.set()
        try:
            if submitted is not None:
                submitted.shutdown(wait=False, cancel_futures=True)
            self._close()
            if submitted is not None:
                submitted.shutdown(wait=True)
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
    work: Iterable[tuple[Executor | None, Task | PreparedTask | SandboxError]],
    *,
    width: int,
    memory_budget: int,
    use_cache: bool = True,
) -> Generator[Result, None, None]:
    """Run each task on its executor, ``width`` at once within ``memory_budget``; yield the
    results in order. A ``SandboxError`` in place of a task (a task that could not even be
    made) is yielded as its error result. Closing the generator stops what still runs."""
    cancel = threading.Event()
    gate = _MemoryGate(memory_budget)
    pending: deque[Future[Result]] = deque()
    pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="parity-sandbox-map")

    def run_one(executor: Executor, task: Task | PreparedTask, need: int) -> Result:
        try:
            return executor._result_of(task, cancel, use_cache)
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
