"""A task's translation into a container: a pure function, testable without Docker.

Every hardened default is set here, each with its reason:

- ``network_mode: none``: a task gets only a loopback interface; ``localhost`` and the
  container's host name resolve to it (an ``/etc/hosts`` the executor writes, read-only).
- ``cap_drop: ALL`` and ``no-new-privileges``: no capability, and no way to gain one through a
  setuid binary.
- our seccomp profile (see :mod:`.seccomp`): Docker's default still allows vsock,
  io_uring and tracing process 1.
- ``read_only`` root: the image cannot be changed, and the only writable places are capped.
- user ``65534:65534`` (nobody) unless the task sets another; UID 0 only where the operator allows.
- ``pids_limit`` (runc) and ``ulimit nproc``: a fork bomb meets a ceiling. Under runsc the pids
  cgroup counts gVisor's own threads (a low limit deadlocks the sandbox, and with a limit runsc
  sometimes fails to start), so there ``nproc``, which gVisor counts inside the sandbox, bounds
  the task. Under runc ``nproc`` counts every process of the UID on the host, so it is only a
  host-wide backstop there and the pids cgroup is the per-task limit.
- ``memory`` with ``memory_swap`` equal: no swap to spill into.
- ``nano_cpus``: a CPU share that cannot be exceeded.
- ulimits ``nofile`` (``limits.open_files``), ``fsize`` (``limits.file_size``, by default the
  disk cap: no single file beyond it) and ``core 0``.
- private IPC namespace, ``/dev/shm`` capped at the disk limit.
- process 1 is our ``parity-init``: it reaps zombies, and kills every process left when the
  task's main process exits. The task's command, environment and working directory reach it
  over stdin (:func:`command_block`), not through the container's configuration: so a
  container is made from a :class:`Shape` alone, which a warm pool can do before the task
  exists.
- ``/work`` and ``/tmp`` are size-capped tmpfs mounts (nosuid, nodev, but exec: programs run
  helpers they unpack there): a real quota, unlike a bind mount. ``/work`` is an anonymous
  tmpfs volume so that outputs can be copied out after the task ends; tmpfs pages count
  against the container's memory limit too.
- ``/input`` is a tmpfs volume filled by the host, read-only for the task (root-owned files).
  The daemon fills it, so its pages are not charged to the task's cgroup: the task's input
  bytes are bounded by ``limits.input`` instead (see ``check_input_bytes``).
- log driver ``none``: output travels only through the capped attach stream, never to disk.
- never a host mount, a device, the Docker socket, or a privileged container (unless the
  operator sets ``allow_privileged``).
- ``oom_score_adj`` 1000: when the host itself runs out of memory, tasks go first.

A task granted a network under runsc runs in the network namespace of a "pause" container
(:func:`pause_container`, under runc, hardened the same way, running nothing but our init
waiting on stdin), which holds the task's veth before gVisor starts: gVisor copies the
interfaces of its namespace once, at its start (see ``egress``). :func:`joining` makes the
task's container join it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from docker.types import DeviceRequest, DriverConfig, LogConfig, Mount, Ulimit

from parity_sandbox._config import DockerSettings
from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._fs import MountedTree, mounted_trees
from parity_sandbox._models import Limits, Task, check_input_bytes
from parity_sandbox.runtimes.docker.streams import archive_bytes, input_archive

INIT_PATH = "/.parity/init"
WORKDIR = "/work"
INPUT_DIR = "/input"
NOBODY = 65534
#: The container's host name; /etc/hosts maps it (and ``localhost``) to loopback.
HOSTNAME = "sandbox"
NOFILE = 4096
#: The label that marks the container that holds a task's network namespace (runsc egress).
ROLE = "parity_sandbox.role"
PAUSE_ROLE = "netns"
#: The pause container's limits: its init only waits (it never forks); runc's own setup, in the
#: container's cgroup until it execs init, needs more (a Go program: threads, memory).
PAUSE_MEMORY = 32 * (1 << 20)
PAUSE_PIDS = 32
#: ``nproc`` under runc: a host-wide backstop per UID (see the module docstring).
HOST_NPROC = 16384
MiB = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
    """What the executor learnt of an image before running a task on it."""

    reference: str
    id: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shape:
    """What a container is made with, before any task is known: a warm pool's key.

    Two tasks with equal shapes can run in each other's containers; the command, environment,
    working directory, stdin and input files are the task's and travel separately.
    """

    init_image: str
    runtime: str
    uid: int
    gid: int
    memory: int
    cpu: float
    pids: int
    disk: int
    timeout: float
    open_files: int = NOFILE
    #: The largest file a process may write (``RLIMIT_FSIZE``).
    file_size: int = 0
    #: The size of the ``/input`` tmpfs; 0: no ``/input``.
    input_size: int = 0
    #: Trees mounted read-only elsewhere (``Task.mounts``): (guest path, tmpfs size).
    mounts: tuple[tuple[str, int], ...] = ()
    #: Writable copies of trees elsewhere (``:rw``): guest paths, each a tmpfs of the task's
    #: own, ``disk`` in size.
    copies: tuple[str, ...] = ()
    gpus: int | str | None = None
    privileged: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything one container run needs, decided before anything starts."""

    shape: Shape
    #: The task's limits, resolved.
    limits: Limits
    create: dict[str, Any]
    host_config: dict[str, Any]
    #: The task's command for parity-init (see :func:`command_block`).
    command: bytes
    output_cap: int
    stdin: bytes
    outputs: tuple[str, ...]
    #: Output files collected at most.
    output_files: int = 1000
    #: Bytes the task brings (stdin and input files), held by the host outside its cgroup.
    input_bytes: int = 0
    #: The program the task runs (for messages).
    argv0: str = ""
    inputs: bytes | None = field(default=None, repr=False)
    #: The archives of the trees mounted elsewhere: (guest path, archive).
    mount_archives: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @property
    def runtime(self) -> str:
        return self.shape.runtime

    @property
    def timeout(self) -> float:
        return self.shape.timeout


_TMPFS_FLAGS = "nosuid,nodev"


def _tmpfs_volume(target: str, options: str, labels: dict[str, str]) -> Mount:
    """An anonymous tmpfs volume at ``target``: removed with its container, and, unlike a
    ``tmpfs`` mount, visible to the daemon's archive calls while the container runs."""
    driver = DriverConfig(
        "local", {"type": "tmpfs", "device": "tmpfs", "o": f"{options},{_TMPFS_FLAGS}"}
    )
    return Mount(target, None, type="volume", no_copy=True, labels=labels, driver_config=driver)


def user_ids(task: Task, settings: DockerSettings) -> tuple[int, int]:
    """The UID and GID the task runs as; a lone UID gets the same number as GID."""
    if task.user is None:
        return NOBODY, NOBODY
    uid_text, _, gid_text = task.user.partition(":")
    uid = int(uid_text)
    gid = int(gid_text) if gid_text else uid
    if 0 in (uid, gid) and not settings.allow_root:
        raise InvalidInput(
            "user: running a task as root (UID or GID 0) is refused; pick another ID, or the "
            "operator sets docker.allow_root: true",
            field="user",
        )
    return uid, gid


def argv_of(task: Task, image: ImageInfo) -> list[str]:
    """The task's argv: the image's entrypoint, then the task's command or the image's CMD."""
    argv = [*image.entrypoint, *(task.command if task.command is not None else image.cmd)]
    if not argv:
        raise InvalidInput(
            f"command: image {image.reference} has no default command; give one", field="command"
        )
    return argv


def command_block(
    argv: list[str], env: dict[str, str], workdir: str | None, outputs: tuple[str, ...]
) -> bytes:
    """The task's command as parity-init reads it after the secret: a 4-byte big-endian length,
    then entries of a tag byte and a NUL-terminated string (``a`` argv, ``e`` environment,
    ``o`` output path, ``w`` working directory)."""
    entries = [("a", arg) for arg in argv]
    entries += [("e", f"{name}={value}") for name, value in env.items()]
    entries += [("o", path) for path in outputs]
    if workdir is not None:
        entries.append(("w", workdir))
    for _, text in entries:
        if "\0" in text:
            raise InvalidInput("command: NUL bytes cannot pass to a process", field="command")
    body = b"".join(tag.encode() + text.encode() + b"\0" for tag, text in entries)
    return len(body).to_bytes(4, "big") + body


def shape_of(
    task: Task,
    limits: Limits,
    settings: DockerSettings,
    *,
    init_image: str,
    input_size: int = 0,
    mounts: tuple[tuple[str, int], ...] = (),
    copies: tuple[str, ...] = (),
) -> Shape:
    """The container ``task`` needs under ``limits``.

    Raises:
        InvalidInput: the task asks for something the operator's settings refuse.
    """
    assert limits.memory and limits.cpu and limits.pids and limits.disk and limits.timeout
    uid, gid = user_ids(task, settings)
    if task.privileged and not settings.allow_privileged:
        raise InvalidInput(
            "privileged: privileged containers are refused unless the operator sets "
            "docker.allow_privileged: true",
            field="privileged",
        )
    return Shape(
        init_image=init_image,
        runtime=task.oci_runtime or settings.oci_runtime,
        uid=uid,
        gid=gid,
        memory=limits.memory,
        cpu=limits.cpu,
        pids=limits.pids,
        disk=limits.disk,
        timeout=limits.timeout,
        open_files=limits.open_files_or_default,
        file_size=limits.file_size if limits.file_size is not None else limits.disk,
        input_size=input_size,
        mounts=mounts,
        copies=copies,
        gpus=task.gpus,
        privileged=bool(task.privileged),
    )


def container(
    shape: Shape,
    *,
    labels: dict[str, str],
    seccomp: str,
    blkio: dict[str, Any] | None = None,
    hosts: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``create_container`` and host-config arguments of a container of ``shape``.

    ``hosts`` is the path, on the daemon's host, of the file to mount as ``/etc/hosts``
    (``None``: the daemon cannot see the executor's files; Docker then writes one).
    """
    disk, uid, gid = shape.disk, shape.uid, shape.gid
    mounts = [_tmpfs_volume(WORKDIR, f"size={disk},uid={uid},gid={gid},mode=0700", labels)]
    if shape.input_size:
        mounts.append(_tmpfs_volume(INPUT_DIR, f"size={shape.input_size},mode=0755", labels))
    for guest, size in shape.mounts:  # read-only to the task: root's, 0755
        mounts.append(_tmpfs_volume(guest, f"size={size},mode=0755", labels))
    for guest in shape.copies:  # the task's own
        mounts.append(_tmpfs_volume(guest, f"size={disk},uid={uid},gid={gid},mode=0700", labels))
    # Process 1 is ours, not the task's: the task gets ``pids`` processes besides it.
    pids = shape.pids + 1
    nproc = pids if shape.runtime == "runsc" else max(HOST_NPROC, pids)
    host_config: dict[str, Any] = {
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", seccomp],
        "read_only": True,
        "mem_limit": shape.memory,
        "memswap_limit": shape.memory,
        "nano_cpus": round(shape.cpu * 1e9),
        "ulimits": [
            Ulimit(name="nofile", soft=shape.open_files, hard=shape.open_files),
            Ulimit(name="nproc", soft=nproc, hard=nproc),
            Ulimit(name="fsize", soft=shape.file_size, hard=shape.file_size),
            Ulimit(name="core", soft=0, hard=0),
        ],
        "ipc_mode": "private",
        "shm_size": disk,
        # exec, as in /work: programs unpack and run helpers from /tmp (one-file apps, .so
        # files), and Docker's own default (noexec) holds under runc only, not under runsc.
        "tmpfs": {"/tmp": f"size={disk},mode=1777,exec,{_TMPFS_FLAGS}"},
        "mounts": mounts,
        "log_config": LogConfig(type="none"),
        "runtime": shape.runtime,
        "oom_score_adj": 1000,
        "privileged": shape.privileged,
    }
    # Loopback only, and ``localhost`` and the container's own name must resolve (test
    # servers, databases, Java's getLocalHost()).
    if hosts is not None:
        # No libnetwork sandbox: the container still gets its own network namespace with only
        # loopback, and starts about 90 ms sooner than with network_mode none alone; but then
        # Docker writes no /etc/hosts (and no /etc/resolv.conf: glibc asks 127.0.0.1), so the
        # executor's own is mounted.
        mounts.append(Mount("/etc/hosts", hosts, type="bind", read_only=True))
    else:
        # A daemon that cannot see the executor's files (remote): Docker's own /etc/hosts,
        # and a resolver that is not the host's (a task need not learn its address).
        host_config["extra_hosts"] = {HOSTNAME: "127.0.0.1"}
        host_config["dns"] = ["127.0.0.1"]
    if shape.runtime != "runsc":
        host_config["pids_limit"] = pids
    if shape.gpus is not None:
        count = -1 if shape.gpus == "all" else int(shape.gpus)
        host_config["device_requests"] = [DeviceRequest(count=count, capabilities=[["gpu"]])]
    if blkio:
        host_config.update(blkio)
    create: dict[str, Any] = {
        "image": shape.init_image,
        "entrypoint": [INIT_PATH],
        "user": f"{uid}:{gid}",
        "working_dir": WORKDIR,
        "labels": labels,
        "hostname": HOSTNAME,
        "network_disabled": hosts is not None,
        # Always open: parity-init reads the run's secret and command from stdin.
        "stdin_open": True,
        "tty": False,
    }
    return create, host_config


def plan(
    task: Task,
    limits: Limits,
    settings: DockerSettings,
    image: ImageInfo,
    *,
    init_image: str,
    labels: dict[str, str],
    seccomp: str,
    blkio: dict[str, Any] | None = None,
    hosts: str | None = None,
    inputs: Mapping[str, bytes] | None = None,
) -> Plan:
    """Translate ``task`` under ``limits`` into a container and the command parity-init runs.

    Raises:
        InvalidInput: the task asks for something the operator's settings refuse.
    """
    argv = argv_of(task, image)
    contents = dict(inputs) if inputs is not None else task.embedded_inputs()
    input_bytes = len(task.input) + sum(map(len, contents.values()))
    check_input_bytes(input_bytes, limits)
    plain, trees = mounted_trees(contents, task.mounts)
    archive, input_size = None, 0
    if plain:
        input_size = archive_bytes(plain) + MiB
        archive = input_archive(plain)
    sizes = tuple(
        (tree.guest, archive_bytes(tree.files) + MiB) for tree in trees if not tree.writable
    )
    copies = tuple(
        tree.guest for tree in trees if tree.writable and not tree.guest.startswith("/work/")
    )
    shape = shape_of(
        task,
        limits,
        settings,
        init_image=init_image,
        input_size=input_size,
        mounts=sizes,
        copies=copies,
    )
    # A writable tree is the task's own: under /work, in its workspace.
    mount_archives = tuple(
        (WORKDIR, input_archive(_under(tree), owner=(shape.uid, shape.gid)))
        if tree.guest.startswith("/work/")
        else (tree.guest, input_archive(tree.files, owner=(shape.uid, shape.gid)))
        if tree.writable
        else (tree.guest, input_archive(tree.files))
        for tree in trees
    )
    create, host_config = container(shape, labels=labels, seccomp=seccomp, blkio=blkio, hosts=hosts)
    return Plan(
        shape=shape,
        limits=limits,
        create=create,
        host_config=host_config,
        command=command_block(argv, dict(task.env), task.workdir, task.outputs),
        output_cap=limits.output if limits.output is not None else 0,
        stdin=task.input,
        outputs=task.outputs,
        output_files=limits.output_files_or_default,
        input_bytes=input_bytes,
        argv0=argv[0],
        inputs=archive,
        mount_archives=mount_archives,
    )


def _under(tree: MountedTree) -> dict[str, bytes]:
    """The files of a tree mounted under ``/work``, named from the workspace."""
    where = tree.guest.removeprefix("/work/")
    return {f"{where}/{name}": data for name, data in tree.files.items()}


def pause_container(
    shape: Shape, *, labels: dict[str, str], seccomp: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``create_container`` and host-config arguments of the container whose network
    namespace a task of ``shape`` joins (runsc egress).

    It runs under runc with the hardened defaults of a task's container and tiny limits: its
    process is our init, waiting forever on a stdin that no one writes to (it never starts a
    task), and ``network_disabled``: a namespace of its own with loopback only, until the
    executor adds the task's veth. ``seccomp`` is the runc profile.
    """
    host_config: dict[str, Any] = {
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", seccomp],
        "read_only": True,
        "mem_limit": PAUSE_MEMORY,
        "memswap_limit": PAUSE_MEMORY,
        "nano_cpus": 250_000_000,
        "pids_limit": PAUSE_PIDS,
        "ulimits": [
            Ulimit(name="nofile", soft=64, hard=64),
            Ulimit(name="fsize", soft=0, hard=0),
            Ulimit(name="core", soft=0, hard=0),
        ],
        "ipc_mode": "private",
        "log_config": LogConfig(type="none"),
        "runtime": "runc",
        "oom_score_adj": 1000,
    }
    create: dict[str, Any] = {
        "image": shape.init_image,
        "entrypoint": [INIT_PATH],
        "user": f"{NOBODY}:{NOBODY}",
        "labels": {**labels, ROLE: PAUSE_ROLE},
        "hostname": HOSTNAME,
        "network_disabled": True,
        "stdin_open": True,
        "tty": False,
    }
    return create, host_config


def joining(
    create: dict[str, Any], host_config: dict[str, Any], pause: str, runtime: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A task's container arguments changed to join the network namespace of container
    ``pause`` and to run under OCI runtime ``runtime``.

    Docker refuses a host name, DNS servers or extra hosts for a container that joins
    another's network (its host name is the pause container's); ``network_disabled`` would make
    it ignore the join and get a namespace of its own.
    """
    create = {key: value for key, value in create.items() if key != "hostname"}
    create["network_disabled"] = False
    host_config = {
        key: value for key, value in host_config.items() if key not in ("dns", "extra_hosts")
    }
    host_config["network_mode"] = f"container:{pause}"
    host_config["runtime"] = runtime
    return create, host_config
