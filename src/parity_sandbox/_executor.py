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
import dataclasses
import functools
import hashlib
import os
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Coroutine, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from parity_sandbox._cache import ResultCache, open_cache
from parity_sandbox._config import Config
from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable, SandboxError
from parity_sandbox._hashing import VERSION as HASH_VERSION
from parity_sandbox._hashing import digest, sha256_hex
from parity_sandbox._inputs import read_inputs, read_module
from parity_sandbox._models import (
    ErrorInfo,
    EventKind,
    LimitName,
    Limits,
    ResourceUsage,
    Result,
    RuntimeInfo,
    Status,
    Task,
)
from parity_sandbox.audit import AuditLog, open_audit
from parity_sandbox.metrics import Metrics
from parity_sandbox.runtimes import executor_class


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
    #: The audit log its end is written to (the preparing executor's), if any.
    audit: AuditLog | None = field(default=None, repr=False, compare=False)
    #: Who asked for it (an API key's id), for the audit log; ``Executor.prepare`` sets it.
    principal: str | None = None
    #: The metrics its end is counted in (the preparing executor's), if any.
    metrics: Metrics | None = field(default=None, repr=False, compare=False)
    #: When it was accepted (epoch seconds): its queue wait counts from then.
    accepted_at: float = field(default_factory=time.time, repr=False, compare=False)

    @functools.cached_property
    def spec_hash(self) -> str:
        """The task's spec hash, over this snapshot (no file is read again)."""
        if self.known_spec_hash is not None:
            return self.known_spec_hash
        document = executor_class(self.runtime).spec_document(
            self.task, self.limits, program=self.program, inputs=self.inputs
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

    def result(self, report: RunReport) -> Result:
        """The ``Result`` of a run of this task that the runtime described in ``report``: the
        one place results are made, so that every runtime's have the same form and meaning."""
        error_type = report.error_type or _ERROR_TYPE.get(report.status)
        status, message = report.status, report.message
        files = report.files
        missing = _missing_outputs(self.task.required_outputs, files)
        if missing and status in (Status.SUCCEEDED, Status.FAILED):
            status, error_type = Status.FAILED, "MissingOutput"
            message = f"required output{'s' * (len(missing) > 1)} not written: " + ", ".join(
                missing[:10]
            )
            if report.files_truncated:
                message += " (the outputs were truncated at their caps)"
        output_bytes = len(report.stdout) + len(report.stderr) + sum(map(len, files.values()))
        task = self.task
        # model_validate on a plain dict is pydantic's fastest path, faster than model_construct.
        result = Result.model_validate(
            {
                "status": status,
                "exit_code": report.exit_code,
                "stdout": report.stdout,
                "stderr": report.stderr,
                "stdout_truncated": report.stdout_truncated,
                "stderr_truncated": report.stderr_truncated,
                "files": files,
                "files_truncated": report.files_truncated,
                "duration": report.duration,
                "usage": ResourceUsage.measured(
                    wall_time=report.duration,
                    cpu_time=report.cpu_time,
                    peak_memory=report.peak_memory,
                    fuel_used=report.fuel_used,
                    output_bytes=output_bytes,
                    input_bytes=self.input_bytes,
                ),
                "runtime": report.runtime,
                "spec_hash": self.spec_hash if self.cacheable else None,
                "limit": report.limit,
                "error": ({"type": error_type, "message": message} if error_type else None),
                "task_id": task.id,
                "labels": task.labels,
                "events": events_of(report, self.limits),
                "connections": report.connections,
            }
        )
        return self.recorded(result)

    def recorded(self, result: Result) -> Result:
        """``result`` (of a run of this task, or from the cache), once its end is counted in
        the metrics and written to the audit log, where there are those."""
        if self.metrics is not None:
            waited = None if result.cached else time.time() - self.accepted_at - result.duration
            self.metrics.ended(result, self.runtime, waited)
        if self.audit is not None:
            image = self.task.image is not None
            self.audit.task_end(
                result,
                who=self.principal,
                runtime=self.runtime,
                spec_hash=self.spec_hash,
                program={"image_id" if image else "module_sha256": self.program},
                limits=self.limits.model_dump(exclude_none=True),
            )
        return result


def _missing_outputs(required: tuple[str, ...], files: Mapping[str, bytes]) -> list[str]:
    """Those of ``required`` that ``files`` lacks: a file by its path, a folder by any file
    under it."""
    return [
        path
        for path in required
        if path not in files and not any(name.startswith(path + "/") for name in files)
    ]


#: Paths (and their length) an ``output_not_followed`` event names at most.
_NAMED_PATHS = 5
_PATH_CHARS = 256


def events_of(report: RunReport, limits: Limits) -> list[dict[str, Any]]:
    """The security events of a run that ``report`` describes, all at the time of its end
    (none on the common path, where nothing happened)."""
    found: list[tuple[EventKind, dict[str, Any]]] = []
    if report.status is Status.TIMEOUT:
        found.append((EventKind.TIMEOUT, {"timeout": limits.timeout}))
    if report.status is Status.RESOURCE_LIMIT and report.limit is not None:
        found.append((EventKind.LIMIT_HIT, {"limit": report.limit}))
        if report.limit in ("disk", "file_size"):
            found.append((EventKind.DISK_CAP, {"limit": report.limit}))
    if report.pids_exhausted or (report.status is Status.RESOURCE_LIMIT and report.limit == "pids"):
        found.append((EventKind.PIDS_EXHAUSTED, {"limit": limits.pids}))
    if report.oom_killed:
        found.append((EventKind.OOM_KILL, {"limit": limits.memory}))
    if report.trapped:
        found.append((EventKind.GUEST_TRAP, {"message": report.message[:_PATH_CHARS]}))
    if report.worker_lost:
        found.append((EventKind.WORKER_LOST, {"message": report.message[:_PATH_CHARS]}))
    cut = tuple(
        name
        for name, flag in (
            ("stdout", report.stdout_truncated),
            ("stderr", report.stderr_truncated),
            ("files", report.files_truncated),
        )
        if flag
    )
    if cut:
        found.append((EventKind.OUTPUT_TRUNCATED, {"what": cut}))
    if report.not_followed > 0:
        named = list(report.not_followed_paths)[:_NAMED_PATHS]
        found.append(
            (
                EventKind.OUTPUT_NOT_FOLLOWED,
                {
                    "count": report.not_followed,
                    "paths": tuple(str(path)[:_PATH_CHARS] for path, _ in named),
                    "kinds": tuple(str(kind)[:16] for _, kind in named),
                },
            )
        )
    if report.error_type == "InvalidInput":
        found.append((EventKind.INPUT_REJECTED, {"field": report.rejected_field}))
    if not found:
        return []
    now = datetime.now(UTC)
    return [{"kind": kind, "time": now, "details": details} for kind, details in found]


#: The error a result of each status that is not an exit carries (``Result.to_error``).
_ERROR_TYPE = {
    Status.TIMEOUT: "ExecutionTimeout",
    Status.RESOURCE_LIMIT: "ResourceLimitExceeded",
    Status.ERROR: "ExecutionError",
    Status.LAUNCH_FAILED: "LaunchFailed",
}


@dataclass(slots=True, kw_only=True)  # not frozen: made once per run, on the hot path
class RunReport:
    """What a runtime saw of one run, in the contract's terms; ``PreparedTask.result`` makes
    the ``Result`` from it (usage totals, the error, the task's id and labels)."""

    status: Status
    #: Which runtime ran it, and with what (a ``RuntimeInfo``, or its fields as a dict).
    runtime: RuntimeInfo | Mapping[str, Any]
    #: The task's exit code; ``None`` when it did not exit (killed at a deadline, never ran).
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: Mapping[str, bytes] = field(default_factory=dict)
    files_truncated: bool = False
    #: Seconds from the task's start to its end (or its deadline).
    duration: float = 0.0
    cpu_time: float | None = None
    peak_memory: int | None = None
    fuel_used: int | None = None
    #: The limit a ``resource_limit`` run hit.
    limit: LimitName | None = None
    #: Why a run that did not exit ended so.
    message: str = ""
    #: The error's type where the status alone does not say it (``"InvalidInput"``: the task
    #: was rejected where it ran).
    error_type: str | None = None
    #: The task's field that was rejected where it ran (with ``error_type="InvalidInput"``).
    rejected_field: str | None = None
    # What else the runtime saw; each becomes a ``SecurityEvent`` of the result.
    #: The WebAssembly guest trapped.
    trapped: bool = False
    #: The task reached its process limit, however it ended (Docker: the cgroup says so).
    pids_exhausted: bool = False
    #: The kernel killed the task for memory (Docker).
    oom_killed: bool = False
    #: The process or container that ran the task died under it (not at a deadline or cap).
    worker_lost: bool = False
    #: Output entries that were not regular files (symlinks, FIFOs, devices), left out and
    #: never followed: how many, and the first few as ``(path, kind)``.
    not_followed: int = 0
    not_followed_paths: Sequence[tuple[str, str]] = ()
    #: The connections of a task granted a network (``Result.connections``' fields).
    connections: Sequence[Mapping[str, Any]] = ()


class Executor(ABC):
    """Runs tasks in one runtime. Thread-safe; use as a context manager or call ``close()``."""

    #: The runtime's name in the registry and in results.
    runtime_name: ClassVar[str]
    #: The ``Limits`` fields this runtime applies; a task that sets another is warned (once
    #: per executor and limit) that it is ignored, with ``ignored_because``.
    applied_limits: ClassVar[frozenset[str]] = frozenset(Limits.model_fields)
    ignored_because: ClassVar[str] = ""
    #: The limits every spec document of this runtime names, set or not; its other applied
    #: limits are named only where set (so a limit added later leaves older hashes as they were).
    hashed_limits: ClassVar[tuple[str, ...]] = ()
    #: Whether ``prepare`` of a task whose files are all bytes (a record) blocks on nothing,
    #: so that an event loop may call it (the service's dispatcher does).
    prepares_on_loop: ClassVar[bool] = False

    def __init__(
        self,
        config: Config | None = None,
        *,
        cache: ResultCache | None = None,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config if config is not None else Config()
        #: What this executor counts (``None``: nothing): the one given, else the process's
        #: own when ``config.metrics.enabled``.
        self.metrics = (
            metrics
            if metrics is not None
            else Metrics.default()
            if self.config.metrics.enabled
            else None
        )
        #: Where task ends and other security-relevant actions are written (``None``: nowhere);
        #: the one ``config.audit`` describes unless one is given (and then not closed here).
        self._own_audit = audit is None
        self.audit = audit if audit is not None else open_audit(self.config.audit)
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
        if self.cache is not None and self.metrics is not None:
            self.cache.on_damage = self.metrics.damaged

    # -- what a runtime implements -------------------------------------------------------

    @classmethod
    def spec_document(
        cls, task: Task, limits: Limits, *, program: str, inputs: Mapping[str, bytes]
    ) -> dict[str, Any]:
        """The canonical description of ``task`` on this runtime that its spec hash covers
        (see ``parity_sandbox._hashing``), under the resolved ``limits``, with its program's
        identity (``program``: a module's sha256, an image's id) and its input files'
        contents as they were read. Reads nothing.

        The limits named are ``hashed_limits``, set or not, then the other ``applied_limits``
        that are set; a runtime adds its own fields in ``_spec_fields``.
        """
        limits = task.effective_limits(limits)
        optional = sorted(cls.applied_limits.difference(cls.hashed_limits))
        names = (*cls.hashed_limits, *(n for n in optional if getattr(limits, n) is not None))
        module = task.image is None
        args = task.args if module else task.command  # Docker: None means the image's own
        document: dict[str, Any] = {
            "v": HASH_VERSION,
            "kind": "task",
            "runtime": cls.runtime_name,
            "program": {"module_sha256": program} if module else {"image_id": program},
            "args": None if args is None else list(args),
            "env": dict(task.env),
            "stdin_sha256": sha256_hex(task.input),
            "input_files": {name: sha256_hex(content) for name, content in inputs.items()},
            "outputs": list(task.outputs),
            "limits": {name: getattr(limits, name) for name in names},
            "deterministic": task.deterministic,
        }
        # Each only where set: the hashes of tasks without them stay as they were.
        if task.network is not None:
            document["network"] = {"allow": list(task.network.allow)}
        if task.entry is not None:
            document["entry"] = {"call": task.entry, "exit": task.entry_exit}
        if task.required_outputs:
            document["required_outputs"] = list(task.required_outputs)
        if task.mounts:
            document["mounts"] = dict(sorted(task.mounts.items()))
        if task.workdir is not None and task.image is None:
            document["workdir"] = task.workdir
        document.update(cls._spec_fields(task))
        return document

    @classmethod
    def _spec_fields(cls, task: Task) -> dict[str, Any]:
        """What this runtime adds to a task's spec document: the task's fields that shape
        its output here and that the generic document does not name."""
        return {}

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
        return PreparedTask(
            task,
            self.runtime_name,
            limits,
            program,
            read_inputs(task),
            audit=self.audit,
            metrics=self.metrics,
        )

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

    def prepare(
        self, task: Task, *, principal: str | None = None, accepted_at: float | None = None
    ) -> PreparedTask:
        """Make ``task`` ready to run: limits resolved, host files read once, the program
        fixed by identity, and so the spec hash fixed. ``execute``, ``submit`` and ``map``
        take the result in place of a task; they prepare a plain task themselves.

        Args:
            task: the task.
            principal: who asks for it (an API key's id), as the audit log names them; the
                caller vouches for it (a task's own fields never set it).
            accepted_at: when the caller accepted the task (epoch seconds; default: now),
                where its queue wait (a metric) counts from.

        Raises:
            InvalidInput: the task cannot run here (nothing ran).
            RuntimeUnavailable: the runtime, or the executor, is not available.
        """
        self._check_open()
        try:
            prepared = self._prepare(task)
        except InvalidInput as exc:
            self._record_rejection(task, exc, principal)
            raise
        except RuntimeUnavailable:
            self._runtime_failed()
            raise
        if principal is not None or accepted_at is not None:
            prepared = dataclasses.replace(
                prepared,
                principal=principal,
                accepted_at=prepared.accepted_at if accepted_at is None else accepted_at,
            )
        return prepared

    def _runtime_failed(self) -> None:
        """Count a task that met an unavailable runtime (a lost daemon, dying workers)."""
        if self.metrics is not None and not self._closed:
            self.metrics.runtime_error(self.runtime_name)

    def _from_cache(self, prepared: PreparedTask) -> Result | None:
        """``prepared``'s result from the result cache (counted and audited), or ``None``."""
        assert self.cache is not None
        hit = self.cache.get(prepared.spec_hash)
        if self.metrics is not None:
            self.metrics.cache_lookup(self.runtime_name, hit is not None)
        if hit is None:
            return None
        task = prepared.task
        return prepared.recorded(hit.model_copy(update={"task_id": task.id, "labels": task.labels}))

    def _record_rejection(
        self, task: Task, exc: InvalidInput, principal: str | None = None
    ) -> None:
        """Count a task refused before it ran, and write it to the audit log, where there
        are those."""
        if self.metrics is not None:
            self.metrics.rejected(self.runtime_name)
        if self.audit is not None:
            self.audit.record(
                "task_rejected",
                who=principal,
                runtime=self.runtime_name,
                task_id=task.id,
                field=exc.field,
                message=exc.message[:1024],
            )

    def spec_hash(self, task: Task) -> str:
        """``task``'s spec hash here: under this executor's configuration, its module hashed,
        a Docker image resolved to the id a tag points at now (see ``parity_sandbox.spec_hash``)."""
        return self._prepare(task).spec_hash

    def max_parallel(self) -> int:
        """How many tasks this executor runs at once when nothing else is said."""
        return 1

    def max_in_flight(self) -> int:
        """How many tasks a caller may keep submitted at once (``execute_async``, ``submit``)
        to keep this executor busy: those beyond ``max_parallel()`` wait inside it for their
        turn. Twice ``max_parallel()``, unless the runtime's waiting tasks cost less."""
        return 2 * self.max_parallel()

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
        if isinstance(item, PreparedTask):
            prepared = item
        else:
            try:
                prepared = self._prepare(item)
            except InvalidInput as exc:
                self._record_rejection(item, exc)
                raise
            except RuntimeUnavailable:
                self._runtime_failed()
                raise
        cached = use_cache and self.cache is not None and prepared.cacheable
        if cached:
            hit = self._from_cache(prepared)
            if hit is not None:
                return hit
        try:
            result = self._run(prepared, cancel)
        except RuntimeUnavailable:
            self._runtime_failed()
            raise
        if prepared.cacheable and result.spec_hash is None:
            result = result.model_copy(update={"spec_hash": prepared.spec_hash})
        if cached and self._keeps(result):
            assert self.cache is not None
            self.cache.put(prepared.spec_hash, result)
        return result

    def _keeps(self, result: Result) -> bool:
        """Whether the result cache may keep ``result`` of a cacheable task: a run's, yes; an
        executor whose own errors stand in for a run (a lost node) says no to those."""
        return True

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
            # Nobody awaits it any more: take its end (``Cancelled``) so asyncio does not
            # report an exception that was never retrieved.
            future.add_done_callback(_retrieved)
            raise

    def start_async(
        self, task: PreparedTask, *, use_cache: bool = True
    ) -> Coroutine[Any, Any, Result] | None:
        """Begin ``execute_async(task)`` now, before the caller's next ``await``, where this
        runtime can (``None``: it cannot here, so call ``execute_async``); await what it
        returns (at once: it holds the run) to end it as ``execute_async`` would. The service
        starts a task this way before the commit that stores it, so the two overlap."""
        return None

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
        events: list[dict[str, Any]] = []
        if isinstance(exc, InvalidInput):
            events.append(
                {
                    "kind": EventKind.INPUT_REJECTED,
                    "time": datetime.now(UTC),
                    "details": {"field": exc.field},
                }
            )
        return Result(
            status=Status.ERROR,
            error=ErrorInfo(type=type(exc).__name__, message=exc.message),
            task_id=task.id if task is not None else None,
            labels=task.labels if task is not None else {},
            events=events,
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
            if self.audit is not None and self._own_audit:
                self.audit.close()

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


def _retrieved(future: asyncio.Future[Result]) -> None:
    if not future.cancelled():
        future.exception()


def limits_of(task: Task, config: Config | None = None) -> tuple[str, Limits]:
    """The runtime ``task`` runs on and its limits there, resolved under ``config`` (default:
    built-in defaults): defaults, then the configuration, then the task."""
    settings = config if config is not None else Config()
    runtime = task.runtime_name or settings.default_runtime
    return runtime, task.effective_limits(settings.limits_for(runtime).merged(task.limits))


def spec_hash(task: Task, config: Config | None = None, *, image_id: str | None = None) -> str:
    """``task``'s spec hash under ``config``: SHA-256 over a canonical encoding of everything
    that determines its output (see ``parity_sandbox._hashing`` and
    ``Executor.spec_document``); its files are read here.

    Args:
        task: the task.
        config: the configuration whose limits apply (default: built-in defaults).
        image_id: for a Docker task, the image's id (``sha256:...``); a task whose ``image``
            is already an id needs none. ``DockerExecutor.spec_hash`` looks it up.

    Raises:
        InvalidInput: a Docker task's image is a name (a tag can move), or a file cannot be
            read.
        RuntimeUnavailable: the task's runtime cannot be loaded here.
    """
    runtime, limits = limits_of(task, config)
    if task.image is None:
        program = hashlib.sha256(read_module(task)).hexdigest()
    elif image_id is not None:
        program = image_id
    elif task.image.startswith("sha256:"):
        program = task.image
    else:
        raise InvalidInput(
            f"image: a spec hash needs the image's id, not the name {task.image!r}; give "
            "image_id= or use DockerExecutor.spec_hash, which looks it up",
            field="image",
        )
    document = executor_class(runtime).spec_document(
        task, limits, program=program, inputs=read_inputs(task)
    )
    return digest(document)


def portable(task: Task, config: Config | None = None, *, image_id: str | None = None) -> Task:
    """``task`` made self-contained, as a record for another machine to re-run: the module
    and input files embedded as bytes, the limits resolved under ``config`` (only those its
    runtime applies), the image by id.

    Raises:
        InvalidInput: a file cannot be read.
        RuntimeUnavailable: the task's runtime cannot be loaded here.
    """
    runtime, limits = limits_of(task, config)
    unused = set(Limits.model_fields) - executor_class(runtime).applied_limits
    limits = limits.model_copy(update=dict.fromkeys(unused))
    update: dict[str, object] = {"input_files": read_inputs(task), "limits": limits}
    if task.image is None:
        update.update(wasm_module=read_module(task), wasm_file=None)
    elif image_id is not None:
        update["image"] = image_id
    return task.model_copy(update=update)


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
