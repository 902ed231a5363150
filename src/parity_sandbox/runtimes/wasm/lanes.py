"""WASM tasks from one event loop on the executor's workers, with no thread per task.

Each worker the loop holds has a lane: the flight it runs (the head) and, behind it, the next
one, already sent, so that a worker need not wait for a busy loop between two tasks. The loop
reads a worker's replies when its socket is readable. What waits behind a head follows the same
rules as ``WasmExecutor.map``'s lanes: its deadline counts from the moment its worker starts it,
and if the worker dies for the head's sake (a timeout, a crash), it runs again on another worker.
Only a request that needs no module and fits in a socket's buffer is sent to a busy worker:
sending any other would block the loop until the worker reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from parity_sandbox._exceptions import RuntimeUnavailable
from parity_sandbox._executor import PreparedTask
from parity_sandbox._models import Result
from parity_sandbox.runtimes.wasm.deadlines import Deadlines, Flight
from parity_sandbox.runtimes.wasm.pool import Pool, Worker
from parity_sandbox.runtimes.wasm.protocol import RunReply, RunRequest

#: Flights a worker holds at once: the one it runs and those sent behind it (enough to keep
#: it busy through a moment of the loop's serving requests).
DEPTH = 4
#: The most input bytes (stdin and files) of a request sent to a busy worker.
QUEUE_BYTES = 64 * 1024
#: Seconds between looks at the lanes: for a worker killed with its socket closed under the
#: loop (no event comes), and for tasks stuck behind a long one.
PATROL = 0.05
#: Seconds a head runs before the tasks behind it move to a worker that idles, if one does.
MOVE_AFTER = 0.1


class Host(Protocol):
    """What the lanes use of their executor (``WasmExecutor``)."""

    _pool: Pool
    _deadlines: Deadlines

    @property
    def closed(self) -> bool: ...

    def _send(self, flight: Flight) -> None: ...

    def _watch(self, flight: Flight, *, queued: bool) -> None: ...

    def _receive(self, flight: Flight) -> RunReply | None: ...

    def _settle(self, flight: Flight, reply: RunReply) -> Result: ...

    @staticmethod
    def _needs_module(flight: Flight) -> bool: ...


@dataclass(eq=False)
class Wanted:
    """A task that waits for its run: not sent yet (``flight`` is ``None``), or in a lane."""

    prepared: PreparedTask
    request: RunRequest
    module: bytes = field(repr=False)
    future: asyncio.Future[tuple[Result, str]]
    flight: Flight | None = None
    #: Its awaiter was cancelled (or it moved to another worker) after it was sent behind
    #: another flight: its worker dies once it starts it.
    abandoned: bool = False
    #: When it became its lane's head (monotonic; 0: not yet).
    head_since: float = 0.0


class Lanes:
    """The workers one event loop drives, and the tasks waiting for one (first come, first
    served). Used only on that loop."""

    def __init__(self, host: Host, loop: asyncio.AbstractEventLoop) -> None:
        self._host = host
        self._loop = loop
        self._waiting: deque[Wanted] = deque()
        self._lanes: dict[Worker, deque[Wanted]] = {}
        #: Whether a callback waits for a worker of the pool (others hold all of them).
        self._asked = False
        self._patrol: asyncio.TimerHandle | None = None
        #: Workers being started (the loop keeps only weak references to its tasks).
        self._starting: set[asyncio.Task[None]] = set()

    def submit(self, prepared: PreparedTask, request: RunRequest, module: bytes) -> Wanted:
        """Queue one task, sent to a worker at once if one can take it; ``wait`` for it."""
        wanted = Wanted(prepared, request, module, self._loop.create_future())
        self._waiting.append(wanted)
        self._fill()
        return wanted

    async def wait(self, wanted: Wanted) -> tuple[Result, str]:
        """The result of a task ``submit`` queued, and the outcome its worker told.
        Cancelling the await stops the task (its worker dies if it started it)."""
        try:
            return await wanted.future
        except asyncio.CancelledError:
            self._abandon(wanted)
            raise

    # -- giving flights to workers ---------------------------------------------------------

    def _fill(self) -> bool:
        """Send waiting tasks to workers while some can take them; whether it took a worker
        from the pool."""
        took = False
        while self._waiting:
            wanted = self._waiting[0]
            worker = self._idle_lane()
            if worker is None:
                try:
                    worker = self._host._pool.try_acquire()
                except RuntimeUnavailable as exc:  # closed
                    self._fail_waiting(exc)
                    return took
                if worker is not None:
                    took = True
                    if not worker.version:  # a new worker: its start takes a while
                        self._waiting.popleft()
                        starting = self._loop.create_task(self._start(worker, wanted))
                        self._starting.add(starting)
                        starting.add_done_callback(self._starting.discard)
                        continue
                    self._open(worker)
            if worker is None:
                worker = self._busy_lane(wanted)
            if worker is None:
                self._ask_pool()
                return took
            self._waiting.popleft()
            self._send(worker, wanted)
        for worker in [worker for worker, lane in self._lanes.items() if not lane]:
            self._close_idle(worker)  # nothing waits: back to the pool
        return took

    def _idle_lane(self) -> Worker | None:
        return next((worker for worker, lane in self._lanes.items() if not lane), None)

    def _busy_lane(self, wanted: Wanted) -> Worker | None:
        """A lane with room behind its head for ``wanted``, if ``wanted`` may wait there."""
        if wanted.prepared.input_bytes > QUEUE_BYTES:
            return None
        for worker, lane in self._lanes.items():
            if len(lane) < DEPTH and not lane[-1].abandoned and not worker.dead:
                probe = Flight(0, wanted.prepared, wanted.request, wanted.module, worker)
                if not self._host._needs_module(probe):
                    return worker
        return None

    def _ask_pool(self) -> None:
        """Be called when the pool may have a worker for us again."""
        if self._asked:
            return
        self._asked = True
        self._host._pool.on_free(self._pool_freed)

    def _pool_freed(self) -> None:
        """From any thread: the pool freed a worker, perhaps for us."""
        try:
            self._loop.call_soon_threadsafe(self._after_pool_freed)
        except RuntimeError:  # the loop is closed: the next waiter may have it
            self._host._pool.pass_on()

    def _after_pool_freed(self) -> None:
        self._asked = False
        if not self._fill():
            self._host._pool.pass_on()

    async def _start(self, worker: Worker, wanted: Wanted) -> None:
        """Start a new worker in a thread, then run ``wanted`` on it."""
        try:
            await asyncio.to_thread(worker.ensure_ready)
        except BaseException as exc:
            self._host._pool.discard(worker)
            if not wanted.future.done():
                if isinstance(exc, RuntimeUnavailable):
                    wanted.future.set_exception(exc)
                elif isinstance(exc, Exception):
                    wanted.future.set_exception(
                        RuntimeUnavailable(f"a wasm worker did not start: {exc}")
                    )
                else:
                    wanted.future.cancel()
            self._fill()
            if not isinstance(exc, Exception):
                raise
            return
        self._open(worker)
        if wanted.future.done():  # cancelled while the worker started
            self._close_idle(worker)
        else:
            self._send(worker, wanted)
        self._fill()

    def _open(self, worker: Worker) -> None:
        self._lanes[worker] = deque()
        self._loop.add_reader(worker.fd, self._readable, worker)
        if self._patrol is None:
            self._patrol = self._loop.call_later(PATROL, self._look)

    def _close(self, worker: Worker) -> deque[Wanted]:
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(worker.fd)
        lane = self._lanes.pop(worker)
        if not self._lanes and self._patrol is not None:
            self._patrol.cancel()
            self._patrol = None
        return lane

    def _close_idle(self, worker: Worker) -> None:
        """Give an idle lane's worker back to the pool, unless a task waits for it."""
        if not self._waiting:
            self._close(worker)
            self._host._pool.release(worker)

    def _send(self, worker: Worker, wanted: Wanted) -> None:
        lane = self._lanes[worker]
        flight = Flight(0, wanted.prepared, wanted.request, wanted.module, worker)
        try:
            self._host._send(flight)
        except OSError:
            # The worker died under us (its head's deadline, or a crash): this one never ran
            # and goes again; the reply of the head, if any, tells how that one ended.
            worker.dead = True
            self._waiting.appendleft(wanted)
            if not lane:
                self._retire(worker)
            return
        except BaseException as exc:  # RuntimeUnavailable from a worker that cannot start
            self._close(worker)
            self._host._pool.discard(worker)
            if isinstance(exc, Exception):
                wanted.future.set_exception(exc)
                return
            raise
        self._host._watch(flight, queued=bool(lane))
        wanted.flight = flight
        if not lane:
            wanted.head_since = time.monotonic()
        lane.append(wanted)

    def _fail_waiting(self, exc: RuntimeUnavailable) -> None:
        while self._waiting:
            wanted = self._waiting.popleft()
            if not wanted.future.done():
                wanted.future.set_exception(RuntimeUnavailable(exc.message))

    # -- replies ---------------------------------------------------------------------------

    def _readable(self, worker: Worker) -> None:
        lane = self._lanes.get(worker)
        if not lane:
            if lane is not None:  # an idle worker in a lane can only have died
                self._retire(worker)
                self._fill()
            return
        head = lane[0]
        assert head.flight is not None
        reply = self._host._receive(head.flight)
        if reply is None:
            return
        if reply.outcome == "requeue":  # killed for another flight's deadline
            self._retire(worker)
            self._fill()
            return
        lane.popleft()
        result = self._host._settle(head.flight, reply)
        if not head.future.done():
            head.future.set_result((result, reply.outcome))
        if worker.dead or (lane and lane[0].abandoned):
            self._retire(worker)
        elif lane:
            lane[0].head_since = time.monotonic()
        else:
            self._close_idle(worker)
        self._fill()

    def _look(self) -> None:
        """Every ``PATROL`` seconds while lanes are open: a worker that died or was closed
        without a readable event ends its flights now; tasks waiting behind a head that runs
        long move to a worker that idles."""
        self._patrol = self._loop.call_later(PATROL, self._look)
        closed = self._host.closed
        for worker in list(self._lanes):
            if worker in self._lanes and (closed or worker.dead or worker.exited):
                self._readable(worker)
        if not closed and not self._waiting:
            self._move_stuck()

    def _move_stuck(self) -> None:
        """Move the tasks behind a head that has run ``MOVE_AFTER`` seconds back to the front
        of the waiting line, if a worker idles: they cannot be taken back from their worker,
        so each leaves a ghost there, and the worker dies when it would start one."""
        stuck = [
            (worker, lane)
            for worker, lane in self._lanes.items()
            if len(lane) > 1
            and not lane[1].abandoned
            and lane[0].head_since
            and time.monotonic() - lane[0].head_since > MOVE_AFTER
        ]
        if not stuck or (self._idle_lane() is None and not self._host._pool.has_idle()):
            return
        moved: list[Wanted] = []
        for _worker, lane in stuck:
            for index in range(1, len(lane)):
                wanted = lane[index]
                if wanted.abandoned or wanted.future.done():
                    continue
                assert wanted.flight is not None
                self._host._deadlines.finish(wanted.flight)
                lane[index] = replace(wanted, abandoned=True)  # the ghost
                wanted.flight = None
                moved.append(wanted)
        self._waiting.extendleft(reversed(moved))
        self._fill()

    # -- ends that are not replies ---------------------------------------------------------

    def _retire(self, worker: Worker) -> None:
        """Kill a lane's worker; what waited behind its head (and a head that never ran) runs
        on another worker."""
        lane = self._close(worker)
        again = []
        for wanted in lane:
            if wanted.flight is not None:
                self._host._deadlines.finish(wanted.flight)
                wanted.flight = None
            if not wanted.abandoned and not wanted.future.done():
                again.append(wanted)
        self._waiting.extendleft(reversed(again))
        self._host._pool.discard(worker)

    def _abandon(self, wanted: Wanted) -> None:
        """Its awaiter was cancelled: it must not run, or must stop."""
        if wanted.flight is None:
            with contextlib.suppress(ValueError):
                self._waiting.remove(wanted)
            return
        worker = wanted.flight.worker
        lane = self._lanes.get(worker)
        if lane is None or wanted not in lane:
            return  # it ended
        if lane[0] is wanted:  # it runs (or is about to): its worker dies
            wanted.abandoned = True
            self._retire(worker)
            self._fill()
        else:  # it waits behind the head: the worker dies when it would start it
            wanted.abandoned = True
