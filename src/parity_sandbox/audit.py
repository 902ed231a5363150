"""The audit log: task ends and security-relevant actions, append-only and tamper-evident.

A log is a file of JSON lines, one entry per line::

    {"action": "task_end", "hash": HEX, "prev": HEX, "seq": 41,
     "time": "2026-05-01T12:00:00.123456Z", ...the action's fields}

``hash`` is the SHA-256 of the entry's canonical JSON without ``hash`` (keys sorted, no
whitespace, ASCII only); ``prev`` is the ``hash`` of the entry before it (``GENESIS``, 64
zeros, for seq 0), and ``seq`` counts from 0. So an entry that was edited no longer matches its
hash, and one removed, inserted or moved breaks the chain where it happened: ``verify_chain``
(``parity-sandbox audit verify``) names the first such entry, by file and line.

What the chain cannot show: entries cut from the end of the log, or a log rewritten whole by
someone who recomputes every hash. Against both, keep a copy elsewhere (``sink``: stdout or
syslog, which ship every entry as it is written) and check a hash noted there
(``verify_chain(..., head=HASH)``, ``audit verify --head``).

How entries are written, and why:

- one ``write`` of a whole line to a file opened ``O_APPEND``, then ``fdatasync`` (per entry, or
  at most every ``fsync_interval`` with ``fsync="batch"``);
- under a thread lock and an ``flock`` of the file, so threads and processes appending to one
  log keep one chain: each writer reads the last entry of the file under the lock (unless the
  file is as it left it);
- a process killed mid-write leaves a torn last line; the next writer cuts it (under the lock:
  no live writer is mid-line) and says so in a ``log_repaired`` entry, so the log always
  verifies up to its last whole entry;
- past ``rotate_bytes`` a file is renamed ``PATH.<seq of its last entry, 12 digits>`` and the
  next entry, in a new ``PATH``, follows the newest rotated file's last entry: pass the files in
  order (``PATH.* PATH``) to check the chain across them;
- every string is JSON-escaped into ASCII, so a hostile label or path can neither split a line
  nor put control characters on an operator's terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from parity_sandbox._exceptions import RuntimeUnavailable

if TYPE_CHECKING:
    from parity_sandbox._config import AuditSettings
    from parity_sandbox._models import Result

GENESIS = "0" * 64
#: The longest entry read back (a log's last line, to continue its chain).
MAX_ENTRY_BYTES = 1 << 20
_CHUNK = 1 << 16
_HEX64 = re.compile(r"[0-9a-f]{64}")
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW

Sink = Literal["none", "stdout", "syslog"]


def canonical(document: Mapping[str, Any]) -> bytes:
    """``document`` as the log writes it: keys sorted, no whitespace, ASCII only."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The hash of an entry: SHA-256 of its canonical JSON without ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def rotated_name(path: Path, seq: int) -> Path:
    """The name a log file gets when it is rotated after the entry ``seq``."""
    return path.with_name(f"{path.name}.{seq:012d}")


def rotated_files(path: Path) -> list[Path]:
    """``path``'s rotated files, oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.[0-9]{12}")
    with contextlib.suppress(FileNotFoundError), os.scandir(path.parent) as entries:
        return sorted(path.parent / e.name for e in entries if pattern.fullmatch(e.name))
    return []


class AuditLog:
    """Appends hash-chained entries to a JSON-lines file, to a sink, or both.

    Thread-safe, and safe with other processes appending to the same file. Use as a context
    manager or call ``close()``.

    Args:
        path: the log file (created ``0600``); ``None``: the sink only (the chain then starts
            anew in each process).
        fsync: ``entry`` (each entry is on disk when ``record`` returns) or ``batch``.
        fsync_interval: with ``batch``, the longest time between syncs.
        rotate_bytes: rotate the file once it reaches this size; ``None``: never.
        sink: also write each entry to ``stdout`` or ``syslog``.
        background: write task ends (``task_end``) and ``record_later``'s entries on a writer
            thread of the log's own, in the order they came, so that their caller never
            waits for the disk (the service's event loop); ``flush()`` waits for them.
    """

    def __init__(
        self,
        path: Path | str | None,
        *,
        fsync: Literal["entry", "batch"] = "entry",
        fsync_interval: float = 1.0,
        rotate_bytes: int | None = None,
        sink: Sink = "none",
        background: bool = False,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.background = background
        #: Entries for the writer thread: (action, fields), or a task end's (result, fields).
        self._pending: queue.Queue[tuple[str | Result, dict[str, Any]] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.rotate_bytes = rotate_bytes
        self.sink = sink
        #: Entries that could not be written (``task_end`` warns and goes on).
        self.failures = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        #: (inode, size, next seq, last hash) of the file as this log last left it.
        self._known: tuple[int, int, int, str] | None = None
        self._next = (0, GENESIS)  # the sink-only chain
        self._synced_at = time.monotonic()
        self._dirty = False
        self._closed = False
        if sink == "syslog":
            import syslog

            syslog.openlog("parity-sandbox", syslog.LOG_PID, syslog.LOG_AUTH)

    @classmethod
    def from_settings(cls, settings: AuditSettings, *, background: bool = False) -> Self:
        return cls(
            settings.path,
            fsync=settings.fsync,
            fsync_interval=settings.fsync_interval,
            rotate_bytes=settings.rotate_bytes,
            sink=settings.sink,
            background=background,
        )

    # -- writing ------------------------------------------------------------------------------

    def record(self, action: str, **fields: Any) -> dict[str, Any]:
        """Append an entry for ``action`` (``"task_cancelled"``, ``"key_revoked"``, ...) with
        ``fields`` (JSON values); returns the entry as written.

        Raises:
            RuntimeUnavailable: the log is closed, damaged at its end, or cannot be written.
        """
        if action in ("", "hash", "prev", "seq", "time") or not isinstance(action, str):
            raise ValueError(f"not an action name: {action!r}")
        reserved = {"action", "hash", "prev", "seq", "time"}.intersection(fields)
        if reserved:
            raise ValueError(f"reserved entry keys: {', '.join(sorted(reserved))}")
        with self._lock:
            if self._closed:
                raise RuntimeUnavailable("the audit log is closed")
            try:
                if self.path is None:
                    entry, line = self._seal(*self._next, action, fields)
                    self._next = (entry["seq"] + 1, entry["hash"])
                    lines = [line]
                else:
                    entry, lines = self._append_to_file(action, fields)
            except OSError as exc:
                raise RuntimeUnavailable(
                    f"cannot write the audit log {self.path}: {exc.strerror or exc}"
                ) from exc
            for written in lines:
                self._to_sink(written)
            return entry

    def task_end(
        self,
        result: Result,
        *,
        who: str | None,
        runtime: str,
        spec_hash: str | None,
        program: Mapping[str, str],
        limits: Mapping[str, Any],
    ) -> None:
        """Append the entry of a task's end: who asked, what ran (spec hash, module sha256 or
        image id, limits) and how it ended (status, result hash, usage, events).

        Never raises: a task's result must not be lost to its audit entry. A failure is
        warned about (``RuntimeWarning``) and counted in ``failures``. A ``background`` log
        writes it later, on its writer thread (the result is immutable).
        """
        fields = {
            "who": who,
            "runtime": runtime,
            "spec_hash": spec_hash,
            "program": dict(program),
            "limits": dict(limits),
        }
        if self.background:
            self._later(result, fields)
        else:
            self._write_task_end(result, fields)

    def record_later(self, action: str, **fields: Any) -> None:
        """``record``, on the writer thread for a ``background`` log (else now); never raises
        (a failure is warned about and counted, as for ``task_end``)."""
        if self.background:
            self._later(action, fields)
        else:
            self._record_or_warn(action, fields)

    def _later(self, item: str | Result, fields: dict[str, Any]) -> None:
        with self._lock:
            if self._writer is None and not self._closed:
                self._writer = threading.Thread(
                    target=self._write_pending, name="parity-sandbox-audit", daemon=True
                )
                self._writer.start()
        self._pending.put((item, fields))

    def _write_pending(self) -> None:
        """The writer thread: entries in the order they came; a ``batch`` log is synced once
        nothing more comes for ``fsync_interval``."""
        while True:
            try:
                item = self._pending.get(timeout=self.fsync_interval if self._dirty else None)
            except queue.Empty:
                with contextlib.suppress(OSError):
                    self.flush()
                continue
            try:
                if item is None:
                    return
                what, fields = item
                if isinstance(what, str):
                    self._record_or_warn(what, fields)
                else:
                    self._write_task_end(what, fields)
            finally:
                self._pending.task_done()

    def _record_or_warn(self, action: str, fields: Mapping[str, Any]) -> None:
        try:
            self.record(action, **fields)
        except (RuntimeUnavailable, ValueError) as exc:
            self.failures += 1
            warnings.warn(
                f"audit log: an entry ({action}) was not written: {exc}", RuntimeWarning, 3
            )

    def _write_task_end(self, result: Result, fields: Mapping[str, Any]) -> None:
        try:
            self.record(
                "task_end",
                who=fields["who"],
                runtime=fields["runtime"],
                task_id=result.task_id,
                spec_hash=fields["spec_hash"],
                program=fields["program"],
                limits=fields["limits"],
                status=result.status.value,
                exit_code=result.exit_code,
                limit=result.limit,
                result_hash=result.result_hash,
                cached=result.cached,
                usage=result.usage.model_dump(),
                events=[event.model_dump(mode="json") for event in result.events],
                **(
                    {"connections": [c.model_dump(mode="json") for c in result.connections]}
                    if result.connections
                    else {}
                ),
            )
        except (RuntimeUnavailable, ValueError) as exc:
            self.failures += 1
            warnings.warn(f"audit log: a task's end was not written: {exc}", RuntimeWarning, 3)

    def flush(self) -> None:
        """Write what waits for the writer thread, then sync what was written to disk now
        (``fsync="batch"`` syncs lazily)."""
        if self._writer is not None and threading.current_thread() is not self._writer:
            self._pending.join()
        with self._lock:
            if self._fd is not None and self._dirty:
                os.fdatasync(self._fd)
                self._dirty = False
                self._synced_at = time.monotonic()

    def close(self) -> None:
        """Write what waits for the writer thread, sync and close the file. Safe to call
        twice."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            self._pending.put(None)
            writer.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd is not None:
                try:
                    if self._dirty:
                        os.fdatasync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the file -----------------------------------------------------------------------------

    def _append_to_file(
        self, action: str, fields: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[bytes]]:
        fd, info = self._lock_file()
        try:
            seq, prev, dropped = self._tail(fd, info)
            lines: list[bytes] = []
            if dropped:
                repair, line = self._seal(seq, prev, "log_repaired", {"dropped_bytes": dropped})
                lines.append(line)
                seq, prev = seq + 1, repair["hash"]
            entry, line = self._seal(seq, prev, action, fields)
            lines.append(line)
            _write_all(fd, b"".join(written + b"\n" for written in lines))
            self._dirty = True
            if self.fsync == "entry" or time.monotonic() - self._synced_at >= self.fsync_interval:
                os.fdatasync(fd)
                self._dirty = False
                self._synced_at = time.monotonic()
            size = os.fstat(fd).st_size
            self._known = (info.st_ino, size, entry["seq"] + 1, entry["hash"])
            if self.rotate_bytes is not None and size >= self.rotate_bytes:
                self._rotate(fd, entry["seq"])
        finally:
            if self._fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return entry, lines

    def _lock_file(self) -> tuple[int, os.stat_result]:
        """The log file's descriptor, locked, and its status; reopened if another writer
        rotated the file meanwhile."""
        assert self.path is not None
        while True:
            if self._fd is None:
                self._fd = os.open(self.path, _OPEN_FLAGS, 0o600)
                self._known = None
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            info = os.fstat(self._fd)
            try:
                current = self.path.lstat()
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (
                info.st_dev,
                info.st_ino,
            ):
                return self._fd, info
            self._drop_fd()

    def _drop_fd(self) -> None:
        assert self._fd is not None
        try:
            if self._dirty:
                os.fdatasync(self._fd)
                self._dirty = False
        finally:
            os.close(self._fd)  # also releases the lock
            self._fd = None
            self._known = None

    def _tail(self, fd: int, info: os.stat_result) -> tuple[int, str, int]:
        """The next seq and the last hash of the chain, and the bytes of a torn last line
        cut from the file (a writer killed mid-line); called under the lock."""
        known = self._known
        if known is not None and known[0] == info.st_ino and known[1] == info.st_size:
            return known[2], known[3], 0
        last, torn_at = _last_line(fd, info.st_size)
        dropped = 0
        if torn_at is not None:
            dropped = info.st_size - torn_at
            os.ftruncate(fd, torn_at)
        if last is None:
            # A new file: the chain goes on from the newest rotated one, if any.
            assert self.path is not None
            older = rotated_files(self.path)
            if not older:
                return 0, GENESIS, dropped
            with _opened(older[-1]) as old_fd:
                last, _ = _last_line(old_fd, os.fstat(old_fd).st_size)
            if last is None:
                raise RuntimeUnavailable(f"the rotated audit log {older[-1]} is empty")
        seq, digest = _chain_point(last, self.path)
        return seq + 1, digest, dropped

    def _rotate(self, fd: int, last_seq: int) -> None:
        """Rename the full file (still locked: no one appends meanwhile) and let go of it."""
        assert self.path is not None
        if self._dirty:
            os.fdatasync(fd)
            self._dirty = False
        self.path.rename(rotated_name(self.path, last_seq))
        _sync_directory(self.path.parent)
        self._drop_fd()

    # -- entries ------------------------------------------------------------------------------

    @staticmethod
    def _seal(
        seq: int, prev: str, action: str, fields: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        entry: dict[str, Any] = {
            **fields,
            "action": action,
            "seq": seq,
            "prev": prev,
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        }
        entry["hash"] = entry_hash(entry)
        return entry, canonical(entry)

    def _to_sink(self, line: bytes) -> None:
        if self.sink == "stdout":
            sys.stdout.write(line.decode("ascii") + "\n")
            sys.stdout.flush()
        elif self.sink == "syslog":
            import syslog

            syslog.syslog(syslog.LOG_INFO, line.decode("ascii"))


def open_audit(settings: AuditSettings) -> AuditLog | None:
    """The audit log ``settings`` describe, or ``None`` when it is off."""
    return AuditLog.from_settings(settings) if settings.enabled else None


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokenEntry:
    """Where a chain breaks: a file, its line (from 1) and why."""

    file: Path
    line: int
    reason: str


@dataclass(frozen=True)
class ChainCheck:
    """What ``verify_chain`` found."""

    #: Whole entries that verified (all of them when ``broken`` is ``None``).
    entries: int
    #: The hash of the last entry that verified (``None``: none did).
    head: str | None
    #: The first entry that breaks the chain, if any.
    broken: BrokenEntry | None = None
    #: A last line cut short (its writer was killed mid-line): file and line; not a break.
    torn: tuple[Path, int] | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify_chain(
    files: Sequence[Path], *, after: str | None = None, head: str | None = None
) -> ChainCheck:
    """Check the hash chain of a log given as its files in order (rotated ones first).

    Args:
        files: the files; the first starts the chain at seq 0, unless ``after`` is given.
        after: the hash of the entry just before the first file's first one (when older
            rotated files are gone).
        head: a hash noted elsewhere (a sink's copy): it must be in the chain, or the log was
            cut short before it.
    """
    chain = _Chain(after)
    for index, path in enumerate(files):
        try:
            with path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if not raw.endswith(b"\n"):
                        if index == len(files) - 1:  # the end of the log
                            return chain.result(torn=(path, number))
                        return chain.result(BrokenEntry(path, number, "the line is cut short"))
                    reason = chain.take(raw[:-1])
                    if reason:
                        return chain.result(BrokenEntry(path, number, reason))
        except OSError as exc:
            return chain.result(BrokenEntry(path, 0, f"unreadable: {exc.strerror or exc}"))
    if head is not None and head not in chain.hashes:
        end = files[-1] if files else Path()
        reason = f"the entry {head} is not in the log: entries were cut from its end"
        return chain.result(BrokenEntry(end, 0, reason))
    return chain.result()


class _Chain:
    """The state of ``verify_chain``: what the next entry must say."""

    def __init__(self, after: str | None) -> None:
        self.after = after
        self.prev = after or GENESIS
        self.seq: int | None = None if after else 0
        self.count = 0
        self.last: str | None = None
        self.hashes: set[str] = set()

    def take(self, raw: bytes) -> str:
        """Check the next entry; why it breaks the chain, or ``""``."""
        problem, entry = _check_entry(raw)
        if entry is None:
            return problem
        if entry["prev"] != self.prev:
            if self.count == 0 and not self.after:
                return "the log does not start at its first entry (seq 0, prev GENESIS)"
            return (
                "does not follow the entry before it: an entry was removed, inserted or moved "
                "here, or the one before it was changed"
            )
        if self.seq is not None and entry["seq"] != self.seq:
            return f"seq {entry['seq']} where {self.seq} belongs"
        if problem:
            return problem
        self.count += 1
        self.last = self.prev = entry["hash"]
        self.seq = entry["seq"] + 1
        self.hashes.add(entry["hash"])
        return ""

    def result(
        self, broken: BrokenEntry | None = None, torn: tuple[Path, int] | None = None
    ) -> ChainCheck:
        return ChainCheck(self.count, self.last, broken, torn)


def _check_entry(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """``("", entry)`` for a whole, intact entry; ``(why, entry)`` for one whose content does
    not match its hash; ``(why, None)`` for a line that is no entry."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return "not a JSON entry", None
    if not isinstance(entry, dict):
        return "not a JSON entry", None
    digest, prev, seq = entry.get("hash"), entry.get("prev"), entry.get("seq")
    if not (
        isinstance(digest, str)
        and _HEX64.fullmatch(digest)
        and isinstance(prev, str)
        and isinstance(seq, int)
        and not isinstance(seq, bool)
    ):
        return "not an audit entry (no hash, prev or seq)", None
    try:
        actual = entry_hash(entry)
    except ValueError:
        return "not an audit entry", None
    if actual != digest:
        return "the entry was changed: its content does not match its hash", entry
    return "", entry


def read_entries(path: Path) -> Iterator[dict[str, Any] | bytes]:
    """The entries of a log file, in order; a line that is no JSON object comes as bytes."""
    with path.open("rb") as handle:
        for raw in handle:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            yield entry if isinstance(entry, dict) else raw.rstrip(b"\n")


def _last_line(fd: int, size: int) -> tuple[bytes | None, int | None]:
    """The last whole line of the file (``None``: there is none) and, when the file does not
    end with a newline, the offset where its torn last line starts."""
    if size == 0:
        return None, None
    window = min(size, _CHUNK)
    while True:
        start = size - window
        data = os.pread(fd, window, start)
        torn_at = None
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n")
            if cut >= 0:
                torn_at = start + cut + 1
                data = data[: cut + 1]
            elif start == 0:
                return None, 0  # nothing but a torn line
        if data.endswith(b"\n"):
            body = data[:-1]
            before = body.rfind(b"\n")
            if before >= 0 or start == 0:
                return body[before + 1 :], torn_at
        if window >= 4 * MAX_ENTRY_BYTES:
            raise RuntimeUnavailable("the audit log ends in a line longer than any entry")
        window = min(size, window * 4)


def _chain_point(line: bytes, path: Path | None) -> tuple[int, str]:
    """The seq and hash of the entry ``line``, to chain the next one to it."""
    problem, entry = _check_entry(line)
    if entry is None or problem:
        raise RuntimeUnavailable(
            f"the audit log {path} ends in a damaged entry ({problem}); run "
            "parity-sandbox audit verify on it"
        )
    return int(entry["seq"]), str(entry["hash"])


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    with contextlib.suppress(OSError), _opened(directory) as fd:
        os.fsync(fd)
