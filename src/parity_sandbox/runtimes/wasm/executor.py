"""The WebAssembly runtime: WASI preview 1 command modules under wasmtime, in warm workers.

A task flows like this: the parent validates it and resolves its limits, reads and hashes the
module, then hands a :class:`RunRequest` to an idle worker process (see ``worker``). The
worker loads the module (memory cache, disk cache, or compile), runs it in a fresh store with a
fresh workspace, and replies. A deadline thread kills the worker of a task that has not answered by
its timeout (the only way to stop a guest asleep in a host call); its partial output is
recovered from the memory it shares with the parent, and a replacement worker is started.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import itertools
import os
import select
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Coroutine, Generator, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from parity_sandbox._cache import ResultCache
from parity_sandbox._config import Config
from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable, SandboxError
from parity_sandbox._executor import (
    Cancelled,
    Executor,
    PreparedTask,
    RunReport,
    available_memory,
)
from parity_sandbox._fs import (
    NotFollowed,
    OutputCaps,
    collect_outputs,
    remove_tree,
)
from parity_sandbox._hashing import digest
from parity_sandbox._inputs import read_inputs
from parity_sandbox._models import (
    LimitName,
    Limits,
    Result,
    Status,
    Task,
    check_input_bytes,
)
from parity_sandbox.audit import AuditLog
from parity_sandbox.metrics import Metrics
from parity_sandbox.runtimes.wasm.deadlines import (
    COMPILE_TIMEOUT,
    KILL_GRACE,
    Deadlines,
    Flight,
    Form,
)
from parity_sandbox.runtimes.wasm.lanes import Lanes, Wanted
from parity_sandbox.runtimes.wasm.modules import ModuleFiles
from parity_sandbox.runtimes.wasm.pool import (
    LOCK_NAME,
    ROOT_PREFIX,
    Pool,
    Worker,
    reap_stale_roots,
)
from parity_sandbox.runtimes.wasm.protocol import (
    MAX_WASM_MEMORY,
    NeedModule,
    RunReply,
    RunRequest,
    WasmLimits,
    decode,
    encode,
)


def wasm_limits(limits: Limits, *, deterministic: bool = False) -> WasmLimits:
    """The WASM runtime's view of fully resolved :class:`Limits`; rejects what it cannot do."""
    assert limits.memory and limits.timeout and limits.stack_size and limits.disk
    assert limits.output is not None
    if limits.memory > MAX_WASM_MEMORY:
        raise InvalidInput(
            f"memory: {limits.memory} bytes is more than a wasm32 module can address (4 GiB)",
            field="memory",
        )
    return WasmLimits(
        memory=limits.memory,
        timeout=limits.timeout,
        stack_size=limits.stack_size,
        disk=limits.disk,
        output=limits.output,
        fuel=limits.fuel,
        deterministic=deterministic,
        file_size=limits.file_size,
    )


_STATUS = {
    "timeout": Status.TIMEOUT,
    "limit": Status.RESOURCE_LIMIT,
    "trap": Status.ERROR,
    "invalid": Status.ERROR,
    "error": Status.ERROR,
    "requeue": Status.ERROR,
}


@functools.lru_cache(maxsize=16)
def _output_caps(max_files: int) -> OutputCaps:
    return OutputCaps(max_files=max_files)


#: Flights per worker in ``map``: the one it runs and the next one, already sent.
_DEPTH = 2


class WasmExecutor(Executor):
    """Runs WASI preview 1 command modules under wasmtime, each in a fresh store and workspace.

    Inside the sandbox a task sees its args and env (nothing else), stdin, a writable
    workspace at ``/work`` and its input files read-only at ``/input``; no network, no clock
    beyond WASI's, no other host path. Files under ``/work/out`` (or ``Task.outputs``) come
    back in ``Result.files``.

    Args:
        config: defaults for limits, workers and the module cache (default ``Config()``).
        workers: worker processes, i.e. tasks run at once (default ``config.wasm.workers``,
            else one per core).
        cache: the result cache of deterministic and cacheable tasks (default: the one
            ``config.cache`` describes).
        audit: where task ends are written (default: the audit log ``config.audit``
            describes, if any).
        metrics: what it counts in (default: the process's ``Metrics.default()`` when
            ``config.metrics.enabled``, else nothing).
    """

    runtime_name = "wasm"
    applied_limits = frozenset(Limits.model_fields) - {"cpu", "pids", "open_files"}
    hashed_limits = ("memory", "disk", "output", "timeout", "fuel", "stack_size")
    prepares_on_loop = True  # a module sent as bytes is hashed; nothing is read or asked
    ignored_because = (
        "a WebAssembly task is one thread, starts no processes and opens only what WASI "
        "preopens (use fuel to bound its CPU)"
    )

    def __init__(
        self,
        config: Config | None = None,
        *,
        workers: int | None = None,
        cache: ResultCache | None = None,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(config, cache=cache, audit=audit, metrics=metrics)
        size = workers or self.config.wasm.workers or os.cpu_count() or 1
        self._limits = self.config.limits_for("wasm")
        # Rejects, now, a configuration this runtime cannot honour.
        self._default_limits = wasm_limits(self._limits)
        reaped = reap_stale_roots()
        if reaped and self.audit is not None:
            self.audit.record("leftover_reaped", runtime="wasm", removed=reaped)
        if reaped and self.metrics is not None:
            self.metrics.leftovers("wasm", reaped)
        # The root gets its reapable name only once its lock is held: another process's
        # reap_stale_roots() must never see it unlocked.
        making = Path(tempfile.mkdtemp(prefix=f".{ROOT_PREFIX}{os.getpid()}-"))
        self._lock_fd = os.open(making / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._root = making.with_name(making.name[1:])
        making.rename(self._root)
        restarted = (
            functools.partial(self.metrics.worker_restarted, "wasm")
            if self.metrics is not None
            else None
        )
        self._pool = Pool(
            size,
            self._root,
            self.config.resolved_cache_dir() / "wasm-modules",
            on_restart=restarted,
        )
        self._deadlines = Deadlines()
        #: Each event loop's lanes (``execute_async``), made on its first task.
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Lanes] = (
            weakref.WeakKeyDictionary()
        )
        self._lanes_lock = threading.Lock()
        self._seq = itertools.count(1)  # 0 means none in the shared buffer
        self._modules = ModuleFiles()
        # Workers and the temporary root go also when the executor is dropped unclosed, or at
        # interpreter exit; the finaliser holds no reference to the executor itself.
        self._release = weakref.finalize(
            self, _release, self._deadlines, self._pool, self._root, self._lock_fd
        )
        try:
            self._pool.prestart()
        except BaseException:
            self._close()
            raise

    def max_parallel(self) -> int:
        return self._pool.size

    def max_in_flight(self) -> int:
        # A task that waits for a worker holds only its prepared request, and with
        # ``execute_async`` no thread: its memory limit is taken when it runs.
        return 32 * self._pool.size

    @classmethod
    def diagnose(cls, config: Config) -> tuple[bool, str]:
        """Run a tiny module end to end."""
        try:
            import wasmtime
        except ImportError as exc:
            return (
                False,
                f"wasmtime cannot be imported ({exc}); fix: pip install 'wasmtime>=50,<51'",
            )
        module = wasmtime.wat2wasm(
            '(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))'
            ' (memory (export "memory") 1) (func (export "_start") i32.const 0 call $exit))'
        )
        try:
            executor = cls(config)
        except SandboxError as exc:
            return False, exc.message
        with executor:
            try:
                result = executor.execute(Task(wasm_module=bytes(module)))
            except SandboxError as exc:
                return False, f"a test task failed: {exc.message}"
        if not result.ok:
            return False, f"a test task ended with status {result.status.value}"
        assert result.runtime is not None
        return True, f"{result.runtime.version}; test task ran in {result.duration * 1e3:.2f} ms"

    # -- one task ------------------------------------------------------------------------------

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        request, module = self._form(prepared)
        flight = self._dispatch(
            Flight(0, prepared, request, module, self._pool.acquire(cancel)), cancel
        )
        worker = flight.worker
        try:
            self._watch(flight, queued=False)
            reply = None
            while reply is None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("the task was cancelled")
                # The deadline thread kills the worker at the deadline; this wait only returns.
                wait_s = 0.05 if cancel is not None else flight.deadline - time.monotonic() + 1.0
                if worker.poller.poll(max(wait_s, 0.0) * 1000):
                    reply = self._receive(flight)
        except BaseException:
            # Cancel, Ctrl-C or close(): the worker may be mid-task, so it dies.
            self._deadlines.finish(flight)
            self._pool.discard(worker)
            raise
        result = self._settle(flight, reply)
        self._pool.release(worker)  # or replaced, if it died
        if self.closed and reply.outcome == "error":
            raise RuntimeUnavailable("the executor was closed while the task ran", result=result)
        return result

    # -- one task, on an event loop -------------------------------------------------------------

    async def execute_async(self, task: Task | PreparedTask, *, use_cache: bool = True) -> Result:
        """As ``Executor.execute_async``, with no thread per task: the event loop drives the
        workers (``lanes``). A task whose preparation reads host files, or whose result may
        come from the result cache (whose lookups block), takes the thread of the base class
        instead."""
        self._check_open()
        if not isinstance(task, PreparedTask):
            if task.wasm_file is not None or any(
                not isinstance(content, bytes) for content in task.input_files.values()
            ):
                return await super().execute_async(task, use_cache=use_cache)
            task = self.prepare(task)  # hashing and checks only: nothing is read
        begun = self.start_async(task, use_cache=use_cache)
        if begun is None:
            return await super().execute_async(task, use_cache=use_cache)
        return await begun

    def start_async(
        self, task: PreparedTask, *, use_cache: bool = True
    ) -> Coroutine[Any, Any, Result] | None:
        """As ``Executor.start_async``: the task goes to the loop's lanes now (and to a worker,
        if one can take it), unless its result may come from the result cache."""
        self._check_open()
        if use_cache and self.cache is not None and task.cacheable:
            return None
        request, module = self._form(task)
        loop = asyncio.get_running_loop()
        with self._lanes_lock:
            lanes = self._lanes.get(loop)
            if lanes is None:
                lanes = self._lanes[loop] = Lanes(self, loop)
        return self._outcome_async(task, lanes, lanes.submit(task, request, module))

    async def _outcome_async(self, prepared: PreparedTask, lanes: Lanes, wanted: Wanted) -> Result:
        """The end of a run ``start_async`` began, as ``execute_async`` gives it."""
        try:
            result, outcome = await lanes.wait(wanted)
            if self.closed and outcome == "error":
                raise RuntimeUnavailable(
                    "the executor was closed while the task ran", result=result
                )
        except RuntimeUnavailable:
            self._runtime_failed()
            raise
        if prepared.cacheable and result.spec_hash is None:
            result = result.model_copy(update={"spec_hash": prepared.spec_hash})
        if result.status in (Status.SUCCEEDED, Status.FAILED):
            return result
        error = result.to_error()
        assert error is not None
        raise error

    def _form(self, prepared: PreparedTask) -> tuple[RunRequest, bytes]:
        """The request that runs ``prepared`` and its module; a run after the first gets a
        request of its own (a new sequence number)."""
        form = prepared.form
        if prepared.runtime != "wasm" or not isinstance(form, Form):
            raise InvalidInput(
                "task: prepared by another runtime's executor; prepare it with this one",
                field="task",
            )
        if next(form.runs) == 0:
            return form.request, form.module
        return replace(form.request, seq=next(self._seq)), form.module

    # -- many tasks ----------------------------------------------------------------------------

    def map(
        self,
        tasks: Iterable[Task | PreparedTask],
        *,
        max_parallel: int | None = None,
        memory_budget: int | None = None,
        use_cache: bool = True,
    ) -> Generator[Result, None, None]:
        """Run many tasks on up to ``max_parallel`` workers at once; results in order.

        One thread drives all the workers (no thread per task) and keeps the next task queued
        at each worker, so workers do not wait for the parent between tasks. Like
        ``Executor.map``, a task that fails yields its result instead of raising; closing the
        iterator early stops the tasks still running. ``memory_budget`` (default: the host's
        available memory) bounds what the tasks on the workers in use take together, each by
        its own memory limit and input bytes; a task above the budget on its own runs alone.
        """
        self._check_open()
        width = min(max(1, max_parallel or self._pool.size), self._pool.size)
        budget = memory_budget if memory_budget is not None else available_memory()
        return self._map(iter(tasks), width, budget, use_cache)

    def _map(
        self, source: Iterator[Task | PreparedTask], width: int, budget: int, use_cache: bool
    ) -> Generator[Result, None, None]:
        # Each worker in use has a lane: the flight it runs (the head) and the next one, already
        # sent, so the worker never waits for this thread. A dead worker's queued flights run
        # again elsewhere (they never started, or a crash of another task cut them short).
        lanes: dict[Worker, deque[Flight]] = {}
        by_fd: dict[int, Worker] = {}
        poller = select.poll()  # one for the whole map: cheaper than a selector per wait
        retry: deque[Flight] = deque()
        done: dict[int, Result] = {}
        indices = itertools.count()
        yielded = 0
        exhausted = False
        #: Set when the next task does not fit the memory budget beside those in flight: no
        #: lane opens until a task ends.
        full = False
        #: The most memory any task of this map took so far: while that much on every lane
        #: fits the budget, any next task fits too, and nothing need be summed.
        biggest = 0

        def held(skip: Worker | None = None) -> int:
            """Memory of the tasks in flight: a worker runs its lane's tasks one at a time."""
            return sum(
                max(flight.need for flight in lane)
                for worker, lane in lanes.items()
                if lane and worker is not skip
            )

        def fits(flight: Flight, lane: deque[Flight]) -> bool:
            nonlocal biggest
            biggest = max(biggest, flight.need)
            if biggest * width <= budget:
                return True
            others = held(skip=flight.worker)
            if not others:
                return True  # alone, any task runs: refusing it would stall the batch
            mine = max([f.need for f in lane] + [flight.need])
            return others + mine <= budget

        def next_flight(worker: Worker) -> Flight | None:
            nonlocal exhausted
            while retry or not exhausted:
                if retry:
                    flight = retry.popleft()
                    return Flight(
                        flight.index, flight.prepared, flight.request, flight.module, worker
                    )
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                index = next(indices)
                task = item.task if isinstance(item, PreparedTask) else item
                try:
                    prepared = item if isinstance(item, PreparedTask) else self._prepare(item)
                    if use_cache and self.cache is not None and prepared.cacheable:
                        hit = self._from_cache(prepared)
                        if hit is not None:
                            done[index] = hit
                            continue
                    return Flight(index, prepared, *self._form(prepared), worker)
                except SandboxError as exc:
                    if isinstance(exc, InvalidInput) and not isinstance(item, PreparedTask):
                        self._record_rejection(item, exc)
                    done[index] = self._error_result(task, exc)
            return None

        def open_lane(worker: Worker) -> None:
            lanes[worker] = deque()
            by_fd[worker.fd] = worker
            poller.register(worker.fd, select.POLLIN)

        def close_lane(worker: Worker) -> deque[Flight]:
            poller.unregister(worker.fd)
            del by_fd[worker.fd]
            return lanes.pop(worker)

        def retire(worker: Worker) -> None:
            """Discard a dead (or abandoned) worker; what it had queued runs elsewhere."""
            nonlocal full
            full = False
            lane = close_lane(worker)
            for flight in lane:
                self._deadlines.finish(flight)
            retry.extend(lane)
            self._pool.discard(worker)

        try:
            while True:
                while len(lanes) < width and (retry or not exhausted) and not full:
                    worker = self._pool.try_acquire()
                    if worker is None:
                        if lanes:
                            break
                        worker = self._pool.acquire(None)  # others hold every worker: wait
                    open_lane(worker)
                for worker, lane in list(lanes.items()):
                    while len(lane) < _DEPTH:
                        flight = next_flight(worker)
                        if flight is None:
                            break
                        if lane and self._needs_module(flight):
                            # Compiling is bounded only for a lane's head: wait for one.
                            retry.appendleft(flight)
                            break
                        if not fits(flight, lane):
                            full = True
                            retry.appendleft(flight)
                            break
                        try:
                            worker.ensure_ready()
                        except RuntimeUnavailable as exc:
                            done[flight.index] = self._error_result(flight.task, exc)
                            worker.dead = True
                            break
                        try:
                            self._send(flight)
                        except OSError:
                            # The worker died under us (its running task's deadline): this one
                            # never ran and goes again; the poll below learns how the other ended.
                            worker.dead = True
                            retry.appendleft(flight)
                            break
                        self._watch(flight, queued=bool(lane))
                        lane.append(flight)
                    if worker in lanes and not lane:
                        if worker.dead:
                            retire(worker)
                        else:
                            close_lane(worker)
                            self._pool.release(worker)
                while yielded in done:
                    yield done.pop(yielded)
                    yielded += 1
                if not lanes:
                    if exhausted and not retry:
                        return
                    full = False  # nothing in flight: the next task runs alone
                    continue
                for fd, _ in poller.poll(1000):
                    worker = by_fd.get(fd)  # None: retired earlier in this loop
                    if worker is None:
                        continue
                    lane = lanes[worker]
                    if not lane:  # an idle worker in a lane can only have died
                        retire(worker)
                        continue
                    reply = self._receive(lane[0])
                    if reply is None:
                        continue
                    if reply.outcome == "requeue":
                        retire(worker)
                        continue
                    head = lane.popleft()
                    full = False  # its memory is free again
                    done[head.index] = self._settle(head, reply)
                    if use_cache and self.cache is not None and head.request.spec_hash is not None:
                        self.cache.put(head.request.spec_hash, done[head.index])
                    if worker.dead:
                        retire(worker)
        finally:
            for worker in list(lanes):
                retire(worker)

    # -- the steps of a flight -----------------------------------------------------------------

    def _prepare(self, task: Task) -> PreparedTask:
        """Everything about ``task`` that needs no worker, its files read once (an unchanged
        module file is recognised and not read or hashed again); raises ``InvalidInput``."""
        if task.runtime_name not in (None, "wasm"):
            raise InvalidInput(
                f"runtime: this executor runs wasm tasks, not {task.runtime_name} tasks "
                "(use DockerExecutor for an image)",
                field="runtime",
            )
        if task.network is not None:
            raise InvalidInput(
                "network: a WebAssembly task has no sockets (WASI preview 1 has none), so it "
                "cannot be granted egress; run it as a Docker task to reach the network",
                field="network",
            )
        limits = self._default_limits
        resolved = self._limits
        if task.limits.model_fields_set or task.deterministic:
            resolved = task.effective_limits(self._limits.merged(task.limits))
            limits = wasm_limits(resolved, deterministic=task.deterministic)
            self._warn_ignored_limits(task)
        files = read_inputs(task)
        check_input_bytes(len(task.input) + sum(map(len, files.values())), resolved)
        module, sha = self._modules.load(task)
        seed = spec = None
        if task.deterministic or task.cacheable:
            spec = digest(self.spec_document(task, resolved, program=sha, inputs=files))
        if task.deterministic:
            # Seeded from the task itself: the same task sees the same clocks and random bytes.
            assert spec is not None
            seed = hashlib.sha256(b"parity-sandbox/seed/v1\0" + bytes.fromhex(spec)).digest()
        # The file's name is the host's business: a task whose result may be reused sees a
        # fixed argv[0], so that only what its spec hash covers can shape its output.
        named = task.wasm_file is not None and not (task.deterministic or task.cacheable)
        argv0 = task.wasm_file.name if named and task.wasm_file else "task.wasm"
        request = RunRequest(
            seq=next(self._seq),
            module_sha256=sha,
            module=None,
            argv=(argv0, *task.args),
            env=tuple(task.env.items()),
            stdin=task.input,
            input_files=files,
            outputs=task.outputs,
            limits=limits,
            output_caps=_output_caps(resolved.output_files_or_default),
            seed=seed,
            spec_hash=spec,
            entry=task.entry,
            entry_exit=task.entry_exit,
            workdir=task.workdir,
            mounts=tuple(sorted(task.mounts.items())),
        )
        return PreparedTask(
            task,
            "wasm",
            resolved,
            sha,
            files,
            form=Form(request, module),
            known_spec_hash=spec,
            audit=self.audit,
            metrics=self.metrics,
        )

    def _dispatch(self, flight: Flight, cancel: threading.Event | None) -> Flight:
        """Send ``flight``; if its (idle) worker turns out dead, once more on a fresh one."""
        for attempt in range(2):
            try:
                self._send(flight)
                return flight
            except OSError:
                self._pool.discard(flight.worker)
                if attempt:
                    raise RuntimeUnavailable("wasm workers die before they run a task") from None
                flight.worker = self._pool.acquire(cancel)
            except BaseException:
                self._pool.discard(flight.worker)
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _needs_module(flight: Flight) -> bool:
        """Whether the flight's worker may lack its module (so the bytes go along)."""
        request = flight.request
        return (request.limits.engine_key, request.module_sha256) not in flight.worker.modules

    def _send(self, flight: Flight) -> None:
        """Send the flight's request, with the module's bytes if its worker may lack them."""
        flight.worker.ensure_ready()
        if self._needs_module(flight):
            flight.request = replace(flight.request, module=flight.module)
            flight.worker.modules.add(
                (flight.request.limits.engine_key, flight.request.module_sha256)
            )
        flight.worker.conn.send_bytes(encode(flight.request))

    def _watch(self, flight: Flight, *, queued: bool) -> None:
        """Hand a flight just sent to the deadline thread."""
        compiles = flight.request.module is not None
        bound = None if queued else flight.request.limits.timeout + KILL_GRACE + COMPILE_TIMEOUT
        self._deadlines.watch(flight, starts_now=not queued and not compiles, bound=bound)

    def _receive(self, flight: Flight) -> RunReply | None:
        """Take one message from the flight's worker; the reply once it is final."""
        try:
            message = decode(flight.worker.conn.recv_bytes())
        except (EOFError, OSError):
            return self._after_death(flight)
        except ValueError as exc:
            # Garbage from a worker means it is not ours any more: it dies, the task errs.
            flight.worker.kill()
            return RunReply(seq=flight.request.seq, outcome="error", message=f"worker: {exc}")
        if isinstance(message, NeedModule):
            flight.request = replace(flight.request, module=flight.module)
            try:
                flight.worker.conn.send_bytes(encode(flight.request))
            except OSError:
                return self._after_death(flight)
            self._watch(flight, queued=False)
            return None
        assert isinstance(message, RunReply) and message.seq == flight.request.seq
        return message

    def _after_death(self, flight: Flight) -> RunReply:
        """The flight's worker died. Killed at the flight's deadline: a timeout. Killed by
        itself because the workspace outgrew the disk cap: a disk limit. Killed for another
        flight's deadline: ``requeue`` (this one never ran, or barely). Otherwise: a crash."""
        worker, request = flight.worker, flight.request
        detail = worker.describe_death()
        timeout = request.limits.timeout
        if flight.expired:
            outcome, limit = "timeout", None
            message = f"task exceeded its {timeout:g} s timeout and was killed"
        elif worker.read_violation() == request.seq:
            outcome, limit = "limit", "disk"
            message = f"disk limit reached: the workspace outgrew {request.limits.disk} bytes"
        elif worker.deadline_killed:
            return RunReply(seq=request.seq, outcome="requeue")
        else:
            message = f"the task crashed its worker: {detail}"
            return RunReply(seq=request.seq, outcome="error", message=message, lost=True)
        cap = request.limits.output
        stdout, stdout_truncated = worker.read_output(0, cap)
        stderr, stderr_truncated = worker.read_output(1, cap)
        not_followed = NotFollowed()
        files, files_truncated = collect_outputs(
            worker.root / "work", request.outputs, request.output_caps, not_followed
        )
        seq, started = worker.read_start()
        return RunReply(
            seq=request.seq,
            outcome=outcome,
            limit=limit,
            message=message,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=stdout_truncated,
            stderr_truncated=stderr_truncated,
            files=files,
            files_truncated=files_truncated,
            duration=time.monotonic() - started if seq == request.seq else timeout,
            not_followed=not_followed.count,
            not_followed_paths=tuple(not_followed.paths),
        )

    def _settle(self, flight: Flight, reply: RunReply) -> Result:
        """Stop the flight's deadline; mark its worker dead if it must not run again."""
        self._deadlines.finish(flight)
        if flight.expired or reply.outcome in ("error", "timeout") or flight.worker.exited:
            flight.worker.dead = True
        return self._to_result(flight, reply)

    def _to_result(self, flight: Flight, reply: RunReply) -> Result:
        invalid = reply.outcome == "invalid"
        task = flight.prepared.task
        status = _STATUS.get(reply.outcome)
        if status is None:
            status = Status.SUCCEEDED if reply.exit_code == 0 else Status.FAILED
        report = RunReport(
            status=status,
            runtime={
                "name": "wasm",
                "version": f"wasmtime {flight.worker.version}",
                "module_sha256": flight.request.module_sha256,
            },
            exit_code=reply.exit_code,
            stdout=reply.stdout,
            stderr=reply.stderr,
            stdout_truncated=reply.stdout_truncated,
            stderr_truncated=reply.stderr_truncated,
            files=reply.files,
            files_truncated=reply.files_truncated,
            duration=reply.duration,
            cpu_time=reply.cpu_time,
            peak_memory=reply.peak_memory,
            fuel_used=reply.fuel_used,
            limit=cast("LimitName | None", reply.limit),  # Result's validation checks it
            message=reply.message,
            error_type="InvalidInput" if invalid else None,
            # The worker rejects only the module (its bytes are not a WASI command).
            rejected_field=("wasm_file" if task.wasm_file is not None else "wasm_module")
            if invalid
            else None,
            trapped=reply.outcome == "trap",
            worker_lost=bool(reply.lost),
            not_followed=int(reply.not_followed or 0),
            not_followed_paths=reply.not_followed_paths or (),
        )
        return flight.prepared.result(report)

    def _close(self) -> None:
        self._release()


def _release(deadlines: Deadlines, pool: Pool, root: Path, lock_fd: int) -> None:
    """Stop the deadline thread, kill the workers, remove the root (once)."""
    deadlines.close()
    pool.close()
    try:
        remove_tree(root)
    finally:
        os.close(lock_fd)
