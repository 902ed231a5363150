"""The server's side of the queue: takes queued tasks from the store and runs them.

One :class:`Dispatcher` per ``serve`` process, on the server's event loop. It claims up to
``concurrency`` tasks at a time (so several servers on one PostgreSQL store share the work),
runs each through its runtime's executor (``execute_async``: cancelling the await stops the
task), and ends it in the store with its result. It renews the leases of what it runs, acts on
cancellations asked of any server, and wakes the requests that wait for a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from parity_sandbox import runtimes
from parity_sandbox._config import Config
from parity_sandbox._exceptions import SandboxError
from parity_sandbox._executor import Executor
from parity_sandbox._models import Result, Status
from parity_sandbox._record import task_from_document
from parity_sandbox.runtimes import executor_class
from parity_sandbox.service.store import Store, TaskRow
from parity_sandbox.service.webhooks import Deliverer

log = logging.getLogger("parity_sandbox.service")

#: Seconds between looks at the store when nothing woke the dispatcher (tasks queued by
#: another server, cancellations asked there).
POLL = 0.5


class Dispatcher:
    """Runs the store's queued tasks, up to ``concurrency`` at once."""

    def __init__(self, store: Store, config: Config, owner: str) -> None:
        self.store = store
        self.config = config
        self.owner = owner
        settings = config.service
        self.capacity = settings.concurrency or max(2, 2 * (os.cpu_count() or 1))
        self._executors: dict[str, Executor] = {}
        self._making: dict[str, asyncio.Lock] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        #: Task id -> [event set when it ends here, requests waiting on it].
        self._waiters: dict[str, tuple[asyncio.Event, list[int]]] = {}
        self._wake = asyncio.Event()
        #: Set when a task ends here: its webhook may be due.
        self._deliveries_due = asyncio.Event()
        self._deliverer: Deliverer | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._threads = ThreadPoolExecutor(self.capacity + 4, "parity-sandbox-service")
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
        if self._deliverer is not None:
            await self._deliverer.close()
        for executor in self._executors.values():
            await asyncio.to_thread(executor.close)
        self._threads.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """A task was queued: claim now rather than at the next poll."""
        self._wake.set()

    def cancel(self, task_id: str) -> None:
        """Stop the task ``task_id`` if it runs here."""
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()

    async def wait(self, task_id: str, timeout: float) -> None:
        """Return when the task has ended (here or on another server), or after ``timeout``."""
        event, count = self._waiters.setdefault(task_id, (asyncio.Event(), [0]))
        count[0] += 1
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, POLL))
                if event.is_set() or await asyncio.to_thread(self._ended, task_id):
                    return
        finally:
            count[0] -= 1
            if count[0] == 0 and self._waiters.get(task_id, (None,))[0] is event:
                del self._waiters[task_id]

    def _ended(self, task_id: str) -> bool:
        state = self.store.state(task_id)
        return state is None or state not in ("queued", "running")

    # -- the loops -------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            # Cleared before the claim: a task queued while it runs wakes the next round.
            self._wake.clear()
            free = self.capacity - len(self._running)
            rows: list[TaskRow] = []
            if free > 0:
                try:
                    rows = await asyncio.to_thread(self.store.claim, self.owner, free)
                except Exception:  # the store is down for a moment: try again later
                    log.exception("cannot claim tasks")
            for row in rows:
                self._running[row.id] = asyncio.create_task(self._run(row), name=row.id)
            if rows and len(rows) == free:
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

    async def _run(self, row: TaskRow) -> None:
        state, blob, reason, cpu = "error", None, None, None
        try:
            try:
                assert row.task is not None  # claim reads it
                task = task_from_document(json.loads(row.task))
                executor = await self._executor(row.runtime)
                result = await executor.execute_async(task, use_cache=row.use_cache)
            except SandboxError as exc:
                result = exc.result or Result(
                    status=Status.ERROR,
                    error={"type": type(exc).__name__, "message": exc.message},
                )
            state, blob = result.status.value, result.to_json().encode()
            cpu = result.usage.cpu_time
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
                self._wake.set()  # a slot is free
        try:
            await asyncio.to_thread(self.store.finish, row.id, self.owner, state, blob, reason, cpu)
        finally:
            waiting = self._waiters.get(row.id)
            if waiting is not None:
                waiting[0].set()
            self._deliveries_due.set()

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
                cls = executor_class(runtime)
                executor = await asyncio.to_thread(cls, self.config)
                self._executors[runtime] = executor
        return executor
