"""Bytes in and out of a container: the attach stream, input archives and output archives.

Nothing here talks to Docker; each piece takes or gives bytes so that it can be tested alone.

- :class:`Demux` splits Docker's multiplexed attach stream into stdout and stderr and keeps at
  most ``cap + 1`` bytes of each, whatever the task prints (the rest is counted and dropped). It
  also watches for the trailer that ``parity-init`` writes on both streams once the task and
  everything it started are gone: the run's secret, the exit status, whether outputs exist, and
  whether the command could not be started at all.
- :func:`input_archive` packs a task's input files as a tar that lands read-only (root-owned,
  mode 0444/0555) under ``/input``.
- :func:`read_outputs` reads the tar Docker gives for an output path and keeps regular files
  only, under caps. Symlinks, devices, FIFOs and names that would escape are skipped; a hard
  link to a file already read gets a copy of its bytes. Nothing is materialised: the bytes stay
  in memory and reach the host's disk only through the CLI's safe writer.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from parity_sandbox._fs import NotFollowed, OutputCaps

STDOUT, STDERR = 1, 2
SECRET_BYTES = 32
_HEADER = 8
# The secret, the exit status, whether outputs exist, and what could not be started (a stage
# and an errno; 0, 0 when the command started).
_TRAILER = SECRET_BYTES + 4
#: The stages at which parity-init can fail to start a command, by the byte it reports.
LAUNCH_STAGES = {ord("w"): "workdir", ord("x"): "exec", ord("f"): "fork"}


def _pair() -> dict[int, Any]:
    return {STDOUT: bytearray(), STDERR: bytearray()}


@dataclass
class Demux:
    """Docker's stream framing: 8-byte headers (stream, 0, 0, 0, big-endian size), then data.

    Args:
        cap: bytes kept of each stream.
        secret: the run's secret; the stream is complete once both streams end with it, the
            exit status and a flag (``exit_code`` and ``outputs_exist`` are then set).
    """

    cap: int
    secret: bytes = b""
    streams: dict[int, bytearray] = field(default_factory=_pair)
    seen: dict[int, int] = field(default_factory=lambda: {STDOUT: 0, STDERR: 0})
    exit_code: int | None = None
    outputs_exist: bool = False
    #: Set when the command never started: the stage that failed and its errno.
    launch_failure: tuple[str, int] | None = None
    _tails: dict[int, bytearray] = field(default_factory=_pair)
    _header: bytearray = field(default_factory=bytearray)
    _stream: int = 0
    _left: int = 0

    def feed(self, data: memoryview | bytes) -> None:
        """Take the next bytes of the stream, in pieces of any size."""
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            if self._left == 0:
                take = min(_HEADER - len(self._header), end - at)
                self._header += view[at : at + take]
                at += take
                if len(self._header) == _HEADER:
                    self._stream = self._header[0]
                    self._left = int.from_bytes(self._header[4:8], "big")
                    self._header.clear()
                continue
            take = min(self._left, end - at)
            kept = self.streams.get(self._stream)
            if kept is not None:
                piece = view[at : at + take]
                room = self.cap + _TRAILER - len(kept)
                if room > 0:
                    kept += piece[:room]
                self.seen[self._stream] += take
                tail = self._tails[self._stream]
                tail += piece[-_TRAILER:]
                del tail[:-_TRAILER]
            at += take
            self._left -= take
        self._check_done()

    def _check_done(self) -> None:
        if not self.secret or self.exit_code is not None:
            return
        tails = self._tails.values()
        if all(len(t) == _TRAILER and t[:SECRET_BYTES] == self.secret for t in tails):
            trailer = self._tails[STDOUT][SECRET_BYTES:]
            self.exit_code = trailer[0]
            self.outputs_exist = bool(trailer[1])
            if trailer[2]:
                self.launch_failure = (LAUNCH_STAGES.get(trailer[2], "exec"), trailer[3])

    def output(self, stream: int) -> tuple[bytes, bool]:
        """The kept bytes of ``stream`` (at most ``cap``) and whether more were printed."""
        printed = self.seen[stream] - (_TRAILER if self.exit_code is not None else 0)
        kept = self.streams[stream]
        return bytes(kept[: min(self.cap, printed)]), printed > self.cap


def input_archive(files: Mapping[str, bytes], owner: tuple[int, int] | None = None) -> bytes:
    """A tar of ``files`` (validated relative names) owned by root, read-only for the task;
    or, given ``owner`` (the task's uid and gid), the task's own and writable."""
    buffer = io.BytesIO()
    made: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            parts = name.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    archive.addfile(
                        _entry(directory, tarfile.DIRTYPE, 0o755 if owner else 0o555, owner)
                    )
            data = files[name]
            entry = _entry(name, tarfile.REGTYPE, 0o644 if owner else 0o444, owner)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def archive_bytes(files: Mapping[str, bytes]) -> int:
    """What ``files`` take on a tmpfs (page-rounded), for sizing the input volume."""
    return sum(-(-len(content) // 4096) * 4096 + 4096 for content in files.values())


def _entry(
    name: str, kind: bytes, mode: int, owner: tuple[int, int] | None = None
) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.mode = mode
    entry.uid, entry.gid = owner or (0, 0)
    return entry


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks that stops after ``limit`` bytes."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""
        self.left = limit
        self.exhausted = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self.left <= 0:
                self.exhausted = True
                return 0
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending), self.left)
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        self.left -= size
        return size


@dataclass
class Collected:
    """Files collected so far over every output path, and whether a cap left some out."""

    caps: OutputCaps
    files: dict[str, bytes] = field(default_factory=dict)
    truncated: bool = False
    total: int = 0
    #: Symlinks, FIFOs and devices in the archives: left out (never materialised).
    not_followed: NotFollowed = field(default_factory=NotFollowed)


def read_outputs(chunks: Iterable[bytes], path: str, into: Collected) -> None:
    """Add the regular files of the tar Docker gives for ``/work/<path>`` to ``into``.

    The archive's top entry is the last component of ``path``; files are named relative to
    ``/work`` (``out/result.txt``), as the WebAssembly runtime names them.
    """
    caps = into.caps
    parent = posixpath.dirname(path)
    # A tar of a full workspace is at most about its files plus a header block per entry.
    reader = _ChunkReader(chunks, caps.max_total_bytes + 1024 * caps.max_entries)
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as archive:
            for member in archive:
                name = _safe_name(member.name, caps.max_depth)
                if name is None:
                    continue
                full = f"{parent}/{name}" if parent else name
                if full in into.files:
                    continue
                if member.islnk():
                    # A second name of a file collected before: copy its bytes, in memory.
                    target = _safe_name(member.linkname, caps.max_depth)
                    same = into.files.get(f"{parent}/{target}" if parent else (target or ""))
                    if same is not None and len(into.files) < caps.max_files:
                        if len(same) <= caps.max_total_bytes - into.total:
                            into.files[full] = same
                            into.total += len(same)
                            continue
                        into.truncated = True
                    continue
                if not member.isreg():
                    if not member.isdir():
                        into.not_followed.add(full, _member_kind(member))
                    continue
                if len(into.files) >= caps.max_files or member.size > min(
                    caps.max_file_bytes, caps.max_total_bytes - into.total
                ):
                    into.truncated = True
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                data = handle.read(member.size + 1)
                if len(data) != member.size:
                    into.truncated = True
                    continue
                into.files[full] = data
                into.total += len(data)
    except tarfile.TarError:
        into.truncated = True
    if reader.exhausted:
        into.truncated = True


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.isfifo():
        return "fifo"
    if member.ischr() or member.isblk():
        return "device"
    return "other"


def _safe_name(name: str, max_depth: int) -> str | None:
    """``name`` if it is a plain relative path without ``..`` and not too deep, else ``None``."""
    if not name or "\x00" in name or name.startswith("/") or "\\" in name:
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts or len(parts) > max_depth + 1:
        return None
    return "/".join(parts)
