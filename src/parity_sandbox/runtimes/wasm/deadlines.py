"""Tasks in flight on workers, and the thread that holds them to their deadlines."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from parity_sandbox._executor import PreparedTask
from parity_sandbox._models import Task
from parity_sandbox.runtimes.wasm.pool import Worker
from parity_sandbox.runtimes.wasm.protocol import RunRequest

#: Slack past a task's timeout before its worker is killed (covers the request's delivery).
KILL_GRACE = 0.05
#: How long a worker may take to compile a module it has not seen, on top of the timeout.
COMPILE_TIMEOUT = 60.0


@dataclass(eq=False)
class Form:
    """A prepared task's form in this runtime: its request and its module's bytes."""

    request: RunRequest
    module: bytes = field(repr=False)
    #: Counts its runs (``next`` is atomic): the first uses ``request`` as it is.
    runs: Iterator[int] = field(default_factory=itertools.count)


@dataclass(eq=False)
class Flight:
    """One task in flight on one worker."""

    index: int
    prepared: PreparedTask
    request: RunRequest
    module: bytes = field(repr=False)
    worker: Worker
    deadline: float = 0.0
    finished: bool = False
    expired: bool = False
    #: The host memory this task takes: its memory limit and the input bytes it brings.
    need: int = field(init=False)

    def __post_init__(self) -> None:
        self.need = self.request.limits.memory + self.prepared.input_bytes

    @property
    def task(self) -> Task:
        return self.prepared.task


class Deadlines:
    """A thread that kills the worker of any task still running at its deadline.

    A task's deadline counts from the moment its worker starts the guest, which the worker
    stamps in the memory it shares with the parent; time spent compiling the module (at most
    ``COMPILE_TIMEOUT``) or queued behind another task does not count. Deadlines hold whatever
    the waiting thread does (a ``map`` consumer may pause between results): this thread reads
    the stamps itself, every 20 ms while some task has not started, and kills on its own; the
    waiting side then sees the worker die and recovers the partial result.
    """

    _POLL = 0.02

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Flight]] = []
        self._order = itertools.count()
        self._unstarted: set[Flight] = set()
        self._stale = 0
        self._wake_at = math.inf
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._loop, name="parity-sandbox-deadlines", daemon=True).start()

    def watch(self, flight: Flight, *, starts_now: bool, bound: float | None) -> None:
        """Watch a flight just sent (or sent again).

        Args:
            flight: the flight.
            starts_now: its worker starts the guest at once (it is idle and holds the module),
                so the deadline is armed now, without waiting for the stamp.
            bound: otherwise, the most seconds from now it may take in all (compiling and
                running); ``None`` when it waits behind another flight that has a deadline.
        """
        with self._cond:
            if starts_now:
                self._arm(flight, time.monotonic() + flight.request.limits.timeout + KILL_GRACE)
                return
            self._unstarted.add(flight)
            if bound is not None:
                self._arm(flight, time.monotonic() + bound)
            self._wake_by(time.monotonic() + self._POLL)

    def finish(self, flight: Flight) -> None:
        """Stop watching ``flight`` (its reply is in, or it is being torn down)."""
        with self._cond:
            flight.finished = True
            self._unstarted.discard(flight)
            # Finished flights' entries wait in the heap until their deadline would have come
            # (30 s by default); sweep them once they are half of it, so it stays small.
            self._stale += 1
            if self._stale > 64 and 2 * self._stale > len(self._heap):
                self._heap = [e for e in self._heap if not e[2].finished and e[0] == e[2].deadline]
                heapq.heapify(self._heap)
                self._stale = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _arm(self, flight: Flight, deadline: float) -> None:
        flight.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), flight))
        self._wake_by(deadline)

    def _wake_by(self, moment: float) -> None:
        # Waking the thread costs a hand-off of the GIL (tens of microseconds per task if done
        # every time): only when it would otherwise sleep past ``moment``.
        if moment < self._wake_at:
            self._wake_at = moment
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                for flight in list(self._unstarted):
                    with contextlib.suppress(OSError):
                        seq, started = flight.worker.read_start()
                        if seq == flight.request.seq and started > 0:
                            self._unstarted.discard(flight)
                            budget = flight.request.limits.timeout + KILL_GRACE
                            self._arm(flight, started + budget)
                now = time.monotonic()
                while self._heap:
                    deadline, _, flight = self._heap[0]
                    if flight.finished or deadline != flight.deadline:
                        heapq.heappop(self._heap)
                    elif deadline <= now:
                        heapq.heappop(self._heap)
                        self._unstarted.discard(flight)
                        flight.expired = True
                        flight.worker.deadline_killed = True
                        with contextlib.suppress(OSError):
                            flight.worker.proc.kill()
                    else:
                        break
                pause = self._heap[0][0] - now if self._heap else None
                if self._unstarted:
                    pause = self._POLL if pause is None else min(pause, self._POLL)
                self._wake_at = math.inf if pause is None else now + pause
                self._cond.wait(pause)
