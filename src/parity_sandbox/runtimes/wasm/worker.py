"""A warm worker process that runs WebAssembly tasks one at a time.

Started by :class:`~parity_sandbox.WasmExecutor` as
``python -m parity_sandbox.runtimes.wasm.worker FD OUTPUT_FD ROOT CACHE_DIR``: FD is its end of
a socket pair, OUTPUT_FD the output buffer it shares with the parent, ROOT a private directory for
its task workspaces, CACHE_DIR where compiled modules persist.

Why a process: the parent can always kill it, whatever the guest does, so every timeout holds.
Epoch interruption cannot stop a guest blocked in a host call (``poll_oneoff`` sleeping), and its
checks slowed compute-bound code by ~30% here, so there is none: the parent kills the worker at
the deadline. Processes also sidestep the GIL, so throughput scales with cores. Captured output
(up to the cap) lives in memory shared with the parent, which recovers it after a kill.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import mmap
import os
import platform
import resource
import select
import signal
import stat
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import wasmtime

from parity_sandbox import _seccomp
from parity_sandbox._fs import (
    DiskUsage,
    MountedTree,
    NotFollowed,
    collect_outputs,
    disk_usage,
    mounted_trees,
    remove_tree,
    write_all,
    write_files,
)
from parity_sandbox.runtimes.wasm.protocol import (
    MAX_WORKSPACE_ENTRIES,
    OUTPUT_BUFFER_SIZE,
    START_FORMAT,
    START_SLOT,
    VIOLATION_SLOT,
    NeedModule,
    Ready,
    RunReply,
    RunRequest,
    StoreSettings,
    WasmLimits,
    decode,
    encode,
    output_slot,
    store_settings,
)

WASI_MODULE = "wasi_snapshot_preview1"
MEMORY_CACHE_SIZE = 32
#: Compiled modules kept on disk per engine configuration (least recently used go first).
DISK_CACHE_FILES = 256
_PAGE = 65536


@functools.cache
def wasmtime_version() -> str:
    """The version of the wasmtime Python package (and so of the engine it bundles)."""
    return importlib.metadata.version("wasmtime")


class InvalidModule(Exception):
    """The bytes are not a WASI preview 1 command module."""


class Capture:
    """Keeps at most ``cap`` bytes of one output stream and counts the rest.

    The bytes live in a buffer shared with the parent (see ``output_slot``), with a counter the
    parent reads, so that output survives a worker the parent had to kill. One byte more than
    the cap is kept there so a reader can tell truncation; nothing past that is stored.
    """

    def __init__(self, buffer: mmap.mmap, stream: int) -> None:
        self._buffer = buffer
        self._counter, self._base = output_slot(stream)
        self.cap = 0
        self.total = 0

    def reset(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        struct.pack_into("<Q", self._buffer, self._counter, 0)

    def write(self, data: bytes) -> None:
        # Runs on a wasmtime thread; must never raise (wasmtime would print and report EIO).
        room = self.cap + 1 - self.total
        if room > 0:
            piece = data[:room]
            start = self._base + self.total
            self._buffer[start : start + len(piece)] = piece
            struct.pack_into("<Q", self._buffer, self._counter, self.total + len(piece))
        self.total += len(data)

    @property
    def kept(self) -> bytes:
        return self._buffer[self._base : self._base + min(self.total, self.cap)]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap


class OutputPipes:
    """The guest's stdout and stderr: pipes on this process's fds 1 and 2, drained here.

    The guest inherits fds 1 and 2, so wasmtime writes its output straight into the pipes from
    its own threads, with no file to open per task and no Python callback per write. Each pipe
    holds up to 1 MiB, so a short task never needs a reader: ``drain()`` collects its output
    once the guest stopped. For longer ones a reader thread looks every 2 ms while a task runs
    (every 50 ms otherwise), without being woken per task. The worker's own diagnostics go to
    its log, never to fds 1 and 2.
    """

    _F_SETPIPE_SZ = 1031
    _CHUNK = 1 << 16
    _BUSY_PERIOD = 0.002
    _IDLE_PERIOD = 0.05

    def __init__(self, captures: tuple[Capture, Capture]) -> None:
        self.captures = captures
        #: Set while a guest runs; read by the reader thread, never signalled.
        self.active = False
        self._read_ends = []
        for target in (1, 2):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_end, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_end, self._F_SETPIPE_SZ, 1 << 20)
            os.dup2(write_end, target)
            os.close(write_end)
            self._read_ends.append(read_end)
        self._locks = [threading.Lock() for _ in captures]
        self._poller = select.poll()
        for read_end in self._read_ends:
            self._poller.register(read_end, select.POLLIN)
        threading.Thread(target=self._loop, name="output-reader", daemon=True).start()

    def drain(self, poller: select.poll | None = None) -> None:
        """Move everything now in the pipes into the captures.

        A poll object must not be used by two threads at once: the reader thread passes its own.
        """
        for fd, _ in (poller or self._poller).poll(0):
            self._drain_one(self._read_ends.index(fd))

    def _drain_one(self, index: int) -> None:
        with self._locks[index]:
            while True:
                try:
                    data = os.read(self._read_ends[index], self._CHUNK)
                except BlockingIOError:
                    return
                self.captures[index].write(data)
                if len(data) < self._CHUNK:
                    return

    def _loop(self) -> None:
        poller = select.poll()
        for read_end in self._read_ends:
            poller.register(read_end, select.POLLIN)
        while True:
            time.sleep(self._BUSY_PERIOD if self.active else self._IDLE_PERIOD)
            if self.active:
                self.drain(poller)


class DiskWatch:
    """Stops a guest whose workspace outgrows the disk cap while it runs.

    No file can pass the cap (``RLIMIT_FSIZE``), but many files can; every 50 ms while a guest
    runs this thread measures the workspace, and past the cap (or ``MAX_WORKSPACE_ENTRIES``
    entries) it records the request in the shared buffer and kills this worker: the parent
    reports ``ResourceLimitExceeded("disk")`` with the partial result.
    """

    _PERIOD = 0.05

    def __init__(self, work: Path, shared: mmap.mmap) -> None:
        self._work = work
        self._shared = shared
        self._lock = threading.Lock()
        #: (seq, disk cap, writable copies) of the guest running
        self._running: tuple[int, int, tuple[Path, ...]] | None = None
        threading.Thread(target=self._loop, name="disk-watch", daemon=True).start()

    @contextlib.contextmanager
    def watching(self, seq: int, cap: int, copies: Sequence[Path] = ()) -> Iterator[None]:
        """Watch the workspace, and the task's writable ``copies`` of mounted trees, while
        request ``seq`` runs."""
        with self._lock:
            self._running = (seq, cap, tuple(copies))
        try:
            yield
        finally:
            with self._lock:  # after this, no kill for this request can happen
                self._running = None

    def _loop(self) -> None:
        pause = self._PERIOD
        while True:
            time.sleep(pause)
            running = self._running
            if running is None:
                pause = self._PERIOD
                continue
            seq, cap, copies = running
            began = time.perf_counter()
            usage = scratch_usage(self._work, copies)
            # A big tree takes long to measure: look less often, at most a third of the time.
            pause = max(self._PERIOD, 2 * (time.perf_counter() - began))
            if usage.total <= cap and usage.entries < MAX_WORKSPACE_ENTRIES:
                continue
            with self._lock:
                if self._running == running:
                    struct.pack_into("<Q", self._shared, VIOLATION_SLOT, seq)
                    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent() -> None:
    """End this worker once its parent is gone, so an orphan cannot outlive it (a thread)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


EngineKey = tuple[int, bool, bool]

#: Deterministic mode's wall clock starts at 2020-01-01T00:00:00Z; every reading of any clock
#: advances it by one microsecond.
DETERMINISTIC_EPOCH_NS = 1_577_836_800 * 10**9
_CLOCK_STEP_NS = 1_000
_ERRNO_FAULT = 21
_ERRNO_INVAL = 28


class Determinism:
    """The clocks and the random source a deterministic run sees, reset from each run's seed.

    Random bytes are SHA-256 in counter mode over the seed; clocks count readings. Nothing of
    the host (time, entropy) reaches the guest through these.
    """

    def __init__(self) -> None:
        self.reset(bytes(32))

    def reset(self, seed: bytes) -> None:
        self._seed = seed
        self._block = 0
        self._pending = b""
        self._ticks = 0

    def now(self, clock: int) -> int:
        self._ticks += 1
        elapsed = self._ticks * _CLOCK_STEP_NS
        return DETERMINISTIC_EPOCH_NS + elapsed if clock == 0 else elapsed

    def random(self, size: int) -> bytes:
        chunks = [self._pending]
        have = len(self._pending)
        while have < size:
            block = hashlib.sha256(self._seed + self._block.to_bytes(8, "little")).digest()
            self._block += 1
            chunks.append(block)
            have += len(block)
        data = b"".join(chunks)
        self._pending = data[size:]
        return data[:size]

    def define(self, linker: wasmtime.Linker) -> None:
        """Shadow WASI's clock and random functions in ``linker`` with this state's."""
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        module = "wasi_snapshot_preview1"
        linker.allow_shadowing = True

        def write(caller: wasmtime.Caller, data: bytes, at: int) -> int:
            memory = caller.get("memory")
            if not isinstance(memory, wasmtime.Memory):
                return _ERRNO_FAULT
            try:
                memory.write(caller, data, at)
            except (IndexError, ValueError, wasmtime.WasmtimeError):
                return _ERRNO_FAULT
            return 0

        def clock_res_get(caller: wasmtime.Caller, clock: int, at: int) -> int:
            if not 0 <= clock <= 3:
                return _ERRNO_INVAL
            return write(caller, _CLOCK_STEP_NS.to_bytes(8, "little"), at)

        def clock_time_get(caller: wasmtime.Caller, clock: int, precision: int, at: int) -> int:
            if not 0 <= clock <= 3:
                return _ERRNO_INVAL
            return write(caller, self.now(clock).to_bytes(8, "little"), at)

        def random_get(caller: wasmtime.Caller, at: int, size: int) -> int:
            return write(caller, self.random(size & 0xFFFFFFFF), at)

        linker.define_func(
            module, "clock_res_get", wasmtime.FuncType([i32, i32], [i32]), clock_res_get, True
        )
        linker.define_func(
            module,
            "clock_time_get",
            wasmtime.FuncType([i32, i64, i32], [i32]),
            clock_time_get,
            True,
        )
        linker.define_func(
            module, "random_get", wasmtime.FuncType([i32, i32], [i32]), random_get, True
        )


class ModuleCache:
    """Compiled modules per engine: in memory (LRU) and serialized on disk between processes."""

    def __init__(self, cache_dir: Path, determinism: Determinism | None = None) -> None:
        self._engines: dict[EngineKey, tuple[wasmtime.Engine, wasmtime.Linker]] = {}
        self._memory: OrderedDict[tuple[EngineKey, str], wasmtime.InstancePre] = OrderedDict()
        self._disk = cache_dir if private_dir(cache_dir) else None
        self.determinism = determinism or Determinism()

    def engine(self, settings: StoreSettings) -> tuple[wasmtime.Engine, wasmtime.Linker]:
        key = _engine_key(settings)
        if key not in self._engines:
            config = wasmtime.Config()
            config.consume_fuel = settings.consume_fuel
            config.max_wasm_stack = settings.max_wasm_stack
            config.cranelift_opt_level = "speed"
            if settings.deterministic:
                config.cranelift_nan_canonicalization = True
                config.wasm_relaxed_simd_deterministic = True
            engine = wasmtime.Engine(config)
            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            if settings.deterministic:
                self.determinism.define(linker)
            self._engines[key] = (engine, linker)
        return self._engines[key]

    def get(self, key: EngineKey, sha: str) -> wasmtime.InstancePre | None:
        pre = self._memory.get((key, sha))
        if pre is not None:
            self._memory.move_to_end((key, sha))
        return pre

    def load(
        self, settings: StoreSettings, sha: str, module_bytes: bytes | None
    ) -> wasmtime.InstancePre | None:
        """Load from disk, or compile ``module_bytes``; ``None`` if neither is possible."""
        key = _engine_key(settings)
        engine, linker = self.engine(settings)
        path = self._disk_path(key, sha)
        module = None
        if path is not None and path.is_file():
            with contextlib.suppress(wasmtime.WasmtimeError, OSError):
                module = wasmtime.Module.deserialize_file(engine, str(path))
                os.utime(path)  # recently used: evicted last
        if module is None:
            if module_bytes is None:
                return None
            if hashlib.sha256(module_bytes).hexdigest() != sha:
                raise InvalidModule("module bytes do not match their sha256")
            try:
                module = wasmtime.Module(engine, module_bytes)
            except wasmtime.WasmtimeError as exc:
                raise InvalidModule(f"not a valid WebAssembly module: {_first_line(exc)}") from None
            _check_imports(module)
            if path is not None:
                _write_atomically(path, bytes(module.serialize()))
                _evict(path.parent, DISK_CACHE_FILES)
        else:
            _check_imports(module)
        pre = linker.instantiate_pre(module)
        self._memory[(key, sha)] = pre
        while len(self._memory) > MEMORY_CACHE_SIZE:
            self._memory.popitem(last=False)
        return pre

    def _disk_path(self, key: EngineKey, sha: str) -> Path | None:
        if self._disk is None:
            return None
        stack, fuel, deterministic = key
        engine = f"wasmtime-{wasmtime_version()}-s{stack}-f{int(fuel)}"
        if deterministic:
            engine += "-d1"
        return self._disk / engine / f"{sha}.cwasm"


def _engine_key(settings: StoreSettings) -> EngineKey:
    return (settings.max_wasm_stack, settings.consume_fuel, settings.deterministic)


def private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) and check that only this user can write to it.

    A deserialized module is native code; a cache that others can write would let them run
    code in the worker, so a shared or foreign directory disables the disk cache.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _write_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: readers never see a partial module."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        temp.replace(path)


def _evict(directory: Path, keep: int) -> None:
    """Remove the least recently used compiled modules beyond the newest ``keep``."""
    with contextlib.suppress(OSError):
        modules = sorted(directory.glob("*.cwasm"), key=lambda p: p.stat().st_mtime)
        for stale in modules[: max(0, len(modules) - keep)]:
            stale.unlink(missing_ok=True)


def _check_imports(module: wasmtime.Module) -> None:
    """Refuse a module that imports anything but WASI preview 1 (what it exports is checked
    when it runs: a command's ``_start``, or the entry point a task names)."""
    for item in module.imports:
        if item.module != WASI_MODULE:
            raise InvalidModule(
                f"module imports {item.module}.{item.name}; only WASI preview 1 "
                f"({WASI_MODULE}) is provided"
            )


def _first_line(exc: BaseException) -> str:
    """The informative line of a wasmtime error: its cause when it has one, not the backtrace."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if "Caused by:" in lines and lines.index("Caused by:") + 1 < len(lines):
        return lines[lines.index("Caused by:") + 1].removeprefix("wasm trap: ")
    return lines[0] if lines else type(exc).__name__


def _pin_times(root: Path) -> None:
    """Give the sandbox's directories and input files one fixed time (deterministic mode)."""
    for top in (root / "work", root / "input"):
        if not top.is_dir():
            continue
        for directory, _, names in os.walk(top):
            for name in (".", *names):
                os.utime(Path(directory) / name, ns=(0, 0), follow_symlinks=False)


class Runner:
    """Runs requests inside this worker: the workspace is ``root/work``, inputs ``root/input``.

    A workspace the task wrote to is emptied before the reply goes out; what is left (freeing
    the store, removing stdin and inputs) is done after it, so that work overlaps with the
    parent's instead of adding to latency.
    """

    def __init__(self, root: Path, cache_dir: Path, output_fd: int) -> None:
        self.root = root
        self.work = root / "work"
        self.inputs = root / "input"
        self.stdin = root / "stdin"
        self.cache = ModuleCache(cache_dir)
        buffer = mmap.mmap(output_fd, OUTPUT_BUFFER_SIZE)
        self.shared = buffer
        self.stdout = Capture(buffer, 0)
        self.stderr = Capture(buffer, 1)
        self.pipes = OutputPipes((self.stdout, self.stderr))
        self.disk = DiskWatch(self.work, buffer)
        self._fsize_hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        self._last_store: wasmtime.Store | None = None
        self._used_stdin = self._used_inputs = self._dirty = True
        #: The output folders made for the task now running (``_make_output_dirs``).
        self._made: list[Path] = []
        #: The writable copies of mounted trees it has outside the workspace.
        self._copies: list[Path] = []

    def prepare(self, conn: Connection, request: RunRequest) -> wasmtime.InstancePre | None:
        settings = store_settings(request.limits)
        pre = self.cache.get(request.limits.engine_key, request.module_sha256)
        if pre is None:
            pre = self.cache.load(settings, request.module_sha256, request.module)
            if pre is None:
                conn.send_bytes(encode(NeedModule(request.seq)))
        return pre

    def run(self, request: RunRequest, pre: wasmtime.InstancePre) -> RunReply:
        self._dirty = True  # until the run has looked, the workspace may hold anything
        limits = request.limits
        settings = store_settings(limits)
        engine, _ = self.cache.engine(settings)
        store = self._store(engine, settings, self._wasi(request))
        if limits.deterministic:
            self.cache.determinism.reset(request.seed or bytes(32))
            _pin_times(self.root)
        # CPU time of this thread, which runs the guest (nanosecond clock, unlike getrusage).
        cpu_start = time.thread_time()
        # The parent's deadline counts from this stamp (compile time and queueing excluded).
        struct.pack_into(START_FORMAT, self.shared, START_SLOT, request.seq, time.monotonic())
        started = time.perf_counter()
        self.pipes.active = True
        try:
            with (
                self._file_size_cap(settings.file_size_limit),
                self.disk.watching(request.seq, limits.disk, self._copies),
            ):
                ending, memory = _call_start(pre, store, limits, request)
        finally:
            self.pipes.active = False
            duration = time.perf_counter() - started
        cpu_end = time.thread_time()
        self.pipes.drain()
        peak = memory.data_len(store) if memory is not None else None
        fuel_used = None
        if settings.fuel is not None:
            with contextlib.suppress(wasmtime.WasmtimeError):
                fuel_used = settings.fuel - store.get_fuel()
        files: dict[str, bytes] = {}
        files_truncated = False
        not_followed = NotFollowed()
        for folder in reversed(self._made):  # those the task left empty: as if never made
            _remove_if_empty(self.work, folder)
        with os.scandir(self.work) as entries:
            self._dirty = next(entries, None) is not None
        usage = DiskUsage()
        if self._dirty or self._copies:
            usage = scratch_usage(self.work, self._copies)
        ending = _blame_limits(ending, peak, limits, usage)
        if self._dirty:
            files, files_truncated = collect_outputs(
                self.work, request.outputs, request.output_caps, not_followed
            )
        # Freeing a store costs ~50 us; keep it until the reply is out (see reset()).
        self._last_store = store
        return RunReply(
            seq=request.seq,
            outcome=ending.outcome,
            exit_code=ending.exit_code,
            limit=ending.limit,
            message=ending.message,
            stdout=self.stdout.kept,
            stderr=self.stderr.kept,
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
            files=files,
            files_truncated=files_truncated,
            duration=duration,
            cpu_time=cpu_end - cpu_start,
            peak_memory=peak,
            fuel_used=fuel_used,
            not_followed=not_followed.count,
            not_followed_paths=tuple(not_followed.paths),
        )

    @contextlib.contextmanager
    def _file_size_cap(self, size: int) -> Iterator[None]:
        """Lower this process's ``RLIMIT_FSIZE`` to ``size`` (never above the hard limit)."""
        if self._fsize_hard != resource.RLIM_INFINITY:
            size = min(size, self._fsize_hard)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, self._fsize_hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self._fsize_hard, self._fsize_hard))

    def _wasi(self, request: RunRequest) -> wasmtime.WasiConfig:
        """The guest's view: argv, env, stdin, output pipes, ``/work`` and ``/input``."""
        wasi = wasmtime.WasiConfig()
        wasi.argv = list(request.argv)
        if request.env:
            wasi.env = [list(pair) for pair in request.env]
        if request.stdin:
            self._used_stdin = True
            self.stdin.write_bytes(request.stdin)
            wasi.stdin_file = str(self.stdin)
        self.stdout.reset(request.limits.output)
        self.stderr.reset(request.limits.output)
        wasi.inherit_stdout()
        wasi.inherit_stderr()
        plain: dict[str, bytes] = {}
        trees: list[MountedTree] = []
        self._copies = []
        if request.input_files:
            self._used_inputs = True
            self.inputs.mkdir()
            plain, trees = mounted_trees(request.input_files, request.mounts)
        # wasi-libc (and Rust's std over it) resolves "a.txt" exactly as "/a.txt": in the
        # preopen whose name is the longest prefix of the path, "/" and "." both matching every
        # path and the higher fd winning between them. So a tree mounted at / is the working
        # directory: it comes first (fd 3, where a test that assumes one preopen looks) and
        # "." is not preopened; the workspace is /work (fd 4).
        root = next((tree for tree in trees if tree.guest == "/"), None)
        if root is not None:
            self._preopen_tree(wasi, self.inputs / "root", root)
        wasi.preopen_dir(str(self.work), "/work")
        if root is None:
            # Also as the working directory: relative paths resolve in the workspace (or in
            # the folder under it that the task names), as they do in a Docker task.
            here = self.work / request.workdir.removeprefix("/work/") if request.workdir else None
            if here is not None and here != self.work:
                here.mkdir(parents=True, exist_ok=True, mode=0o700)
            wasi.preopen_dir(str(here or self.work), ".")
        self._made = _make_output_dirs(self.work, request.outputs)
        if plain:
            files = self.inputs / "files"
            files.mkdir()
            write_files(files, plain)
            wasi.preopen_dir(str(files), "/input", fs_mutable=False)
        for index, tree in enumerate(trees):
            if tree.guest == "/":
                continue
            if tree.guest.startswith("/work/"):  # a writable copy, in the workspace
                where = tree.guest.removeprefix("/work/")
                write_files(
                    self.work, {f"{where}/{name}": data for name, data in tree.files.items()}
                )
                continue
            self._preopen_tree(wasi, self.inputs / f"mount{index}", tree)
        return wasi

    def _preopen_tree(self, wasi: wasmtime.WasiConfig, folder: Path, tree: MountedTree) -> None:
        """Show ``tree`` at its guest path from ``folder``: read-only, or a writable copy whose
        bytes count against the task's disk cap (with the workspace's)."""
        folder.mkdir()
        write_files(folder, tree.files)
        wasi.preopen_dir(str(folder), tree.guest, fs_mutable=tree.writable)
        if tree.writable:
            self._copies.append(folder)

    @staticmethod
    def _store(
        engine: wasmtime.Engine, settings: StoreSettings, wasi: wasmtime.WasiConfig
    ) -> wasmtime.Store:
        store = wasmtime.Store(engine)
        store.set_limits(
            memory_size=settings.memory_size,
            table_elements=settings.table_elements,
            instances=settings.instances,
            tables=settings.tables,
            memories=settings.memories,
        )
        store.set_wasi(wasi)
        if settings.fuel is not None:
            store.set_fuel(settings.fuel)
        return store

    def clear_workspace(self) -> None:
        """Empty the workspace, if the task left anything in it (before the reply goes out)."""
        if self._dirty:
            self._dirty = False
            remove_tree(self.work)
            self.work.mkdir(mode=0o700)

    def reset(self) -> None:
        """Finish clearing up after a task, once its reply is out (bounded, cheap work).

        The empty workspace is kept (directory operations cost ~100 us each on ext4) with its
        timestamps renewed, so that nothing, not even a timestamp, passes to the next task.
        """
        self._last_store = None
        if not self.work.is_dir():
            self.work.mkdir(mode=0o700)
        os.utime(self.work)
        if self._used_inputs:
            remove_tree(self.inputs)
            self._used_inputs = False
        if self._used_stdin:
            self.stdin.unlink(missing_ok=True)
            self._used_stdin = False


@dataclass(frozen=True)
class _Ending:
    """How a guest's run ended, before the reply is built."""

    outcome: str
    exit_code: int | None
    limit: str | None = None
    message: str = ""

    @property
    def abnormal(self) -> bool:
        return self.outcome == "trap" or (self.outcome == "exit" and self.exit_code != 0)


def _make_output_dirs(work: Path, outputs: tuple[str, ...]) -> list[Path]:
    """Make the parent folders of each output, and ``out`` itself (the default output, a
    folder), so that a program writes ``out/x`` or ``results/y.txt`` without making them
    first; the folders made, outermost first."""
    made: list[Path] = []
    for output in outputs:
        parts = Path(output).parts
        folder = work
        for part in parts if output == "out" else parts[:-1]:
            folder = folder / part
            if not folder.exists():
                folder.mkdir(mode=0o700)
                made.append(folder)
    return made


def _remove_if_empty(work: Path, folder: Path) -> None:
    """Remove ``folder`` (under ``work``) if it is still an empty folder, following no link
    the task made: each folder on the way must still be a folder (the guest has ended, so
    nothing changes them meanwhile)."""
    path = work
    for part in folder.relative_to(work).parts:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return
        except OSError:
            return
    with contextlib.suppress(OSError):
        folder.rmdir()  # fails unless empty; never follows a last component


def _function(exports: Any, name: str) -> wasmtime.Func | None:
    found = exports.get(name)
    return found if isinstance(found, wasmtime.Func) else None


def _call_start(
    pre: wasmtime.InstancePre, store: wasmtime.Store, limits: WasmLimits, request: RunRequest
) -> tuple[_Ending, wasmtime.Memory | None]:
    """Instantiate and run ``_start`` (a command), or ``_initialize`` and then the entry point
    (a reactor: its integer result is the exit code, passed to ``entry_exit`` if there is
    one); returns how it ended and the guest's memory. ``InvalidModule`` if the module lacks
    what it is asked to run."""
    memory = None
    try:
        instance = pre.instantiate(store)
        exports = instance.exports(store)
        found = exports.get("memory")
        memory = found if isinstance(found, wasmtime.Memory) else None
        if request.entry is None:
            start = _function(exports, "_start")
            if start is None:
                raise InvalidModule(
                    "module exports no _start function: it is not a WASI command (for a "
                    "reactor, give Task.entry, the export to call)"
                )
            start(store)
            return _Ending("exit", 0), memory
        entry = _function(exports, request.entry)
        finish = _function(exports, request.entry_exit) if request.entry_exit else None
        missing = [
            name
            for name, function in ((request.entry, entry), (request.entry_exit, finish))
            if name and function is None
        ]
        if missing or entry is None:
            names = sorted(name for name in exports if _function(exports, name) is not None)
            raise InvalidModule(
                f"entry: the module exports no function {missing[0]!r}; it exports "
                f"{', '.join(names[:20]) or 'no functions'}"
            )
        initialize = _function(exports, "_initialize")
        if initialize is not None:
            initialize(store)
        value = entry(store)
        code = value if isinstance(value, int) else 0
        if finish is not None:
            if finish.type(store).params:
                finish(store, code)
            else:
                finish(store)
        return _Ending("exit", code), memory
    except wasmtime.ExitTrap as exc:
        return _Ending("exit", exc.code), memory
    except wasmtime.Trap as trap:
        return _classify_trap(trap, limits), memory
    except wasmtime.WasmtimeError as exc:
        message = _first_line(exc)
        if "memory" in message and "limit" in message:
            return _Ending("limit", None, "memory", f"memory limit: {message}"), memory
        return _Ending("trap", None, None, message), memory


def _classify_trap(trap: wasmtime.Trap, limits: WasmLimits) -> _Ending:
    code = trap.trap_code
    what = _first_line(trap)
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return _Ending("limit", None, "fuel", f"task used its whole fuel budget of {limits.fuel}")
    if code == wasmtime.TrapCode.STACK_OVERFLOW:
        message = f"stack overflow (stack_size {limits.stack_size} bytes)"
        return _Ending("limit", None, "stack", message)
    if code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS:
        message = (
            f"guest trapped: {what} (in C programs often a stack overflow of the shadow stack "
            "or a null pointer dereference)"
        )
        return _Ending("trap", None, None, message)
    return _Ending("trap", None, None, f"guest trapped: {what}")


def scratch_usage(work: Path, copies: Sequence[Path]) -> DiskUsage:
    """What a task keeps on disk: its workspace and its writable copies of mounted trees
    together (the disk cap covers them all)."""
    total = largest = entries = 0
    for folder in (work, *copies):
        usage = disk_usage(folder, max_entries=MAX_WORKSPACE_ENTRIES - entries)
        total += usage.total
        largest = max(largest, usage.largest)
        entries += usage.entries
        if entries >= MAX_WORKSPACE_ENTRIES:
            break
    return DiskUsage(total, largest, entries)


def _blame_limits(
    ending: _Ending, peak: int | None, limits: WasmLimits, usage: DiskUsage
) -> _Ending:
    """Attribute the end of a run to a limit the guest hit.

    A workspace holding more than the disk cap (or ``MAX_WORKSPACE_ENTRIES`` entries) is a
    violation however the task ended (no single file can pass the cap: ``RLIMIT_FSIZE`` makes
    such writes fail with EFBIG; ``DiskWatch`` stops runs that outgrow it). wasmtime refuses
    ``memory.grow`` past the limit without telling the host, so a guest that ended abnormally
    with its linear memory within one sixteenth (at least 2 MiB) of the limit is reported as
    having hit it.
    """
    if ending.limit is not None:
        return ending
    file_size = limits.file_size
    if file_size is not None and file_size < limits.disk and usage.largest >= file_size:
        message = f"file size limit reached: a file grew to the {file_size} byte cap"
        return _Ending("limit", ending.exit_code, "file_size", message)
    if usage.largest >= limits.disk:
        message = f"disk limit reached: a file grew to the {limits.disk} byte cap"
        return _Ending("limit", ending.exit_code, "disk", message)
    if usage.total > limits.disk or usage.entries >= MAX_WORKSPACE_ENTRIES:
        message = (
            f"disk limit reached: the workspace held {usage.total} bytes in {usage.entries} "
            f"entries (caps: {limits.disk} bytes, {MAX_WORKSPACE_ENTRIES} entries)"
        )
        return _Ending("limit", ending.exit_code, "disk", message)
    if (
        ending.abnormal
        and peak is not None
        and peak + max(limits.memory // 16, 2 << 20) >= limits.memory
    ):
        message = f"memory limit reached: linear memory grew to {peak} of {limits.memory} bytes"
        return _Ending("limit", ending.exit_code, "memory", message)
    return ending


def serve(conn: Connection, runner: Runner) -> None:
    """Answer requests on ``conn`` until the parent hangs up."""
    runner.reset()
    conn.send_bytes(encode(Ready(wasmtime_version())))
    while True:
        try:
            request = decode(conn.recv_bytes())
            assert isinstance(request, RunRequest)
        except (EOFError, OSError):
            return
        try:
            pre = runner.prepare(conn, request)
            if pre is None:
                continue
            reply = runner.run(request, pre)
        except InvalidModule as exc:
            reply = RunReply(seq=request.seq, outcome="invalid", message=str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, never silenced
            reply = RunReply(seq=request.seq, outcome="error", message=f"worker error: {exc!r}")
        finally:
            runner.clear_workspace()
        conn.send_bytes(encode(reply))
        runner.reset()


_PR_SET_DUMPABLE = 4


def harden() -> None:
    """Defence in depth, should a guest ever escape wasmtime into this process: no core dumps
    of guest memory, no ptrace or /proc/<pid>/mem access by other processes of this user, no
    privileges gained through exec, and a seccomp deny-list (no exec, fork, sockets, ptrace,
    ...; see ``parity_sandbox._seccomp``). Runs before this process starts any thread."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if not _seccomp.install():
        print(f"no seccomp deny-list for {platform.machine()}; running without", file=sys.stderr)


def main(argv: list[str]) -> None:
    fd, output_fd, root, cache_dir = int(argv[0]), int(argv[1]), Path(argv[2]), Path(argv[3])
    # The parent decides about Ctrl-C; a file hitting the disk cap fails with EFBIG, not a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    harden()
    # Fds 1 and 2 become the guest's output pipes; this process's own output goes to its log.
    log = os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout = sys.stderr = log
    conn = Connection(fd)
    watch_parent()
    try:
        serve(conn, Runner(root, cache_dir, output_fd))
    finally:
        # Skip interpreter teardown: wasmtime's runtime threads can abort during it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
