"""What the Docker runtime reads off the host: ownership labels, cgroup usage, block devices.

- Every container (and its anonymous volumes) carries ``parity_sandbox.managed=true``, the owner
  (``host:pid:start-time`` of the process that made it) and a deadline after which it can only
  be a leftover. :func:`is_leftover` decides from those labels alone.
- :func:`cgroup_usage` reads CPU time, peak memory, OOM kills and pids-limit hits of a running
  container straight from its cgroup (v1, or v2 where the files exist); it is best effort and
  gives ``None`` for what it cannot read (a remote daemon, another cgroup layout).
- :func:`block_device` finds the disk that holds Docker's data, for blkio throttles.
- :func:`hosts_file` writes the ``/etc/hosts`` that containers get (read-only, bind-mounted):
  Docker writes none for a container without a network sandbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "parity_sandbox"
MANAGED = f"{PREFIX}.managed"
OWNER = f"{PREFIX}.owner"
DEADLINE = f"{PREFIX}.deadline"
TASK_ID = f"{PREFIX}.task_id"
#: One run's id, labelled before its container exists, so that a reap in this process can
#: tell a container (or volume) still being made from a leftover.
RUN_ID = f"{PREFIX}.run"
#: How long past its deadline a container may still be legitimately cleaned up by its owner.
GRACE = 120.0

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _start_time(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process ``pid``, which tells reused pids apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def owner_id() -> str:
    """``host:pid:start`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or 0}"


def labels(task_id: str | None, timeout: float, run_id: str = "") -> dict[str, str]:
    """The labels of a new container or volume that must be gone by ``timeout`` from now."""
    result = {
        MANAGED: "true",
        OWNER: owner_id(),
        DEADLINE: str(int(time.time() + timeout + GRACE)),
        RUN_ID: run_id,
    }
    if task_id is not None:
        result[TASK_ID] = task_id
    return result


def is_leftover(found: Mapping[str, str], now: float | None = None) -> bool:
    """Whether a managed object with labels ``found`` belongs to no live run.

    It does when its owner is a process of this host that has exited (or whose pid now belongs
    to another process), or when its deadline has passed, whoever owns it.
    """
    if found.get(MANAGED) != "true":
        return False
    now = time.time() if now is None else now
    with contextlib.suppress(ValueError):
        if float(found.get(DEADLINE, "inf")) < now:
            return True
    host, _, rest = found.get(OWNER, "").partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) != start


@dataclass(frozen=True)
class CgroupUsage:
    """What a container's cgroup says; ``None`` where it could not be read."""

    cpu_time: float | None = None
    peak_memory: int | None = None
    oom_killed: bool | None = None
    pids_exhausted: bool | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _counter(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def _number(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


def cgroup_usage(container_id: str, root: Path = CGROUP_ROOT) -> CgroupUsage:
    """Usage of a running container from the cgroup files the daemon's host exposes here."""
    v1 = root / "memory" / "docker" / container_id
    if v1.is_dir():
        cpu_ns = _number(_read(root / "cpuacct" / "docker" / container_id / "cpuacct.usage"))
        oom = _counter(_read(v1 / "memory.oom_control"), "oom_kill")
        pids = _counter(_read(root / "pids" / "docker" / container_id / "pids.events"), "max")
        return CgroupUsage(
            cpu_time=cpu_ns / 1e9 if cpu_ns is not None else None,
            peak_memory=_number(_read(v1 / "memory.max_usage_in_bytes")),
            oom_killed=oom > 0 if oom is not None else None,
            pids_exhausted=pids > 0 if pids is not None else None,
        )
    for v2 in (
        root / "system.slice" / f"docker-{container_id}.scope",
        root / "docker" / container_id,
    ):
        if v2.is_dir():
            usec = _counter(_read(v2 / "cpu.stat"), "usage_usec")
            oom = _counter(_read(v2 / "memory.events"), "oom_kill")
            pids = _counter(_read(v2 / "pids.events"), "max")
            return CgroupUsage(
                cpu_time=usec / 1e6 if usec is not None else None,
                peak_memory=_number(_read(v2 / "memory.peak")),
                oom_killed=oom > 0 if oom is not None else None,
                pids_exhausted=pids > 0 if pids is not None else None,
            )
    return CgroupUsage()


def block_device(path: str) -> str:
    """The whole-disk device (``/dev/vda``) that holds ``path``.

    Raises:
        OSError: ``path`` is not on this host, or not on a block device.
    """
    info = Path(path).stat()
    sys_dir = Path(f"/sys/dev/block/{os.major(info.st_dev)}:{os.minor(info.st_dev)}").resolve(
        strict=True
    )
    if (sys_dir / "partition").exists():
        sys_dir = sys_dir.parent
    for line in (sys_dir / "uevent").read_text().splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line.removeprefix("DEVNAME=")
    raise OSError(f"no device name for {sys_dir}")


def blkio_available(root: Path = CGROUP_ROOT) -> bool:
    """Whether the kernel throttles block I/O per cgroup here (v1 blkio or v2 io)."""
    return (root / "blkio" / "blkio.throttle.read_bps_device").exists() or (
        (root / "cgroup.controllers").exists()
        and "io" in (_read(root / "cgroup.controllers") or "").split()
    )


#: The ``/etc/hosts`` of every container: ``localhost`` and its host name are loopback.
HOSTS = "127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def hosts_file(directory: Path, hostname: str) -> Path:
    """A file holding the containers' ``/etc/hosts``, in ``directory`` (made private to this
    user), written once per content and never changed afterwards.

    Raises:
        OSError: it cannot be written, or ``directory`` is not this user's alone.
    """
    content = HOSTS.format(name=hostname).encode()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{directory} is not a directory that only this user can change")
    path = directory / f"hosts-{hashlib.sha256(content).hexdigest()[:16]}"
    with contextlib.suppress(OSError):
        found = path.lstat()
        if stat.S_ISREG(found.st_mode) and found.st_uid == os.getuid():
            return path
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=".hosts-")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(content)
        temporary.chmod(0o644)  # the task's user reads it
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
