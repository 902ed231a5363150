"""The server's side of the queue: takes queued tasks from the store and runs them.

One :class:`Dispatcher` per ``serve`` process, on the server's event loop. It runs up to
``concurrency`` tasks at a time, each through its runtime's executor (``execute_async``:
cancelling the await stops the task), and ends it in the store with its result. A task comes
to it in one of two ways: a request that finds a free slot (``take_slots``) stores its task
already running here and hands it over (``run_here``) with the task it parsed, so nothing is read
back; otherwise the claim loop takes queued tasks from the store (so several servers on one
PostgreSQL store share the work). Ends are written in batches, one transaction for all the
runs that ended meanwhile, and a request waiting for a task gets its end from memory. It renews
the leases of what it runs, acts on cancellations asked of any server, and wakes the requests
that wait for a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from parity_sandbox import runtimes
from parity_sandbox._config import Config
from parity_sandbox._exceptions import SandboxError
from parity_sandbox._executor import Executor, PreparedTask
from parity_sandbox._models import Result, Status, Task
from parity_sandbox._record import task_from_document
from parity_sandbox.audit import AuditLog
from parity_sandbox.metrics import Metrics
from parity_sandbox.runtimes import executor_class
from parity_sandbox.service.store import Finish, Store, TaskRow
from parity_sandbox.service.webhooks import Deliverer

log = logging.getLogger("parity_sandbox.service")

#: Seconds between looks at the store when nothing woke the dispatcher (tasks queued by
#: another server, cancellations asked there).
POLL = 0.5
#: How many ended tasks a dispatcher remembers (``_recent``), and the most bytes of their
#: results it keeps (a request that waits for one of them gets it without reading the store).
RECENT = 10_000
RECENT_BYTES = 16 << 20
#: While this many tasks run here, ends are gathered for ``GATHER`` seconds before they are
#: written together (a lone task's end is written at once).
GATHER_AT = 8
GATHER = 0.002
#: How many queued tasks a dispatcher keeps as parsed (``_parsed``).
PARSED = 4096
#: Slots that free before a claim looks for queued tasks (fewer where there are few slots).
CLAIM_AT_ONCE = 8
#: Most threads the dispatcher's pool starts (they start as needed).
THREADS = 256


#: Minutes of security events the dashboard's timeline keeps.
TIMELINE_MINUTES = 60


class Timeline:
    """Security events of the tasks that ended here, counted per minute and kind, for the
    last ``TIMELINE_MINUTES`` minutes (what the dashboard's chart shows)."""

    def __init__(self, minutes: int = TIMELINE_MINUTES) -> None:
        self.minutes = minutes
        self._buckets: deque[tuple[int, Counter[str]]] = deque()

    def add(self, kinds: list[str], now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        if not self._buckets or self._buckets[-1][0] != minute:
            self._buckets.append((minute, Counter()))
            while self._buckets and self._buckets[0][0] <= minute - self.minutes:
                self._buckets.popleft()
        self._buckets[-1][1].update(kinds)

    def series(self, now: float | None = None) -> dict[str, Any]:
        """``{"minutes": [epoch seconds of each minute], "counts": {kind: [per minute]}}``."""
        last = int((time.time() if now is None else now) // 60)
        minutes = list(range(last - self.minutes + 1, last + 1))
        index = {minute: at for at, minute in enumerate(minutes)}
        counts: dict[str, list[int]] = {}
        for minute, bucket in self._buckets:
            if minute in index:
                for kind, count in bucket.items():
                    counts.setdefault(kind, [0] * len(minutes))[index[minute]] += count
        return {"minutes": [minute * 60 for minute in minutes], "counts": counts}


@dataclass
class _Waiting:
    """The requests waiting for one task, and its end once it ended here."""

    ended: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0
    row: TaskRow | None = None


class Dispatcher:
    """Runs the store's queued tasks: per runtime, as many at once as its executor takes in
    flight (``Executor.max_in_flight``), or ``service.concurrency`` for all together."""

    def __init__(
        self,
        store: Store,
        config: Config,
        owner: str,
        *,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.owner = owner
        #: Where the executors write task ends and the service its actions (``None``: the
        #: executors open what ``config.audit`` says).
        self.audit = audit
        #: What the executors and the service count (``None``: no metrics).
        self.metrics = metrics
        #: Security events of the tasks that ended here, per minute (the dashboard's).
        self.timeline = Timeline()
        #: API keys' names by id (metrics name keys, not ids), filled as tasks end.
        self._key_names: dict[str, str] = {}
        settings = config.service
        #: One cap for all runtimes together, if the operator set one.
        self._limit = settings.concurrency
        self._executors: dict[str, Executor] = {}
        self._making: dict[str, asyncio.Lock] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        #: Slots in use per runtime: tasks running here, and slots promised to requests that
        #: are storing tasks to run here.
        self._busy: Counter[str] = Counter()
        self._waiters: dict[str, _Waiting] = {}
        #: Runs that ended, to be written (``_finish_loop``), with the row each ran as.
        self._ends: list[tuple[Finish, TaskRow]] = []
        self._ends_due = asyncio.Event()
        self._finisher: asyncio.Task[None] | None = None
        #: Tasks queued by this server's requests, as parsed: a claim here need not parse
        #: their records again. Bounded (``PARSED``); another server may claim them.
        self._parsed: OrderedDict[str, Task] = OrderedDict()
        #: Tasks that ended here lately, by id, as they ended (``None``: the store has it): a
        #: request that waits for one returns at once.
        self._recent: OrderedDict[str, TaskRow | None] = OrderedDict()
        self._recent_bytes = 0
        self._wake = asyncio.Event()
        #: The runtimes the store may hold queued tasks of (``None``: any, under one cap for
        #: all): a slot that frees looks for them only then (otherwise the claim loop looks
        #: every ``POLL``, for other servers' tasks).
        self._queued: set[str | None] = {None, *runtimes.names()}
        #: Set when a task ends here: its webhook may be due.
        self._deliveries_due = asyncio.Event()
        self._deliverer: Deliverer | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        # Threads start as needed: Docker tasks, and tasks that may come from the result
        # cache, wait in one each; PostgreSQL's statements run in them.
        self._threads = ThreadPoolExecutor((self._limit or THREADS) + 8, "parity-sandbox-service")
        #: Whether the default runtime's executor started (``/readyz``).
        self.ready = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # ``execute_async`` runs each task's wait in the loop's default executor.
        loop.set_default_executor(self._threads)
        try:
            await self._executor(self.config.default_runtime)
            self.ready = True
        except SandboxError as exc:
            log.warning("the %s runtime is not usable: %s", self.config.default_runtime, exc)
        if "docker" in runtimes.names() and "docker" not in self._executors:
            # A Docker executor removes, as it starts, the containers of dead processes: a
            # server killed while it ran Docker tasks leaves some.
            with contextlib.suppress(SandboxError):
                await self._executor("docker")
        self._deliverer = Deliverer(self.store, self.config.service.webhooks)
        self._finisher = asyncio.create_task(self._finish_loop(), name="finish")
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim"),
            asyncio.create_task(self._lease_loop(), name="lease"),
            asyncio.create_task(self._deliverer.run(self._deliveries_due), name="webhooks"),
        ]

    async def stop(self) -> None:
        """Stop claiming; stop the tasks running here (their rows stay ``running``, so a
        restart recovers them as its configuration says); close the executors."""
        self._stopping = True
        for task in [*self._loops, *self._running.values()]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._running.values(), return_exceptions=True)
        if self._finisher is not None:  # the ends known so far are written, then it stops
            self._ends_due.set()
            self._finisher.cancel()
            await asyncio.gather(self._finisher, return_exceptions=True)
        if self._deliverer is not None:
            await self._deliverer.close()
        for executor in self._executors.values():
            await asyncio.to_thread(executor.close)
        self._threads.shutdown(wait=False, cancel_futures=True)

    def wake(self, runtime: str | None = None) -> None:
        """A task of ``runtime`` (``None``: of any) was queued: claim now rather than at the
        next poll."""
        self._queued.update((runtime, None) if runtime else (None, *runtimes.names()))
        self._wake.set()

    def _slot_freed(self, runtime: str) -> None:
        """A slot for ``runtime`` is free: claim if tasks may be queued, once a few slots are
        free together (a claim is a transaction; the claim loop's poll takes stragglers)."""
        if runtime in self._queued or (self._limit is not None and None in self._queued):
            enough = min(CLAIM_AT_ONCE, max(1, self._capacity(runtime) // 8))
            if self.free(runtime) >= enough:
                self._wake.set()

    def _capacity(self, runtime: str) -> int:
        """Slots for tasks of ``runtime`` (all runtimes' under one cap, if there is one)."""
        if self._limit is not None:
            return self._limit
        executor = self._executors.get(runtime)
        return executor.max_in_flight() if executor is not None else 2

    def free(self, runtime: str) -> int:
        """Slots free for tasks of ``runtime``."""
        if self._limit is not None:
            return self._limit - sum(self._busy.values())
        return self._capacity(runtime) - self._busy[runtime]

    def take_slots(self, runtime: str, wanted: int) -> int:
        """Promise up to ``wanted`` free slots for ``runtime`` tasks to a request that stores
        them to run here at once (``Store.add_task(run_as=owner)``). It gives each back with
        ``run_here`` or ``give_back``."""
        if self._stopping or not self.ready:
            return 0
        taken = max(0, min(wanted, self.free(runtime)))
        self._busy[runtime] += taken
        return taken

    def give_back(self, runtime: str, count: int) -> None:
        """Slots promised by ``take_slots`` that the request does not use."""
        self._busy[runtime] -= count
        if count:
            self._slot_freed(runtime)

    def queued_here(self, row: TaskRow, task: Task) -> None:
        """``row`` was queued by a request here that parsed it as ``task``."""
        self._parsed[row.id] = task
        while len(self._parsed) > PARSED:
            self._parsed.popitem(last=False)
        self.wake(row.runtime)

    def run_here(self, row: TaskRow, task: Task) -> None:
        """Run ``row``, stored as running here, as ``task`` (in a slot ``take_slots`` gave);
        where its executor can, the run begins now (``start_async``), not at the loop's next
        turn."""
        begun = self._begin(row, task)
        self._running[row.id] = asyncio.create_task(self._run(row, task, begun), name=row.id)

    def _begin(self, row: TaskRow, task: Task) -> Coroutine[Any, Any, Result] | None:
        executor = self._executors.get(row.runtime)
        if executor is None or not executor.prepares_on_loop:
            return None
        try:
            prepared = executor.prepare(task, principal=row.key_id, accepted_at=row.created_at)
            return executor.start_async(prepared, use_cache=row.use_cache)
        except SandboxError:
            return None  # _run prepares it again, and ends it with the error

    def cancel(self, task_id: str) -> None:
        """Stop the task ``task_id`` if it runs here."""
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()

    async def wait(self, task_id: str, timeout: float) -> TaskRow | None:
        """Return when the task has ended (here or on another server), or after ``timeout``;
        the ended task if it ended here (``None``: read it from the store)."""
        if task_id in self._recent:
            return self._recent[task_id]
        waiting = self._waiters.setdefault(task_id, _Waiting())
        waiting.count += 1
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, POLL)):
                        await waiting.ended.wait()
                if waiting.ended.is_set():
                    return waiting.row
                if await self.store.run(self._ended, task_id):
                    return None
        finally:
            waiting.count -= 1
            if waiting.count == 0 and self._waiters.get(task_id) is waiting:
                del self._waiters[task_id]

    def _ended(self, task_id: str) -> bool:
        state = self.store.state(task_id)
        return state is None or state not in ("queued", "running")

    # -- the loops -------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            # Cleared before the claim: a task queued while it runs wakes the next round.
            self._wake.clear()
            # One cap for all: one claim; else one per runtime, up to its free slots.
            wanted = (
                {None: self.free("")}
                if self._limit is not None
                else {name: self.free(name) for name in runtimes.names()}
            )
            full = False
            for runtime, free in wanted.items():
                if free <= 0:
                    continue
                self._queued.discard(runtime)  # as _wake: a task queued meanwhile adds it
                try:
                    rows = await self.store.run(self.store.claim, self.owner, free, runtime)
                except Exception:  # the store is down for a moment: try again later
                    self._queued.add(runtime)
                    log.exception("cannot claim tasks")
                    break
                for row in rows:
                    self._busy[row.runtime] += 1
                    self._running[row.id] = asyncio.create_task(self._run(row), name=row.id)
                if rows and len(rows) == free:
                    self._queued.add(runtime)
                    full = True
            if full:
                continue  # more may be queued
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)

    async def _lease_loop(self) -> None:
        """Renew this server's leases, act on cancellations asked of other servers, and
        recover the tasks of servers whose leases ran out (they died)."""
        loop = asyncio.get_running_loop()
        renewed = recovered = loop.time()
        settings = self.config.service
        while True:
            await asyncio.sleep(POLL)
            try:
                now = loop.time()
                if self._running and now - renewed >= self.store.lease / 6:
                    await asyncio.to_thread(self.store.renew, self.owner)
                    renewed = now
                await asyncio.to_thread(self.store.checkpoint)
                for task_id in await asyncio.to_thread(self.store.cancel_requested, self.owner):
                    self.cancel(task_id)
                if now - recovered >= self.store.lease / 3:
                    recovered = now
                    counts = await asyncio.to_thread(
                        lambda: self.store.recover(
                            retry=settings.on_restart == "retry",
                            max_attempts=settings.max_attempts,
                        )
                    )
                    if counts["requeued"]:
                        self.wake()
            except Exception:
                log.exception("cannot renew leases")

    # -- one task --------------------------------------------------------------------------

    async def _run(
        self,
        row: TaskRow,
        task: Task | None = None,
        begun: Coroutine[Any, Any, Result] | None = None,
    ) -> None:
        state, blob, reason, cpu = "error", None, None, None
        try:
            try:
                if begun is not None:
                    result = await begun
                else:
                    if task is None:
                        task = await self._task_of(row)
                    executor = await self._executor(row.runtime)
                    prepared = await self._prepare(executor, task, row)
                    result = await executor.execute_async(prepared, use_cache=row.use_cache)
            except SandboxError as exc:
                result = exc.result or Result(
                    status=Status.ERROR,
                    error={"type": type(exc).__name__, "message": exc.message},
                )
            state, blob = result.status.value, result.to_json().encode()
            cpu = result.usage.cpu_time
            if result.events:
                self.timeline.add([event.kind.value for event in result.events])
            if self.metrics is not None and (result.events or cpu):
                self.metrics.key_ended(await self._key_name(row.key_id), result)
        except asyncio.CancelledError:
            if self._stopping:
                raise  # the row stays running: recovered when a server starts
            state, reason = "cancelled", "cancelled while it ran"
        except Exception as exc:  # a defect: the task ends as an error, the server goes on
            log.exception("task %s failed in the dispatcher", row.id)
            state, reason = "error", f"internal error: {type(exc).__name__}"
        finally:
            if not self._stopping:
                self._running.pop(row.id, None)
                self._busy[row.runtime] -= 1
                self._slot_freed(row.runtime)
        end = Finish(row.id, self.owner, state, blob, reason, cpu, row.callback_url is not None)
        self._ends.append((end, row))
        self._ends_due.set()

    async def _prepare(self, executor: Executor, task: Task, row: TaskRow) -> PreparedTask:
        """``task`` prepared for ``executor``, as asked for by ``row``'s key and accepted when
        ``row`` was stored; on the loop where preparing a task from a record blocks on
        nothing (WASM), else in a thread (Docker asks its daemon about the image)."""
        if executor.prepares_on_loop:
            return executor.prepare(task, principal=row.key_id, accepted_at=row.created_at)
        return await asyncio.to_thread(
            executor.prepare, task, principal=row.key_id, accepted_at=row.created_at
        )

    async def _key_name(self, key_id: str) -> str:
        name = self._key_names.get(key_id)
        if name is None:
            found = await asyncio.to_thread(self.store.list_keys)
            self._key_names.update((key.id, key.name) for key in found)
            name = self._key_names.get(key_id, key_id)
        return name

    async def _task_of(self, row: TaskRow) -> Task:
        """The task a claimed row holds, with the module its record names by hash."""
        parsed = self._parsed.pop(row.id, None)
        if parsed is not None:
            return parsed
        assert row.task is not None  # claim reads it
        document = json.loads(row.task)
        digest = document.pop("wasm_module_sha256", None)
        if digest is None:
            return task_from_document(document)
        module = self.store.cached_module(row.key_id, digest)
        if module is None:
            module = await self.store.run(self.store.module_of, row.key_id, digest)
        if module is None:  # stores keep modules for ever: only a damaged one gets here
            raise SandboxError(f"the task's module {digest} is not in the store")
        return task_from_document(document, wasm_module=module)

    async def _finish_loop(self) -> None:
        """Write the ends of runs, all that ended meanwhile in one transaction, then wake
        the requests waiting for them (with the ended task) and the webhook sender."""
        while True:
            try:
                await self._ends_due.wait()
            except asyncio.CancelledError:
                if self._ends:
                    await self._write_ends()
                raise
            self._ends_due.clear()
            if len(self._running) >= GATHER_AT:
                # Busy: more ends come within moments; one transaction writes them together.
                await asyncio.sleep(GATHER)
            await self._write_ends()

    async def _write_ends(self) -> None:
        ends, self._ends = self._ends, []
        if not ends:
            return
        finished = [end for end, _ in ends]
        now = time.time()
        for attempt in range(1, 6):
            try:
                done = await self.store.run(self.store.finish_many, finished, now)
                break
            except Exception:  # the store is down for a moment: try again
                log.exception("cannot store the ends of %d tasks", len(finished))
                if attempt == 5:  # their rows stay running: a recovery runs them again
                    done = [False] * len(finished)
                    break
                await asyncio.sleep(attempt)
        for (end, row), ok in zip(ends, done, strict=True):
            ended = None
            if ok:
                ended = replace(
                    row,
                    task=None,
                    state=end.state,
                    result=end.result,
                    reason=end.reason,
                    ended_at=now,
                )
            self._remember(end.task_id, ended)
            waiting = self._waiters.get(end.task_id)
            if waiting is not None:
                waiting.row = ended
                waiting.ended.set()
        if any(row.callback_url for (_, row), ok in zip(ends, done, strict=True) if ok):
            self._deliveries_due.set()  # their webhooks are due

    def _remember(self, task_id: str, ended: TaskRow | None) -> None:
        """Keep a task that ended here, within ``RECENT`` and ``RECENT_BYTES``."""
        before = self._recent.pop(task_id, None)  # a task that ran again
        if before is not None and before.result is not None:
            self._recent_bytes -= len(before.result)
        if ended is not None and ended.result is not None:
            self._recent_bytes += len(ended.result)
        self._recent[task_id] = ended
        while len(self._recent) > RECENT or self._recent_bytes > RECENT_BYTES:
            _, old = self._recent.popitem(last=False)
            if old is not None and old.result is not None:
                self._recent_bytes -= len(old.result)

    async def _executor(self, runtime: str) -> Executor:
        """The executor of ``runtime``, made on first use (in a thread: Docker's start is
        slow). Raises ``SandboxError`` when the runtime cannot run here."""
        executor = self._executors.get(runtime)
        if executor is not None:
            return executor
        lock = self._making.setdefault(runtime, asyncio.Lock())
        async with lock:
            executor = self._executors.get(runtime)
            if executor is None:
                cls = _backend_class(self.config, runtime)
                monitoring: dict[str, Any] = {}
                if self.audit is not None:
                    monitoring["audit"] = self.audit
                if self.metrics is not None:
                    monitoring["metrics"] = self.metrics
                try:
                    executor = await asyncio.to_thread(cls, self.config, **monitoring)
                except SandboxError:
                    if self.metrics is not None:
                        self.metrics.set_runtime_up(runtime, False)
                    raise
                if self.metrics is not None:
                    self.metrics.set_runtime_up(runtime, True)
                self._executors[runtime] = executor
        return executor

    @property
    def running_here(self) -> int:
        """Tasks this server runs now."""
        return len(self._running)


def _backend_class(config: Config, runtime: str) -> Callable[..., Executor]:
    """What makes the executor of ``runtime``: its class here, or (``service.backend`` is
    ``ray://HOST:PORT``) a ``RayExecutor`` on that cluster, which runs every runtime."""
    backend = config.service.backend
    if backend == "local":
        return executor_class(runtime)
    from parity_sandbox.cluster.executor import RayExecutor

    return functools.partial(_ray_executor, RayExecutor, backend.removeprefix("ray://"))


def _ray_executor(cls: Any, address: str, config: Config, **monitoring: Any) -> Executor:
    executor: Executor = cls(address, config=config, **monitoring)
    return executor
