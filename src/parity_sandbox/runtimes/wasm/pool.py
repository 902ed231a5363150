"""Warm worker processes for the WASM runtime: start, hand out, kill, and reap after crashes.

Each worker owns a private directory under the executor's root and a memfd for its output; the
executor's root carries an ``flock``ed lock file, so a root whose process died can be told from a
live one and removed by the next executor (``reap_stale_roots``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path

import parity_sandbox
from parity_sandbox._exceptions import RuntimeUnavailable
from parity_sandbox._executor import Cancelled
from parity_sandbox._fs import remove_tree
from parity_sandbox.runtimes.wasm.protocol import (
    OUTPUT_BUFFER_SIZE,
    START_FORMAT,
    START_SLOT,
    VIOLATION_SLOT,
    Ready,
    decode,
    output_slot,
)

#: How long a worker may take to start.
STARTUP_TIMEOUT = 60.0
ROOT_PREFIX = "parity-sandbox-wasm-"
LOCK_NAME = ".lock"


def reap_stale_roots(temp_dir: Path | None = None) -> int:
    """Remove workspace roots left by executors whose process died; returns how many.

    A live executor holds an ``flock`` on its root's lock file, so only abandoned roots can be
    locked here.
    """
    base = Path(temp_dir or tempfile.gettempdir())
    removed = 0
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        candidates = [e.path for e in entries if e.name.startswith(ROOT_PREFIX)]
    for path in candidates:
        try:
            fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            remove_tree(Path(path))
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


#: The module a worker process runs (``python -m``); tests find workers by it.
WORKER_MODULE = "parity_sandbox.runtimes.wasm.worker"


def worker_environment(environ: Mapping[str, str], package_root: str) -> dict[str, str]:
    """The whole environment of a worker process: what Python needs to start it, nothing else.

    A guest that escaped wasmtime into its worker must find none of the operator's secrets (API
    keys, tokens) there, so nothing of ``environ`` is copied but ``PYTHONPATH``, whose entries
    (paths, behind the package root) may be where the parent found wasmtime. The worker gets its
    directories as arguments and execs nothing, so it needs no ``HOME``, ``TMPDIR`` or ``PATH``.
    """
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, environ.get("PYTHONPATH")])),
        # ``-m`` would put the working directory (the worker's root) first on sys.path.
        "PYTHONSAFEPATH": "1",
        # The same text encoding whichever locales the host has installed.
        "LC_ALL": "C.UTF-8",
        "PYTHONUTF8": "1",
    }


class Worker:
    """One worker process and its private directory."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700)
        ours, theirs = socket.socketpair()
        # Output is shared memory: it survives a kill, and costs no syscall per task.
        self.output_fd = os.memfd_create("parity-sandbox-output", os.MFD_CLOEXEC)
        # Readable after the worker is killed (partial output), so closed only with this object.
        self._close_output = weakref.finalize(self, os.close, self.output_fd)
        os.ftruncate(self.output_fd, OUTPUT_BUFFER_SIZE)
        package_root = str(Path(parity_sandbox.__file__).resolve().parent.parent)
        try:
            with (root / "worker.log").open("wb") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        WORKER_MODULE,
                        str(theirs.fileno()),
                        str(self.output_fd),
                        str(root),
                        str(cache_dir),
                    ],
                    pass_fds=(theirs.fileno(), self.output_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=worker_environment(os.environ, package_root),
                    cwd=root,
                    start_new_session=True,
                )
        except OSError as exc:
            ours.close()
            self._close_output()
            raise RuntimeUnavailable(f"cannot start a wasm worker process: {exc}") from exc
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        #: The parent's end of the socket (stays known after ``conn`` is closed).
        self.fd = self.conn.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.version = ""
        #: Set when this worker must not run another task (it timed out, crashed or was killed).
        self.dead = False
        #: Set by the deadline thread when it kills this worker.
        self.deadline_killed = False
        self._killed = False
        self._kill_lock = threading.Lock()
        self.modules: set[tuple[tuple[int, bool, bool], str]] = set()

    def ensure_ready(self) -> str:
        """Wait until the worker has started; returns its wasmtime version."""
        if not self.version:
            if not self.conn.poll(STARTUP_TIMEOUT):
                raise RuntimeUnavailable("a wasm worker did not start within 60 s")
            try:
                message = decode(self.conn.recv_bytes())
            except (EOFError, OSError, ValueError):
                raise RuntimeUnavailable(
                    "a wasm worker died while starting; is wasmtime installed? "
                    f"(pip install wasmtime). Its log: {self.log_tail()}"
                ) from None
            assert isinstance(message, Ready)
            self.version = message.wasmtime_version
        return self.version

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "worker.log").read_bytes()[-2000:].decode("utf-8", "replace")
        return ""

    def describe_death(self) -> str:
        code = self.proc.wait(timeout=5)
        if code < 0:
            return f"the worker process was killed by signal {-code}"
        return f"the worker process exited with code {code}"

    def read_start(self) -> tuple[int, float]:
        """The seq of the request whose guest this worker started last, and when (monotonic)."""
        seq, started = struct.unpack(START_FORMAT, os.pread(self.output_fd, 16, START_SLOT))
        return int(seq), float(started)

    @property
    def exited(self) -> bool:
        """Whether the process has ended (killed, crashed, or killed itself)."""
        return self.proc.poll() is not None

    def read_violation(self) -> int:
        """The seq of the request that outgrew the disk cap (0: none)."""
        (seq,) = struct.unpack("<Q", os.pread(self.output_fd, 8, VIOLATION_SLOT))
        return int(seq)

    def read_output(self, stream: int, cap: int) -> tuple[bytes, bool]:
        """The output a (killed) worker kept of stream 0 or 1, and whether it was truncated."""
        counter, base = output_slot(stream)
        (count,) = struct.unpack("<Q", os.pread(self.output_fd, 8, counter))
        data = os.pread(self.output_fd, min(count, cap + 1), base)
        return data[:cap], len(data) > cap

    def kill(self) -> None:
        """Kill the process and remove its directory; safe to call twice, from any thread."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = self.dead = True
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.conn.close()
        with contextlib.suppress(OSError):
            remove_tree(self.root)


class Pool:
    """Up to ``size`` warm workers; a task takes an idle one or starts one."""

    def __init__(
        self,
        size: int,
        root: Path,
        cache_dir: Path,
        *,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.size = size
        #: Called when a worker is replaced (the executor's metrics count it).
        self._on_restart = on_restart
        self._root = root
        self._cache_dir = cache_dir
        self._idle: list[Worker] = []
        self._all: set[Worker] = set()
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._names = itertools.count()
        #: Waiters on an event loop, first come first served: the first is called when a
        #: worker is given back or replaced.
        self._on_free: OrderedDict[int, Callable[[], None]] = OrderedDict()

    def _spawn(self) -> Worker:
        worker = Worker(self._root / f"w{next(self._names)}", self._cache_dir)
        self._all.add(worker)
        return worker

    def prestart(self) -> None:
        with self._cond:
            self._idle.append(self._spawn())

    def acquire(self, cancel: threading.Event | None) -> Worker:
        """An idle worker, or a new one if the pool is not full; waits otherwise."""
        with self._cond:
            while True:
                worker = self.try_acquire()
                if worker is not None:
                    return worker
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled while waiting for a worker")
                self._cond.wait(0.05 if cancel is not None else None)

    def try_acquire(self) -> Worker | None:
        """An idle worker, or a new one if the pool is not full; ``None`` otherwise."""
        with self._cond:
            if self._closed:
                raise RuntimeUnavailable("the WasmExecutor is closed")
            if self._idle:
                return self._idle.pop()
            if len(self._all) < self.size:
                return self._spawn()
            return None

    def has_idle(self) -> bool:
        """Whether ``try_acquire`` would find a worker now (idle, or room for a new one)."""
        with self._cond:
            return not self._closed and (bool(self._idle) or len(self._all) < self.size)

    def on_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when a worker may be free for it (unless ``forget``)."""
        with self._cond:
            self._on_free[id(callback)] = callback

    def forget(self, callback: Callable[[], None]) -> None:
        with self._cond:
            if self._on_free.get(id(callback)) is callback:
                del self._on_free[id(callback)]

    def _freed(self) -> None:
        self._cond.notify()
        if self._on_free:
            self._on_free.popitem(last=False)[1]()

    def pass_on(self) -> None:
        """A waiter called by ``on_free`` leaves without a worker: call the next one."""
        with self._cond:
            if self._on_free:
                self._on_free.popitem(last=False)[1]()

    def release(self, worker: Worker) -> None:
        """Give back a worker after a task; a dead one is replaced instead."""
        with self._cond:
            if not self._closed and not worker.dead:
                self._idle.append(worker)
                self._freed()
                return
        self.discard(worker)

    def discard(self, worker: Worker) -> None:
        """Kill ``worker`` and start its replacement, so the next task finds a warm one."""
        worker.kill()
        with self._cond:
            self._all.discard(worker)
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
            if not self._closed:
                with contextlib.suppress(RuntimeUnavailable):
                    self._idle.append(self._spawn())
                if self._on_restart is not None:
                    self._on_restart()
            self._freed()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._cond.notify_all()
            while self._on_free:  # they find it closed
                self._on_free.popitem(last=False)[1]()
        for worker in workers:
            worker.kill()
