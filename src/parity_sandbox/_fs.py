"""Host-side file handling of sandbox directories, safe against what a task leaves behind.

A task can fill its workspace with symlinks to host paths, FIFOs, devices, trees thousands of
levels deep and tens of thousands of files. Everything here therefore works on directory file
descriptors, opens with ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a FIFO cannot hang a read), reads
regular files only, walks iteratively (no recursion), and caps depth, count and size.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._units import split_mount

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

MiB = 1 << 20


def file_identity(info: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another: device, inode, size and change times."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def read_host_file(path: Path, field: str, limit: int) -> tuple[bytes, tuple[int, ...]]:
    """Read a regular host file named by the caller, refusing FIFOs, devices and huge files.

    Returns the content and the identity of the version read.

    Raises:
        InvalidInput: ``path`` cannot be opened, is not a regular file, or is over ``limit``.
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
    return data, file_identity(info)


@dataclass(frozen=True)
class OutputCaps:
    """Bounds on what is collected from a finished task's workspace."""

    max_files: int = 1000
    max_file_bytes: int = 64 * MiB
    max_total_bytes: int = 256 * MiB
    max_depth: int = 32
    #: Directory entries looked at, in all, before the walk gives up.
    max_entries: int = 100_000


#: Entries a ``NotFollowed`` names (it counts them all).
NOT_FOLLOWED_NAMED = 5


@dataclass
class NotFollowed:
    """Entries under the output paths that were neither regular files nor directories
    (symlinks, FIFOs, devices, sockets): never opened nor followed, and left out. All are
    counted; the first few are named, as ``(path, kind)``."""

    count: int = 0
    paths: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, kind: str) -> None:
        self.count += 1
        if len(self.paths) < NOT_FOLLOWED_NAMED:
            self.paths.append((path, kind))


def special_kind(mode: int) -> str:
    """What a file that is not regular nor a directory is (``mode``: its ``lstat`` mode)."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"


def _open_dir_at(root_fd: int, parts: tuple[str, ...]) -> int:
    """Open the directory ``root/parts...`` without following any symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _walk_files(
    root_fd: int,
    start: tuple[str, ...],
    max_depth: int,
    max_entries: int,
    *,
    directories: bool = False,
) -> Iterator[tuple[tuple[str, ...], int, os.DirEntry[str]]]:
    """Yield ``(path parts, dir fd, entry)`` for every non-directory below ``start``.

    The walk is iterative and never follows symlinks; directories deeper than ``max_depth``
    and entries past ``max_entries`` are not visited. With ``directories``, directories are
    yielded too. ``dir fd`` is only valid during the iteration step that yields it.
    """
    stack = [start]
    seen = 0
    while stack:
        parts = stack.pop()
        try:
            fd = _open_dir_at(root_fd, parts)
        except OSError:
            continue
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries:
                        return
                    if entry.is_dir(follow_symlinks=False):
                        if len(parts) < max_depth:
                            stack.append((*parts, entry.name))
                        if directories:
                            yield (*parts, entry.name), fd, entry
                    else:
                        yield (*parts, entry.name), fd, entry
        finally:
            os.close(fd)


def _read_regular(dir_fd: int, name: str, limit: int) -> bytes | None:
    """Read ``name`` if it is a regular file of at most ``limit`` bytes, else ``None``."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, MiB))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) <= limit else None
    finally:
        os.close(fd)


def _candidates(
    root_fd: int, parts: tuple[str, ...], caps: OutputCaps, not_followed: NotFollowed | None
) -> Iterator[tuple[tuple[str, ...], int]]:
    """Yield ``(path parts, dir fd)`` of each regular-file candidate at or below ``parts``;
    entries of other kinds (symlinks, FIFOs, ...) go to ``not_followed``."""
    try:
        parent_fd = _open_dir_at(root_fd, parts[:-1])
    except OSError:
        return
    try:
        mode = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if not stat.S_ISDIR(mode):
        try:
            if stat.S_ISREG(mode):
                yield parts, parent_fd
            elif mode and not_followed is not None:
                not_followed.add("/".join(parts), special_kind(mode))
        finally:
            os.close(parent_fd)
        return
    os.close(parent_fd)
    for rel, dir_fd, entry in _walk_files(root_fd, parts, caps.max_depth, caps.max_entries):
        if entry.is_file(follow_symlinks=False):
            yield rel, dir_fd
        elif not_followed is not None:
            try:
                kind = special_kind(entry.stat(follow_symlinks=False).st_mode)
            except OSError:
                continue  # gone meanwhile
            not_followed.add("/".join(rel), kind)


def collect_outputs(
    work_dir: Path,
    paths: tuple[str, ...],
    caps: OutputCaps | None = None,
    not_followed: NotFollowed | None = None,
) -> tuple[dict[str, bytes], bool]:
    """Collect the regular files at or below each of ``paths`` (relative to ``work_dir``).

    Returns the files by their path relative to ``work_dir`` and whether anything was left out
    because a cap was reached. Symlinks, FIFOs, devices and sockets are never opened as files
    nor followed; they are left out, and counted in ``not_followed`` when it is given. Missing
    paths are not an error.
    """
    caps = caps or OutputCaps()
    files: dict[str, bytes] = {}
    truncated = False
    total = 0
    try:
        root_fd = os.open(work_dir, _DIR_FLAGS)
    except OSError:
        return files, False
    try:
        for output in paths:
            parts = tuple(output.split("/"))
            for rel, dir_fd in _candidates(root_fd, parts, caps, not_followed):
                name = "/".join(rel)
                if name in files:
                    continue
                if len(files) >= caps.max_files:
                    truncated = True
                    break
                budget = min(caps.max_file_bytes, caps.max_total_bytes - total)
                data = _read_regular(dir_fd, rel[-1], budget)
                if data is None:
                    truncated = truncated or _is_regular(dir_fd, rel[-1])
                    continue
                files[name] = data
                total += len(data)
    finally:
        os.close(root_fd)
    return files, truncated


def _is_regular(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class DiskUsage:
    """What a tree takes: allocated bytes (files and directories), its largest file, entries."""

    total: int = 0
    largest: int = 0
    entries: int = 0


def disk_usage(directory: Path, max_depth: int = 64, max_entries: int = 100_000) -> DiskUsage:
    """Measure the tree below ``directory`` without following links.

    The walk stops at ``max_depth`` and ``max_entries``; ``entries == max_entries`` means it
    may hold more.
    """
    try:
        root_fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return DiskUsage()
    total = largest = entries = 0
    try:
        walk = _walk_files(root_fd, (), max_depth, max_entries, directories=True)
        for _, _, entry in walk:
            entries += 1
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                total += info.st_blocks * 512
                if stat.S_ISREG(info.st_mode):
                    largest = max(largest, info.st_size)
    finally:
        os.close(root_fd)
    return DiskUsage(total, largest, entries)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may take less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (validated relative names) into ``directory``, refusing to follow links.

    Parent directories are created as needed; an existing symlink or non-directory on the way,
    or an existing file of the same name, raises ``OSError`` rather than being followed or
    overwritten.
    """
    root_fd = os.open(directory, _DIR_FLAGS)
    try:
        for name, data in files.items():
            parts = name.split("/")
            fd = os.dup(root_fd)
            try:
                for part in parts[:-1]:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = child
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                out = os.open(parts[-1], flags, 0o644, dir_fd=fd)
                try:
                    write_all(out, data)
                finally:
                    os.close(out)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, however deep, without following any symlink.

    A symlink (or file) in the place of the directory is removed itself, never its target.
    """
    try:
        top = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError:
        path.unlink(missing_ok=True)
        return
    try:
        if not _remove_flat(top):
            _remove_deep(top)
    finally:
        os.close(top)
    path.rmdir()


def _remove_deep(top: int) -> None:
    """Empty the directory ``top``, whose tree may be deeper than recursion or PATH_MAX allow.

    Each subdirectory is renamed up into a staging directory before it is emptied, so the walk
    needs neither recursion nor more than three open descriptors.
    """
    counter = itertools.count()
    stage = f".parity-rm-{os.getpid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(stage, 0o700, dir_fd=top)
    stage_fd = os.open(stage, _DIR_FLAGS, dir_fd=top)
    try:
        pending = _empty_dir(top, stage_fd, counter, skip=stage)
        while pending:
            name = pending.pop()
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=stage_fd)
            except FileNotFoundError:
                continue
            try:
                pending.extend(_empty_dir(fd, stage_fd, counter))
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=stage_fd)
    finally:
        os.close(stage_fd)
    os.rmdir(stage, dir_fd=top)


def _remove_flat(fd: int) -> bool:
    """Unlink every entry of ``fd`` if none is a directory; returns whether it did."""
    with os.scandir(fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    if any(is_dir for _, is_dir in names):
        return False
    for name, _ in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
    return True


def _empty_dir(fd: int, stage_fd: int, counter: itertools.count[int], skip: str = "") -> list[str]:
    """Unlink the non-directories in ``fd``; move its subdirectories into the stage."""
    moved = []
    with os.scandir(fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        if name == skip:
            continue
        if is_dir:
            new_name = f"d{next(counter)}"
            os.rename(name, new_name, src_dir_fd=fd, dst_dir_fd=stage_fd)
            moved.append(new_name)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    return moved


@dataclass(frozen=True)
class MountedTree:
    """One mount of a task: its guest path, its files (names relative to the tree) and
    whether the task may change them (a copy of its own, counted in ``disk``)."""

    guest: str
    files: dict[str, bytes]
    writable: bool


def mounted_trees(
    files: Mapping[str, bytes], mounts: Mapping[str, str] | Iterable[tuple[str, str]]
) -> tuple[dict[str, bytes], list[MountedTree]]:
    """A task's input files split by its mounts (guest path -> folder of the files, with its
    mode): those that stay under ``/input``, and each mounted tree in guest path order."""
    pairs = [(guest, *split_mount(value)) for guest, value in sorted(dict(mounts).items())]
    plain: dict[str, bytes] = {}
    trees = [
        MountedTree(guest, {}, writable or guest.startswith("/work/"))
        for guest, _, writable in pairs
    ]
    for name, content in files.items():
        for index, (_, folder, _) in enumerate(pairs):
            if name.startswith(folder + "/"):
                trees[index].files[name[len(folder) + 1 :]] = content
                break
        else:
            plain[name] = content
    return plain, trees
