"""The WebAssembly runtime: WASI preview 1 command modules under wasmtime, in warm workers.

A task flows like this: the parent validates it and resolves its limits, reads and hashes the
module, then hands a :class:`RunRequest` to an idle worker process (see ``_wasm_worker``). The
worker loads the module (memory cache, disk cache, or compile), runs it in a fresh store with a
fresh workspace, and replies. The parent waits at most timeout + grace; a worker that does not
answer by then is killed (the only way to stop a guest asleep in a host call), its partial
output recovered from the memory it shares with the parent, and its directory removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import parity_sandbox
from parity_sandbox._config import Config
from parity_sandbox._exceptions import ExecutionError, InvalidInput, RuntimeUnavailable
from parity_sandbox._executor import Cancelled, Executor
from parity_sandbox._fs import collect_outputs, remove_tree
from parity_sandbox._models import (
    MAX_INPUT_BYTES,
    MAX_MODULE_BYTES,
    Limits,
    Result,
    Status,
    Task,
)
from parity_sandbox.runtimes._wasm_protocol import (
    MAX_WASM_MEMORY,
    OUTPUT_BUFFER_SIZE,
    Loaded,
    NeedModule,
    Ready,
    RunReply,
    RunRequest,
    WasmLimits,
    output_slot,
)

#: Slack past a task's timeout before its worker is killed (covers the request's delivery).
KILL_GRACE = 0.05
#: How long a worker may take to start, and to compile a module it has not seen.
STARTUP_TIMEOUT = 60.0
COMPILE_TIMEOUT = 60.0
ROOT_PREFIX = "parity-sandbox-wasm-"
_WASM_MAGIC = b"\0asm\x01\0\0\0"
_LOCK_NAME = ".lock"


def wasm_limits(limits: Limits) -> WasmLimits:
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
    )


def _identity(info: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another: device, inode, size and change times."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


_STATUS = {
    "timeout": Status.TIMEOUT,
    "limit": Status.RESOURCE_LIMIT,
    "trap": Status.ERROR,
    "invalid": Status.ERROR,
    "error": Status.ERROR,
}
_ERROR_TYPE = {
    Status.TIMEOUT: "ExecutionTimeout",
    Status.RESOURCE_LIMIT: "ResourceLimitExceeded",
    Status.ERROR: "ExecutionError",
}


def _read_host_file(path: Path, field: str, limit: int) -> tuple[bytes, tuple[int, ...]]:
    """Read a regular host file named by the caller, refusing FIFOs, devices and huge files.

    Returns the content and the identity of the version read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise InvalidInput(f"{field}: cannot open {path}: {exc.strerror}", field=field) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(f"{field}: {path} is not a regular file", field=field)
        if info.st_size > limit:
            raise InvalidInput(f"{field}: {path} is larger than {limit} bytes", field=field)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidInput(f"{field}: {path} is larger than {limit} bytes", field=field)
    return data, _identity(info)


def _check_module(module: bytes) -> str:
    """Check the header of a WASI preview 1 module and return its sha256."""
    if module[:4] != _WASM_MAGIC[:4]:
        raise InvalidInput("wasm_file: not a WebAssembly module (no \\0asm header)", field="wasm")
    if module[:8] != _WASM_MAGIC:
        raise InvalidInput(
            "wasm_file: a WebAssembly component or unknown version; only WASI preview 1 "
            "command modules are supported",
            field="wasm",
        )
    return hashlib.sha256(module).hexdigest()


class _ModuleFiles:
    """Module files read recently, so that an unchanged file is neither re-read nor re-hashed."""

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: OrderedDict[str, tuple[tuple[int, ...], bytes, str]] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def load(self, task: Task) -> tuple[bytes, str]:
        """The module of ``task`` and its sha256."""
        if task.wasm_file is None:
            assert task.wasm_module is not None
            return task.wasm_module, _check_module(task.wasm_module)
        name = os.fspath(task.wasm_file)
        with self._lock:
            cached = self._entries.get(name)
        if cached is not None:
            # One stat decides: the same identity means the same bytes as read before.
            with contextlib.suppress(OSError):
                if _identity(task.wasm_file.stat()) == cached[0]:
                    return cached[1], cached[2]
        data, identity = _read_host_file(task.wasm_file, "wasm_file", MAX_MODULE_BYTES)
        sha = _check_module(data)
        with self._lock:
            self._entries[name] = (identity, data, sha)
            self._entries.move_to_end(name)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return data, sha


def _input_files(task: Task) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for name, content in task.input_files.items():
        if isinstance(content, Path):
            data, _ = _read_host_file(content, f"input_files[{name}]", MAX_INPUT_BYTES - total)
        else:
            data = bytes(content)
        total += len(data)
        files[name] = data
    return files


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
            fd = os.open(Path(path) / _LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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


class _Worker:
    """One worker process and its private directory."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700)
        ours, theirs = socket.socketpair()
        # Output is shared memory: it survives a kill, and costs no syscall per task.
        self.output_fd = os.memfd_create("parity-sandbox-output", os.MFD_CLOEXEC)
        os.ftruncate(self.output_fd, OUTPUT_BUFFER_SIZE)
        env = dict(os.environ)
        package_root = str(Path(parity_sandbox.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        try:
            with (root / "worker.log").open("wb") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "parity_sandbox.runtimes._wasm_worker",
                        str(theirs.fileno()),
                        str(self.output_fd),
                        str(root),
                        str(cache_dir),
                    ],
                    pass_fds=(theirs.fileno(), self.output_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            ours.close()
            os.close(self.output_fd)
            raise RuntimeUnavailable(f"cannot start a wasm worker process: {exc}") from exc
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.poller = select.poll()
        self.poller.register(self.conn.fileno(), select.POLLIN)
        self.version = ""
        self._killed = False
        self._kill_lock = threading.Lock()
        self.modules: set[tuple[tuple[int, bool], str]] = set()

    def ensure_ready(self) -> str:
        """Wait until the worker has started; returns its wasmtime version."""
        if not self.version:
            if not self.conn.poll(STARTUP_TIMEOUT):
                raise RuntimeUnavailable("a wasm worker did not start within 60 s")
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
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
            self._killed = True
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.conn.close()
        os.close(self.output_fd)
        with contextlib.suppress(OSError):
            remove_tree(self.root)


class _Pool:
    """Up to ``size`` warm workers; a task takes an idle one or starts one."""

    def __init__(self, size: int, root: Path, cache_dir: Path) -> None:
        self.size = size
        self._root = root
        self._cache_dir = cache_dir
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._starting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._names = itertools.count()

    def _spawn(self) -> _Worker:
        worker = _Worker(self._root / f"w{next(self._names)}", self._cache_dir)
        self._all.add(worker)
        return worker

    def prestart(self) -> None:
        with self._cond:
            self._idle.append(self._spawn())

    def acquire(self, cancel: threading.Event | None) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeUnavailable("the WasmExecutor is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) + self._starting < self.size:
                    self._starting += 1
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled while waiting for a worker")
                self._cond.wait(0.05)
        try:
            with self._cond:
                return self._spawn()
        finally:
            with self._cond:
                self._starting -= 1

    def release(self, worker: _Worker) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        self.discard(worker)

    def discard(self, worker: _Worker) -> None:
        """Kill ``worker`` and start its replacement, so the next task finds a warm one."""
        worker.kill()
        with self._cond:
            self._all.discard(worker)
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
            if not self._closed:
                with contextlib.suppress(RuntimeUnavailable):
                    self._idle.append(self._spawn())
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.kill()


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
    """

    runtime_name = "wasm"

    def __init__(self, config: Config | None = None, *, workers: int | None = None) -> None:
        super().__init__(config)
        size = workers or self.config.wasm.workers or os.cpu_count() or 1
        self._limits = self.config.limits_for("wasm")
        # Rejects, now, a configuration this runtime cannot honour.
        self._default_limits = wasm_limits(self._limits)
        reap_stale_roots()
        self._root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
        self._lock_fd = os.open(self._root / _LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._pool = _Pool(size, self._root, self.config.resolved_cache_dir() / "wasm-modules")
        self._seq = itertools.count()
        self._modules = _ModuleFiles()
        try:
            self._pool.prestart()
        except BaseException:
            self._close()
            raise

    def max_parallel(self) -> int:
        return self._pool.size

    def _execute(self, task: Task, cancel: threading.Event | None) -> Result:
        if task.runtime not in (None, "wasm"):
            raise InvalidInput(f"runtime: this executor runs wasm tasks, not {task.runtime}")
        limits = self._default_limits
        if task.limits.model_fields_set:
            limits = wasm_limits(self._limits.merged(task.limits))
        module, sha = self._modules.load(task)
        argv0 = task.wasm_file.name if task.wasm_file is not None else "task.wasm"
        request = RunRequest(
            seq=next(self._seq),
            module_sha256=sha,
            module=None,
            argv=(argv0, *task.args),
            env=tuple(task.env.items()),
            stdin=task.input,
            input_files=_input_files(task),
            outputs=task.outputs,
            limits=limits,
        )
        worker = self._pool.acquire(cancel)
        try:
            version = worker.ensure_ready()
            if (limits.engine_key, sha) not in worker.modules:
                request = replace(request, module=module)
            reply = self._exchange(worker, request, module, cancel)
        except (EOFError, OSError):
            detail = worker.describe_death()
            self._pool.discard(worker)
            if self.closed:
                raise RuntimeUnavailable("the executor was closed while the task ran") from None
            raise ExecutionError(f"the task crashed its worker: {detail}") from None
        except BaseException:
            # A cancel, Ctrl-C or a failed start: the worker may be mid-task, so it dies.
            self._pool.discard(worker)
            raise
        if reply is None:
            reply = self._partial_reply(worker, request)
            self._pool.discard(worker)
        elif reply.outcome == "error":
            self._pool.discard(worker)
        else:
            worker.modules.add((limits.engine_key, sha))
            self._pool.release(worker)
        result = self._to_result(task, reply, sha, version)
        if result.status in (Status.SUCCEEDED, Status.FAILED):
            return result
        error = result.to_error()
        assert error is not None
        raise error

    def _exchange(
        self, worker: _Worker, request: RunRequest, module: bytes, cancel: threading.Event | None
    ) -> RunReply | None:
        """Send ``request`` and wait for its reply; ``None`` when the deadline passed."""
        budget = request.limits.timeout + KILL_GRACE
        worker.conn.send(request)
        deadline = time.monotonic() + budget + (COMPILE_TIMEOUT if request.module else 0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if cancel is not None:
                if cancel.is_set():
                    raise Cancelled("the task was cancelled")
                remaining = min(remaining, 0.05)
            if not worker.poller.poll(remaining * 1000):
                continue
            message = worker.conn.recv()
            if isinstance(message, Loaded):
                deadline = time.monotonic() + budget
            elif isinstance(message, NeedModule):
                request = replace(request, module=module)
                worker.conn.send(request)
                deadline = time.monotonic() + budget + COMPILE_TIMEOUT
            else:
                assert isinstance(message, RunReply) and message.seq == request.seq
                return message

    def _partial_reply(self, worker: _Worker, request: RunRequest) -> RunReply:
        """Kill a worker past its deadline; return its mirrored output and workspace files."""
        worker.proc.kill()
        worker.proc.wait()
        cap = request.limits.output
        stdout, stdout_truncated = worker.read_output(0, cap)
        stderr, stderr_truncated = worker.read_output(1, cap)
        files, files_truncated = collect_outputs(
            worker.root / "work", request.outputs, request.output_caps
        )
        return RunReply(
            seq=request.seq,
            outcome="timeout",
            message=f"task exceeded its {request.limits.timeout:g} s timeout and was killed",
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=stdout_truncated,
            stderr_truncated=stderr_truncated,
            files=files,
            files_truncated=files_truncated,
            duration=request.limits.timeout,
        )

    def _to_result(self, task: Task, reply: RunReply, sha: str, version: str) -> Result:
        status = _STATUS.get(reply.outcome)
        if status is None:
            status = Status.SUCCEEDED if reply.exit_code == 0 else Status.FAILED
        error_type = _ERROR_TYPE.get(status)
        if reply.outcome == "invalid":
            error_type = "InvalidInput"
        # model_validate on a plain dict is pydantic's fastest path, faster than model_construct.
        return Result.model_validate(
            {
                "status": status,
                "exit_code": reply.exit_code,
                "stdout": reply.stdout,
                "stderr": reply.stderr,
                "stdout_truncated": reply.stdout_truncated,
                "stderr_truncated": reply.stderr_truncated,
                "files": reply.files,
                "files_truncated": reply.files_truncated,
                "duration": reply.duration,
                "usage": {
                    "cpu_time": reply.cpu_time,
                    "peak_memory": reply.peak_memory,
                    "fuel_used": reply.fuel_used,
                },
                "runtime": {"name": "wasm", "version": f"wasmtime {version}", "module_sha256": sha},
                "limit": reply.limit,
                "error": {"type": error_type, "message": reply.message} if error_type else None,
                "task_id": task.id,
                "labels": task.labels,
            }
        )

    def _close(self) -> None:
        self._pool.close()
        try:
            remove_tree(self._root)
        finally:
            os.close(self._lock_fd)
