"""Warm containers: made and started ahead of demand, each for exactly one task.

A warm container is a container of some :class:`Shape` whose init waits on stdin for a task's
secret and command, with every limit and hardened default already applied. Taking one skips
create, attach and start (about 100 ms under runc, 250 ms under runsc); the task then runs in
it as on the cold path, and the container is destroyed afterwards. Nothing is ever reused.

One thread per pool keeps each profile at its target: ``min`` idle containers, raised by one
(up to ``max``) each time a task finds its profile empty, lowered again as containers wait past
``idle_timeout`` unused and are replaced or removed. Profiles come from tasks, and tasks may
come from strangers: so the containers of all profiles together never pass ``max_total``
(a new profile takes the idle containers of the least recently used one), and a profile that
came from tasks is forgotten once idle and empty for ``idle_timeout``. Profiles named in the
configuration or by ``warm()`` stay, at ``min``, with their containers renewed as they expire.
The containers are ordinary managed containers (labels, run ids in the process's live set), so
a crash leaves nothing that ``reap`` does not find.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from parity_sandbox._config import PoolSettings
from parity_sandbox._exceptions import SandboxError
from parity_sandbox.runtimes.docker.spec import MiB, Shape

#: How often the pool thread looks for expired containers when nothing wakes it.
_TICK = 1.0


@dataclass
class Warm:
    """A started container whose init waits for a task."""

    container: str
    run_id: str
    #: The attach response; it owns the socket and must stay referenced while it is used.
    response: Any = field(repr=False)
    raw: socket.socket = field(repr=False)
    made: float = field(default_factory=time.monotonic)

    def hang_up(self) -> None:
        """End the attach connection and release its file descriptor; idempotent.

        Closing ``raw`` alone is not enough: the SDK's socket IO object holds the same
        descriptor, so the connection would stay open until garbage collection. A daemon then
        blocks writing a flooding task's output into it, and so does the removal of the
        container, for up to the API timeout, while the task runs on. A shutdown ends the
        connection for every holder of the descriptor (the stdin writer's duplicate too).
        """
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)
        for owner in (self.response, getattr(self.response, "_response", None), self.raw):
            if owner is not None:
                with contextlib.suppress(Exception):
                    owner.close()

    def alive(self) -> bool:
        """False when the container has printed or ended while it waited (it must not)."""
        try:
            readable, _, _ = select.select([self.raw], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable


@dataclass
class _Profile:
    shape: Shape
    target: int
    idle: deque[Warm] = field(default_factory=deque)
    making: int = 0
    failures: int = 0
    #: When a task last took (or asked for) one of its containers.
    used: float = field(default_factory=time.monotonic)
    #: Asked for by name (configuration, ``warm()``): kept at ``min`` however long it idles.
    #: Others came from tasks, and are forgotten once idle and empty for ``idle_timeout``.
    pinned: bool = True


def pool_key(shape: Shape) -> Shape:
    """The profile a shape belongs to: whether it has input files, not how large they are."""
    return replace(shape, input_size=min(shape.input_size, 1))


class WarmPool:
    """Warm containers per profile, kept topped up by a background thread.

    Args:
        settings: ``docker.pool``.
        make: creates, attaches to and starts a container of a shape (runs on the pool thread).
        discard: removes a warm container that no task will take.
    """

    def __init__(
        self,
        settings: PoolSettings,
        make: Callable[[Shape], Warm],
        discard: Callable[[Warm], None],
    ) -> None:
        self.settings = settings
        self._make = make
        self._discard = discard
        self._profiles: dict[Shape, _Profile] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        #: The last error the pool thread met while making a container (for diagnostics).
        self.last_error: Exception | None = None

    # -- the executor's side ---------------------------------------------------------------

    def declare(self, shape: Shape, *, pinned: bool = True) -> None:
        """Keep warm containers for ``shape``'s profile from now on (``pinned``: for good;
        otherwise until it has been idle for ``idle_timeout``)."""
        key = pool_key(shape)
        with self._lock:
            if self._closed:
                return
            known = self._profiles.get(key)
            if known is not None:  # asked again: at least one, and retry after failures
                known.target = max(known.target, 1)
                known.failures = 0
                known.used = time.monotonic()
                known.pinned = known.pinned or pinned
                self._wake.set()
                return
            # Without input files no /input (a volume costs the daemon ~15% of a container's
            # life); with them, room for any whose files fit the disk limit.
            size = max(shape.disk, shape.input_size, MiB) if shape.input_size else 0
            sized = replace(shape, input_size=size)
            self._profiles[key] = _Profile(sized, max(self.settings.min, 1), pinned=pinned)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, daemon=True, name="parity-sandbox-warm-pool"
                )
                self._thread.start()
        self._wake.set()

    def take(self, shape: Shape) -> Warm | None:
        """A warm container for a task of ``shape``, or ``None`` (then the task runs cold and
        its profile gets warm containers for the tasks that follow)."""
        key = pool_key(shape)
        with self._lock:
            profile = self._profiles.get(key)
            if profile is None or shape.input_size > profile.shape.input_size:
                found = None
            else:
                profile.used = time.monotonic()
                found = self._pop_alive(profile)
                if found is None:  # demand outran the pool: keep one more, and retry failures
                    profile.target = min(self.settings.max, profile.target + 1)
                    profile.failures = 0
        if profile is None:
            self.declare(shape, pinned=False)
        self._wake.set()
        return found

    def _pop_alive(self, profile: _Profile) -> Warm | None:
        while profile.idle:
            warm = profile.idle.popleft()
            if warm.alive():
                return warm
            self._discard_later(warm)
        return None

    def _discard_later(self, warm: Warm) -> None:
        threading.Thread(target=self._discard, args=(warm,), daemon=True).start()

    def ready(self, shape: Shape) -> int:
        """How many warm containers wait for tasks of ``shape``'s profile."""
        with self._lock:
            profile = self._profiles.get(pool_key(shape))
            return len(profile.idle) if profile else 0

    def wait_ready(self, shape: Shape, count: int = 1, timeout: float = 30.0) -> bool:
        """Wait until ``count`` warm containers of ``shape``'s profile wait for tasks."""
        deadline = time.monotonic() + timeout
        while self.ready(shape) < count:
            if time.monotonic() > deadline or self._closed:
                return False
            time.sleep(0.01)
        return True

    def size(self) -> int:
        """How many warm containers wait for tasks now, all profiles together."""
        with self._lock:
            return sum(len(p.idle) for p in self._profiles.values())

    def containers(self) -> list[str]:
        """The ids of the warm containers waiting now."""
        with self._lock:
            return [warm.container for p in self._profiles.values() for warm in p.idle]

    def close(self) -> None:
        """Stop making containers and remove every warm one. Safe to call twice."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            left = [warm for p in self._profiles.values() for warm in p.idle]
            for profile in self._profiles.values():
                profile.idle.clear()
        for warm in left:
            self._discard(warm)

    # -- the pool thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(_TICK)
            self._wake.clear()
            self._expire()
            while not self._closed and (profile := self._short()) is not None:
                self._fill(profile)

    def _expire(self) -> None:
        """Drop containers that waited past ``idle_timeout``; an idle profile shrinks to min,
        and one idle and empty that long is forgotten."""
        cutoff = time.monotonic() - self.settings.idle_timeout
        expired: list[Warm] = []
        with self._lock:
            for key, profile in list(self._profiles.items()):
                while profile.idle and profile.idle[0].made < cutoff:
                    expired.append(profile.idle.popleft())
                    profile.target = max(self.settings.min, profile.target - 1)
                idle = not profile.idle and not profile.making and profile.used < cutoff
                if idle and not profile.pinned:
                    del self._profiles[key]
        for warm in expired:
            self._discard(warm)

    def _short(self) -> _Profile | None:
        """A profile with fewer containers (waiting or being made) than its target, most
        recently used first, with room made for it within ``max_total``."""
        evicted: Warm | None = None
        chosen: _Profile | None = None
        with self._lock:
            profiles = sorted(self._profiles.values(), key=lambda p: p.used, reverse=True)
            total = sum(len(p.idle) + p.making for p in profiles)
            for profile in profiles:
                # A profile whose containers keep failing to start is left alone until a task
                # of it comes by again (take() wakes the thread; failures back off).
                if profile.failures >= 3 or len(profile.idle) + profile.making >= profile.target:
                    continue
                if total >= self.settings.max_total:
                    victim = next(
                        (p for p in reversed(profiles) if p.idle and p.used < profile.used), None
                    )
                    if victim is None:
                        continue
                    evicted = victim.idle.popleft()
                    victim.target = max(0, victim.target - 1)
                profile.making += 1
                chosen = profile
                break
        if evicted is not None:
            self._discard(evicted)
        return chosen

    def _fill(self, profile: _Profile) -> None:
        warm: Warm | None = None
        try:
            warm = self._make(profile.shape)
        except SandboxError as exc:  # the pool thread outlives a daemon hiccup
            self.last_error = exc
        with self._lock:
            profile.making -= 1
            if warm is None:
                profile.failures += 1
            else:
                profile.failures = 0
                if not self._closed:
                    profile.idle.append(warm)
                    warm = None
        if warm is not None:  # made while the pool closed
            self._discard(warm)
        elif profile.failures:
            time.sleep(min(5.0, 0.1 * 2**profile.failures))
