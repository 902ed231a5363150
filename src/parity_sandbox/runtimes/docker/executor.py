"""The Docker runtime: one fresh, hardened container per task, through the Docker Engine API.

A task's flow::

    Task ──plan()──> a Shape (image + init, limits, user, runtime) and init's command
         ──> a warm container of that shape from the pool (``pool``), or a cold one:
             create (our init as process 1, tmpfs volumes, limits, labels) ──attach──> start
         ──[copy inputs to /input]──> send secret + command + stdin (the task starts)
         ──> read stdout/stderr (capped) until init's trailer: the secret and the exit status,
             written once the task and all it started are dead ──> read cgroup usage
         ──> copy /work/<outputs> out (tar, parsed safely) while init keeps the tmpfs alive
         ──> hang up the attach connection ──> remove container and volumes (always: in
             ``finally``; once nothing of the task is left, in the background: SIGUSR1 lets
             init exit, and a stopped container is removed)

At the deadline the container is killed with SIGKILL (no stop grace) and what was printed so
far is returned. Containers carry ownership labels, so :meth:`DockerExecutor.reap` (run when an
executor starts, and by ``parity-sandbox reap``) removes what a crashed process left behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import requests.exceptions
from docker.utils import kwargs_from_env

from parity_sandbox._cache import ResultCache
from parity_sandbox._config import Config
from parity_sandbox._egress import AllowList
from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable, SandboxError
from parity_sandbox._executor import Executor, PreparedTask
from parity_sandbox._inputs import read_inputs
from parity_sandbox._models import (
    Limits,
    Network,
    Result,
    Task,
    check_image_reference,
)
from parity_sandbox.audit import AuditLog
from parity_sandbox.metrics import Metrics
from parity_sandbox.runtimes.docker import egress, host, init
from parity_sandbox.runtimes.docker.daemon import (
    API_TIMEOUT,
    DAEMON_HINT,
    EXIT_TIMEOUT,
    best_effort,
    close_failed_connects,
    docker_errors,
    inspect_image,
    let_init_exit,
    remove_container,
    split_reference,
)
from parity_sandbox.runtimes.docker.egress import Egress
from parity_sandbox.runtimes.docker.pool import Warm, WarmPool
from parity_sandbox.runtimes.docker.run import Run
from parity_sandbox.runtimes.docker.seccomp import security_opt
from parity_sandbox.runtimes.docker.spec import (
    HOSTNAME,
    INIT_PATH,
    ImageInfo,
    Plan,
    Shape,
    plan,
)
from parity_sandbox.runtimes.docker.spec import container as container_spec

#: Seconds ``close()`` waits for the runs it stopped to remove their containers.
CLOSE_TIMEOUT = 30
#: Runs (by run id) some executor of this process has in flight; :meth:`DockerExecutor.reap`
#: spares their containers and volumes, and takes the process's others as leftovers.
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
_POOLS = 512
#: Docker refuses a memory limit below this.
MIN_MEMORY = 6 << 20

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


class DockerExecutor(Executor):
    """Runs each task in a fresh container with hardened defaults; see ``spec``.

    Args:
        config: limits and the ``docker`` section (runtime, pull policy, allowed images, ...).
        reap: remove leftovers of crashed processes when the executor starts (default).
        cache: the result cache of cacheable tasks (default: the one ``config.cache`` says).
        audit: where task ends are written (default: the audit log ``config.audit``
            describes, if any).
        metrics: what it counts in (default: the process's ``Metrics.default()`` when
            ``config.metrics.enabled``, else nothing).

    Raises:
        RuntimeUnavailable: the Docker daemon cannot be reached.
    """

    runtime_name: ClassVar[str] = "docker"
    applied_limits: ClassVar[frozenset[str]] = frozenset(Limits.model_fields) - {
        "fuel",
        "stack_size",
    }
    ignored_because: ClassVar[str] = "they are WebAssembly limits"
    hashed_limits: ClassVar[tuple[str, ...]] = (
        "memory",
        "cpu",
        "pids",
        "disk",
        "output",
        "timeout",
    )

    def __init__(
        self,
        config: Config | None = None,
        *,
        reap: bool = True,
        cache: ResultCache | None = None,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(config, cache=cache, audit=audit, metrics=metrics)
        self._settings = self.config.docker
        self._limits = self.config.limits_for("docker")
        try:
            where: dict[str, Any] = (
                {"base_url": self._settings.base_url}
                if self._settings.base_url
                else dict(kwargs_from_env())  # $DOCKER_HOST, else the local socket
            )
            # The SDK keeps one connection pool per URL, and each container has its own URLs:
            # with fewer pools than tasks in flight it closes pools still in use.
            client = docker.DockerClient(
                **where, timeout=API_TIMEOUT, num_pools=_POOLS, max_pool_size=_POOLS
            )
            self._api = client.api
            self._info: dict[str, Any] = self._api.info()
            self._version = str(self._api.version().get("Version", "unknown"))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            close_failed_connects(exc)
            raise RuntimeUnavailable(
                f"cannot reach the Docker daemon: {exc}; {DAEMON_HINT}"
            ) from exc
        self._lock = threading.Lock()
        #: Runs between their start and their cleanup; ``close()`` waits for them.
        self._running = 0
        self._runs_over = threading.Condition(self._lock)
        self._derived: dict[str, str] = {}
        self._derive_locks: dict[str, threading.Lock] = {}
        #: This executor's runs in flight: run id -> container id, once created.
        self._live: dict[str, str | None] = {}
        #: The egress of tasks granted a network (made for the first such task).
        self._egress: Egress | None = None
        self._blkio = self._blkio_settings()
        self._hosts = self._hosts_file()
        self._warned_seccomp = False
        #: Removes the containers of tasks that ended, off the task's path.
        self._remover = ThreadPoolExecutor(2, thread_name_prefix="parity-sandbox-remove")
        self._removing: set[Future[None]] = set()
        self._pool: WarmPool | None = None
        if reap:
            self.reap()
        if self._settings.pool.enabled:
            self._pool = self._new_pool()
            for profile in self._settings.pool.profiles:
                self.warm(
                    Task(
                        image=profile.image,
                        command=["true"],
                        oci_runtime=profile.oci_runtime,
                        user=profile.user,
                        limits=profile.limits,
                    )
                )

    # -- executor contract ---------------------------------------------------------------

    @classmethod
    def diagnose(cls, config: Config) -> tuple[bool, str]:
        """Reach the daemon and report its OCI runtimes, gVisor's seccomp and GPU support."""
        try:
            executor = cls(config, reap=False)
        except SandboxError as exc:
            return False, exc.message
        with executor:
            runtimes = executor.runtimes
            parts = [f"daemon {executor.daemon_version}"]
            for name in ("runc", "runsc"):
                parts.append(f"{name}: {'yes' if name in runtimes else 'no'}")
            if "runsc" in runtimes:
                seccomp = "yes" if executor.runsc_applies_seccomp() else "NO (add --oci-seccomp)"
                parts.append(f"runsc seccomp: {seccomp}")
                problem = executor.runsc_egress_problem()
                if problem is None and not executor.runsc_applies_seccomp(egress.RUNSC_RUNTIME):
                    problem = f"add --oci-seccomp to {egress.RUNSC_RUNTIME}"
                parts.append(f"runsc egress: {'yes' if problem is None else f'no ({problem})'}")
            else:
                parts.append("(gVisor: apt-get install runsc, register it in daemon.json)")
            gpu = "yes" if executor.has_gpu_runtime() else "no (no nvidia runtime)"
            parts.append(f"GPU: {gpu}")
            usable = config.docker.oci_runtime in runtimes
        return usable, "; ".join(parts)

    def max_parallel(self) -> int:
        # A task mostly waits on the daemon (create, start, remove): two per core keep the
        # daemon's cores busy; more only queue inside it.
        return 2 * (os.cpu_count() or 1)

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        if prepared.runtime != "docker" or not isinstance(prepared.form, tuple):
            raise InvalidInput(
                "task: prepared by another runtime's executor; prepare it with this one",
                field="task",
            )
        return Run(self, prepared, cancel).run()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._egress = None
        # Runs see the executor closed within a second and remove their containers; the
        # client must stay open for that (a request after it closes opens a new connection
        # that nothing would close).
        with self._runs_over:
            self._runs_over.wait_for(lambda: self._running == 0, timeout=CLOSE_TIMEOUT)
        self._remover.shutdown(wait=True)
        with _LIVE_LOCK:
            live = [container for container in self._live.values() if container]
        for container in live:
            with best_effort():
                self._api.remove_container(container, force=True, v=True)
        with best_effort():
            self._api.close()

    # -- what the daemon offers ------------------------------------------------------------

    @property
    def runtimes(self) -> set[str]:
        """The OCI runtimes the daemon has registered (``runc``, ``runsc``, ...)."""
        return set(self._info.get("Runtimes") or {})

    def runsc_applies_seccomp(self, runtime: str = "runsc") -> bool:
        """Whether the daemon runs runsc (as OCI runtime ``runtime``) with ``--oci-seccomp``,
        so that our seccomp profile also holds inside gVisor (without it, gVisor's own kernel
        is the only filter)."""
        runsc = (self._info.get("Runtimes") or {}).get(runtime) or {}
        args = runsc.get("runtimeArgs") or runsc.get("args") or []
        return any(str(arg).lstrip("-").startswith("oci-seccomp") for arg in args)

    def runsc_egress_problem(self) -> str | None:
        """Why tasks granted a network cannot run under runsc here (``None``: they can)."""
        entry = (self._info.get("Runtimes") or {}).get(egress.RUNSC_RUNTIME)
        if entry is None:
            return (
                f"network egress under runsc needs the OCI runtime {egress.RUNSC_RUNTIME!r} "
                "(runsc with --network=sandbox, through scripts/runsc-egress); "
                "scripts/docker-setup.sh registers it in /etc/docker/daemon.json"
            )
        args = [str(arg) for arg in entry.get("runtimeArgs") or entry.get("args") or []]
        if "--network=sandbox" not in args:
            return f"the OCI runtime {egress.RUNSC_RUNTIME!r} must run runsc with --network=sandbox"
        return None

    def has_gpu_runtime(self) -> bool:
        """Whether the daemon has the NVIDIA container runtime, which GPU requests need."""
        return any("nvidia" in name for name in self.runtimes)

    @property
    def daemon_version(self) -> str:
        return self._version

    # -- before a task runs -----------------------------------------------------------------

    @classmethod
    def _spec_fields(cls, task: Task) -> dict[str, Any]:
        """The container's user, working directory, OCI runtime and GPUs shape its output."""
        return {
            "docker": {
                "user": task.user,
                "workdir": task.workdir,
                "oci_runtime": task.oci_runtime,
                "gpus": task.gpus,
            }
        }

    def _prepare(self, task: Task) -> PreparedTask:
        """The task's container plan; its image resolved to an id (a tag moved later changes
        nothing) and its input files read, once."""
        contents = read_inputs(task)
        run_plan, image = self._plan(task, contents)
        return PreparedTask(
            task,
            "docker",
            run_plan.limits,
            image.id,
            contents,
            form=(run_plan, image),
            audit=self.audit,
            metrics=self.metrics,
        )

    def _check_egress(self, network: Network, runtime: str) -> None:
        """Refuse a grant the operator does not allow (``docker.network``), or that cannot be
        given here: a task is refused rather than run without what it was granted."""
        settings = self._settings.network
        if not settings.enabled:
            raise InvalidInput(
                "network: this operator grants no network egress (docker.network.enabled)",
                field="network",
            )
        if settings.allow is not None:
            cap = AllowList.parse(settings.allow)
            outside = AllowList.parse(network.allow).outside(cap)
            if outside:
                raise InvalidInput(
                    f"network.allow: {', '.join(map(str, outside))} lies outside what this "
                    f"operator allows ({', '.join(map(str, cap.grants))})",
                    field="network.allow",
                )
        problem = egress.support_problem()
        if problem is None and runtime == "runsc":
            problem = self.runsc_egress_problem()
        if problem is not None:
            raise RuntimeUnavailable(problem)

    def _egress_for(self) -> Egress:
        """The egress of this executor's tasks, made on first use."""
        with self._lock:
            if self._egress is None:
                self._check_open()
                settings = self._settings.network
                self._egress = Egress(
                    settings.subnet,
                    max_connections=settings.max_connections,
                    max_bytes=settings.max_bytes,
                )
            return self._egress

    def _plan(self, task: Task, contents: dict[str, bytes] | None = None) -> tuple[Plan, ImageInfo]:
        if task.runtime_name != "docker" or task.image is None:
            raise InvalidInput(
                "image: the Docker runtime runs images; give image (a wasm task goes to the "
                "wasm runtime)",
                field="image",
            )
        if "/" in task.mounts:
            # A container's / is its image: the program, its libraries, the shell. A tree in
            # its place leaves nothing to run, and a tree merged into it is not the tree the
            # task named; so the task is refused rather than run with something else.
            raise InvalidInput(
                "mounts: a tree at / replaces a WebAssembly guest's root; a container's root is "
                "its image: mount the tree at a path such as /data",
                field="mounts",
            )
        runtime = task.oci_runtime or self._settings.oci_runtime
        if task.network is not None:
            self._check_egress(task.network, runtime)
        if runtime not in self.runtimes:
            raise RuntimeUnavailable(
                f"the Docker daemon has no {runtime!r} runtime; install gVisor (Debian: apt-get "
                "install runsc) and register it in /etc/docker/daemon.json as "
                '{"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": '
                '["--network=none", "--oci-seccomp"]}}}, then restart dockerd'
                if runtime == "runsc"
                else f"the Docker daemon has no {runtime!r} runtime"
            )
        # The runtime that will run it: a runsc task granted a network runs under runsc-egress.
        oci = egress.RUNSC_RUNTIME if runtime == "runsc" and task.network is not None else runtime
        if runtime == "runsc" and not self._warned_seccomp and not self.runsc_applies_seccomp(oci):
            self._warned_seccomp = True
            warnings.warn(
                f"{oci} runs without --oci-seccomp: the seccomp profile is not applied inside "
                f"gVisor (add it to {oci}'s runtimeArgs in /etc/docker/daemon.json)",
                RuntimeWarning,
                stacklevel=4,
            )
        if task.gpus is not None and not self.has_gpu_runtime():
            raise RuntimeUnavailable(
                "gpus: this Docker daemon has no GPU runtime; install the NVIDIA driver and the "
                "NVIDIA Container Toolkit on the host, or run without gpus"
            )
        limits = self._limits.merged(task.limits) if task.limits.model_fields_set else self._limits
        self._check_limits(limits)
        self._warn_ignored_limits(task)
        image = self._image(task.image)
        derived = self._derived_image(image)
        run_plan = plan(
            task,
            limits,
            self._settings,
            image,
            init_image=derived,
            labels=host.labels(task.id, limits.timeout or 0, secrets.token_hex(8)),
            seccomp=security_opt(runtime=runtime),
            blkio=self._blkio,
            hosts=self._hosts,
            inputs=contents,
        )
        return run_plan, image

    # -- warm containers --------------------------------------------------------------------

    def warm(self, task: Task, *, wait: float | None = None) -> int:
        """Keep warm containers for tasks of ``task``'s profile (image, OCI runtime, user,
        resolved limits); the pool is made if the configuration did not enable it.

        Args:
            task: a task of the profile; its command, env, stdin and files do not matter.
            wait: seconds to wait until at least one warm container is ready.

        Returns:
            How many warm containers of the profile are ready now.
        """
        self._check_open()
        run_plan, _ = self._plan(task, read_inputs(task))
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            pool = self._pool
        pool.declare(run_plan.shape)
        if wait is not None:
            pool.wait_ready(run_plan.shape, 1, wait)
        return pool.ready(run_plan.shape)

    def _new_pool(self) -> WarmPool:
        pool = WarmPool(self._settings.pool, self._make_warm, self._discard_warm)
        # An executor never closed still takes its idle containers with it at interpreter
        # exit (a crash leaves them to reap()).
        weakref.finalize(self, pool.close)
        if self.metrics is not None:
            self.metrics.watch_warm_pool("docker", pool.size)
        return pool

    def warm_containers(self) -> list[str]:
        """The ids of the warm containers waiting for tasks now."""
        return self._pool.containers() if self._pool is not None else []

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until the containers of tasks that have ended are removed (that happens in the
        background once nothing of a task is left running); False if ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._removing)
            if not pending:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for future in pending:
                with contextlib.suppress(Exception):
                    future.result(timeout=max(left, 0.01))

    def _take_warm(self, shape: Shape) -> Warm | None:
        if self._pool is None or self.closed:
            return None
        warm = self._pool.take(shape)
        if self.metrics is not None:
            self.metrics.warm_pool_lookup("docker", warm is not None)
        return warm

    def _start(self, create: dict[str, Any], host_config: dict[str, Any], run_id: str) -> Warm:
        """Create, attach to and start a container whose init then waits for a task.

        The run is known as live from before its container exists (so no reap takes it while
        it is made); if anything fails, the container is removed and the error raised.
        """
        self._track(run_id, None)
        made: str | None = None
        attached: Warm | None = None
        try:
            with docker_errors("create the container"):
                made = str(
                    self._api.create_container(
                        host_config=self._api.create_host_config(**host_config), **create
                    )["Id"]
                )
            self._track(run_id, made)
            with docker_errors("start the container"):
                # Attached before the start, so that nothing the container says is missed.
                params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
                response = self._api.attach_socket(made, params=params)
                attached = Warm(made, run_id, response, getattr(response, "_sock", response))
                self._api.start(made)
            return attached
        except BaseException:
            if attached is not None:
                attached.hang_up()
            if made is None:  # cut short (Ctrl-C) while the daemon may have made it anyway
                with best_effort():
                    found = self._api.containers(
                        all=True, filters={"label": f"{host.RUN_ID}={run_id}"}
                    )
                    made = str(found[0]["Id"]) if found else None
            if made is not None:
                remove_container(self._api, made)
            self._untrack(run_id)
            raise

    def _make_warm(self, shape: Shape) -> Warm:
        """A container of ``shape`` for the pool; its init waits for a task."""
        run_id = secrets.token_hex(8)
        # Its deadline (for reap) covers the longest wait in the pool and then a task's run.
        lifetime = self._settings.pool.idle_timeout + shape.timeout
        create, host_config = container_spec(
            shape,
            labels=host.labels(None, lifetime, run_id),
            seccomp=security_opt(runtime=shape.runtime),
            blkio=self._blkio,
            hosts=self._hosts,
        )
        return self._start(create, host_config, run_id)

    def _discard_warm(self, warm: Warm) -> None:
        try:
            # Removed before its connection is hung up: its init, which waits on stdin,
            # would otherwise exit at that end-of-file while Docker kills it.
            remove_container(self._api, warm.container)
        finally:
            warm.hang_up()
            self._untrack(warm.run_id)

    def _remove_later(self, container: str, run_id: str, then: tuple[str, ...] = ()) -> None:
        """Remove a container whose task has ended (its init waits to be let go), and after
        it the containers ``then`` (the pause container of a runsc task's network), off the
        task's path."""

        def remove() -> None:
            try:
                if let_init_exit(self._api, container):
                    with contextlib.suppress(docker.errors.APIError):
                        self._api.wait(container, timeout=EXIT_TIMEOUT)
                remove_container(self._api, container)
            finally:
                try:
                    for other in then:
                        remove_container(self._api, other)
                finally:
                    self._untrack(run_id)

        future: Future[None] | None = None
        # A remover shut down (closing) refuses work: then it is removed here.
        with self._lock, contextlib.suppress(RuntimeError):
            future = self._remover.submit(remove)
            self._removing.add(future)
        if future is None:
            remove()
        else:  # outside the lock: a future already done calls back at once
            future.add_done_callback(self._removed)

    def _removed(self, future: Future[None]) -> None:
        with self._lock:
            self._removing.discard(future)

    def _check_limits(self, limits: Limits) -> None:
        """Refuse limits this daemon cannot apply, before anything is created."""
        assert limits.memory is not None and limits.cpu is not None
        if limits.memory < MIN_MEMORY:
            raise InvalidInput(
                f"limits.memory: Docker needs at least {MIN_MEMORY >> 20} MiB; got "
                f"{limits.memory} bytes",
                field="limits.memory",
            )
        cores = int(self._info.get("NCPU") or os.cpu_count() or 1)
        if limits.cpu > cores:
            raise InvalidInput(
                f"limits.cpu: the Docker host has {cores} CPUs; got {limits.cpu:g}",
                field="limits.cpu",
            )

    def _image(self, reference: str) -> ImageInfo:
        """Inspect (and, as the pull policy says, pull) ``reference``."""
        allowed = self._settings.allowed_images
        if allowed is not None and not any(fnmatch.fnmatchcase(reference, p) for p in allowed):
            raise InvalidInput(
                f"image: {reference} is not in docker.allowed_images ({', '.join(allowed)})",
                field="image",
            )
        policy = self._settings.pull_policy
        if policy == "always":
            self._pull(reference)
        with docker_errors(f"inspect image {reference}"):
            try:
                details = inspect_image(self._api, reference)
            except docker.errors.ImageNotFound:
                if policy == "never":
                    raise RuntimeUnavailable(
                        f"image {reference} is not on this Docker host and docker.pull_policy "
                        "is never; import it (parity-sandbox image import ROOTFS.tar "
                        f"{reference}) or set pull_policy: if-missing"
                    ) from None
                self._pull(reference)
                details = inspect_image(self._api, reference)
        config = details.get("Config") or {}
        return ImageInfo(
            reference=reference,
            id=str(details["Id"]),
            entrypoint=tuple(config.get("Entrypoint") or ()),
            cmd=tuple(config.get("Cmd") or ()),
        )

    def image_id(self, reference: str) -> str:
        """The id (``sha256:...``) that ``reference`` names here now, pulled if the pull
        policy allows. Raises ``InvalidInput`` (not allowed) or ``RuntimeUnavailable``."""
        return self._image(reference).id

    def image_ids(self) -> set[str]:
        """The ids of the images this Docker host has."""
        with docker_errors("list images"):
            return {str(image) for image in self._api.images(quiet=True)}

    def _pull(self, reference: str) -> None:
        name, tag = split_reference(reference)
        try:
            self._api.pull(name, tag=tag)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise RuntimeUnavailable(f"cannot pull image {reference}: {exc}") from exc

    def _derived_image(self, image: ImageInfo) -> str:
        """The id of ``image`` plus our init, made once per image and Docker host."""
        with self._lock:
            known = self._derived.get(image.id)
            gate = self._derive_locks.setdefault(image.id, threading.Lock())
        if known is not None:
            return known
        with gate:
            tag = init.derived_tag(image.id)
            with docker_errors(f"prepare image {image.reference}"):
                try:
                    derived = str(inspect_image(self._api, tag)["Id"])
                except docker.errors.ImageNotFound:
                    derived = self._derive(image, tag)
            with self._lock:
                self._derived[image.id] = derived
            return derived

    def _derive(self, image: ImageInfo, tag: str) -> str:
        binary = init.build()
        run_id = secrets.token_hex(8)
        self._track(run_id, None)
        try:
            container = self._api.create_container(
                image.id,
                command=[INIT_PATH],
                entrypoint=[],
                labels=host.labels(None, 300, run_id),
                network_disabled=True,
            )["Id"]
            return self._commit_with_init(container, binary, tag)
        finally:
            self._untrack(run_id)

    def _commit_with_init(self, container: str, binary: bytes, tag: str) -> str:
        try:
            self._api.put_archive(container, "/", init.helper_archive(binary))
            repository, _, name = tag.partition(":")
            self._api.commit(container, repository=repository, tag=name)
            return str(inspect_image(self._api, tag)["Id"])
        finally:
            with contextlib.suppress(docker.errors.DockerException):
                self._api.remove_container(container, force=True, v=True)

    def _hosts_file(self) -> str | None:
        """The file containers get as ``/etc/hosts``, where the daemon can see this host's
        files (its socket is local); ``None`` otherwise, and Docker writes one (slower)."""
        if not str(self._api.base_url).startswith("http+docker://localhost"):
            return None
        try:
            directory = self.config.resolved_cache_dir() / "docker"
            return str(host.hosts_file(directory, HOSTNAME))
        except OSError as exc:
            warnings.warn(
                f"containers start about 90 ms slower: cannot write their /etc/hosts ({exc})",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def _blkio_settings(self) -> dict[str, Any]:
        wanted = {
            "device_read_bps": self._settings.disk_read_bps,
            "device_write_bps": self._settings.disk_write_bps,
            "device_read_iops": self._settings.disk_read_iops,
            "device_write_iops": self._settings.disk_write_iops,
        }
        wanted = {key: value for key, value in wanted.items() if value is not None}
        if not wanted:
            return {}
        try:
            if not host.blkio_available():
                raise OSError("this kernel has no per-cgroup block I/O throttling")
            device = host.block_device(str(self._info.get("DockerRootDir", "/var/lib/docker")))
        except OSError as exc:
            warnings.warn(
                f"docker.disk_*_bps/iops are not applied: {exc}", RuntimeWarning, stacklevel=3
            )
            return {}
        return {key: [{"Path": device, "Rate": value}] for key, value in wanted.items()}

    # -- images ---------------------------------------------------------------------------------

    def import_image(
        self,
        rootfs: Path,
        reference: str,
        *,
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        """Make image ``reference`` from a root filesystem tarball, offline; returns its id.

        ``env`` defaults to a standard ``PATH``, which an imported image otherwise lacks.

        Raises:
            InvalidInput: a bad reference, an unreadable tarball, or a bad variable or label.
        """
        try:
            check_image_reference(reference)
        except ValueError as exc:
            raise InvalidInput(f"image: {exc}", field="image") from None
        if "@" in reference or reference.startswith("sha256:"):
            raise InvalidInput("image: give NAME[:TAG] to import as, not a digest", field="image")
        if not rootfs.is_file():
            raise InvalidInput(f"rootfs: {rootfs} is not a file (a .tar of a root filesystem)")
        changes = []
        for name, value in (env if env is not None else {"PATH": DEFAULT_PATH}).items():
            if not _ENV_NAME.fullmatch(name) or "\n" in value:
                raise InvalidInput(f"env: {name!r} is not a variable name", field="env")
            changes.append(f"ENV {name}={json.dumps(value)}")
        for key, value in (labels or {}).items():
            if not _LABEL_KEY.fullmatch(key) or "\n" in value:
                raise InvalidInput(f"label: {key!r} is not a label key", field="label")
            changes.append(f"LABEL {key}={json.dumps(value)}")
        name, tag = split_reference(reference)
        with docker_errors(f"import {rootfs} as {reference}"):
            self._api.import_image(src=str(rootfs), repository=name, tag=tag, changes=changes)
            return str(inspect_image(self._api, reference)["Id"])

    # -- leftovers ----------------------------------------------------------------------------

    def reap(self) -> int:
        """Remove containers and volumes of runs that are over but were not cleaned up.

        That is: those of this process that no executor is running any more (the daemon was
        lost while they ran), those of dead processes on this host, and any past its deadline.
        Returns how many objects were removed.
        """
        removed = 0
        me = host.owner_id()
        with docker_errors("list leftover containers"):
            containers = self._api.containers(all=True, filters={"label": f"{host.MANAGED}=true"})
        #: Runs (their ids' first 8 digits, as their veths are named) that are still going.
        alive: set[str] = set()
        for found in containers:
            labels = found.get("Labels") or {}
            if not self._leftover(labels, me):
                alive.add(labels.get(host.RUN_ID, "")[:8])
                continue
            with docker_errors("remove a leftover container"):
                try:
                    self._api.remove_container(found["Id"], force=True, v=True)
                except docker.errors.APIError as exc:
                    # another reap, or its own executor, got there first
                    if exc.status_code == 404 or "in progress" in str(exc):
                        continue
                    raise
                removed += 1
        filters = {"label": f"{host.MANAGED}=true", "dangling": True}
        with docker_errors("list leftover volumes"):
            volumes = self._api.volumes(filters=filters).get("Volumes") or []
        for volume in volumes:
            if not self._leftover(volume.get("Labels") or {}, me):
                continue
            with contextlib.suppress(docker.errors.APIError):
                self._api.remove_volume(volume["Name"])  # fails if a container took it meanwhile
                removed += 1
        with _LIVE_LOCK:
            alive.update(run_id[:8] for run_id in _LIVE)
        removed += egress.reap(lambda prefix: prefix in alive)
        if removed and self.audit is not None:
            self.audit.record("leftover_reaped", runtime="docker", removed=removed)
        if removed and self.metrics is not None:
            self.metrics.leftovers("docker", removed)
        return removed

    @staticmethod
    def _leftover(labels: dict[str, str], me: str) -> bool:
        if labels.get(host.OWNER) != me:
            return host.is_leftover(labels)
        with _LIVE_LOCK:
            return labels.get(host.RUN_ID) not in _LIVE

    def _track(self, run_id: str, container: str | None) -> None:
        """Note a run as in flight (before its container exists, then with its id)."""
        with _LIVE_LOCK:
            _LIVE.add(run_id)
            self._live[run_id] = container

    def _untrack(self, run_id: str) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(run_id)
            self._live.pop(run_id, None)
