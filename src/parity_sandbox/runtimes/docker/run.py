"""One task's container, from take-or-create to removal: :class:`Run`."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import docker.errors

from parity_sandbox._egress import AllowList
from parity_sandbox._exceptions import RuntimeUnavailable
from parity_sandbox._executor import Cancelled, PreparedTask, RunReport
from parity_sandbox._fs import OutputCaps
from parity_sandbox._models import LimitName, Network, Result, RuntimeInfo, Status
from parity_sandbox.runtimes.docker import host
from parity_sandbox.runtimes.docker.daemon import (
    API_TIMEOUT,
    EXIT_TIMEOUT,
    best_effort,
    docker_errors,
    let_init_exit,
    remove_container,
)
from parity_sandbox.runtimes.docker.egress import RUNSC_RUNTIME, Slot
from parity_sandbox.runtimes.docker.seccomp import security_opt
from parity_sandbox.runtimes.docker.spec import (
    INPUT_DIR,
    PAUSE_ROLE,
    ROLE,
    WORKDIR,
    ImageInfo,
    Plan,
    argv_of,
    command_block,
    joining,
    pause_container,
)
from parity_sandbox.runtimes.docker.streams import (
    SECRET_BYTES,
    STDERR,
    STDOUT,
    Collected,
    Demux,
    read_outputs,
)

if TYPE_CHECKING:
    from parity_sandbox.runtimes.docker.executor import DockerExecutor

_CHUNK = 1 << 16
#: The exit status of a container killed by SIGKILL (128 + 9).
_KILLED_BY_SIGKILL = 128 + 9
#: The status init reports for a task killed by SIGXFSZ (128 + 25).
_KILLED_BY_SIGXFSZ = 128 + 25
#: Stdin up to this size is written before reading output (socket buffers hold it).
_INLINE_STDIN = 1 << 16


class Run:
    """One container's life, from create to remove."""

    def __init__(
        self,
        executor: DockerExecutor,
        prepared: PreparedTask,
        cancel: threading.Event | None,
    ) -> None:
        self.executor = executor
        self.api = executor._api
        self.prepared = prepared
        self.plan: Plan = prepared.form[0]
        self.image: ImageInfo = prepared.form[1]
        self.cancel = cancel
        self.container: str | None = None
        self.run_id = self.plan.create["labels"][host.RUN_ID]
        self.demux = Demux(self.plan.output_cap, secrets.token_bytes(SECRET_BYTES))
        #: Set once init has been told (or decided) to exit with the task's status.
        self.exiting = False
        #: Whether the container came warm from the pool.
        self.warm = False
        self.started = 0.0
        #: Seconds from the task's go (secret and command sent) to its end (or the deadline).
        self.duration = 0.0
        #: The task's command for init (with its proxy's address, for a task granted egress).
        self.command = self.plan.command
        #: Its egress (a task granted a network), and its connections once it ended.
        self.slot: Slot | None = None
        #: The container that holds the task's network namespace (runsc egress); ``""``
        #: while it is being made.
        self.pause: str | None = None
        self.connections: list[dict[str, Any]] = []

    def run(self) -> Result:
        with self.executor._runs_over:
            self.executor._running += 1
        try:
            return self._run()
        finally:
            with self.executor._runs_over:
                self.executor._running -= 1
                self.executor._runs_over.notify_all()

    def _run(self) -> Result:
        network = self.prepared.task.network
        # A task granted a network gets a container of its own: never a warm one.
        warm = None if network is not None else self.executor._take_warm(self.plan.shape)
        try:
            if warm is None:
                create, host_config = self.plan.create, self.plan.host_config
                if network is not None and self.plan.runtime == "runsc":
                    # gVisor copies its namespace's interfaces when it starts: the veth
                    # must be there first, in a namespace the task's container then joins.
                    pid = self._start_pause()
                    self._attach_egress(network, pid)
                    assert self.pause is not None
                    create, host_config = joining(create, host_config, self.pause, RUNSC_RUNTIME)
                try:
                    warm = self.executor._start(create, host_config, self.run_id)
                except RuntimeUnavailable as exc:
                    if self.plan.runtime == "runsc" and "exit status 137" in str(exc.__cause__):
                        return self._no_room_for_gvisor()
                    raise
            else:
                self.warm = True
            self.container, self.run_id = warm.container, warm.run_id
            raw = warm.raw
            if network is not None and self.slot is None:
                with docker_errors("inspect the container"):
                    pid = int(self.api.inspect_container(self.container)["State"]["Pid"])
                self._attach_egress(network, pid)
            self.started = time.monotonic()
            deadline = self.started + self.plan.timeout
            if self.plan.inputs is not None:
                with docker_errors("copy the input files in"):
                    self.api.put_archive(self.container, INPUT_DIR, self.plan.inputs)
            for guest, tree in self.plan.mount_archives:
                with docker_errors("copy a mounted tree in"):
                    self.api.put_archive(self.container, guest, tree)
            self._send_stdin(raw)
            ended = self._pump(raw, deadline)
            self.duration = time.monotonic() - self.started
            self._release_egress()  # the task ended: its connection log is whole
            return self._finish(ended)
        finally:
            self._release_egress()
            if warm is not None:
                # Before the removal: a daemon blocked writing output into an open attach
                # connection cannot remove the container.
                warm.hang_up()
            # The pause container goes after the task's (which lives in its namespace).
            then = self._pause_to_remove()
            if self.container is not None and self.exiting and not self.executor.closed:
                # The trailer came: nothing of the task runs any more; init waits to be let go.
                self.executor._remove_later(self.container, self.run_id, then)
            elif self.container is not None:
                self._remove()
                for container in then:
                    remove_container(self.api, container)
                self.executor._untrack(self.run_id)
            elif then:
                for container in then:
                    remove_container(self.api, container)
                self.executor._untrack(self.run_id)

    def _start_pause(self) -> int:
        """Start the container whose network namespace the task's joins (runsc egress);
        its init's pid. The run counts as live from before it exists (no reap takes it)."""
        self.executor._track(self.run_id, None)
        self.pause = ""  # being made: found by its labels if the daemon made it unseen
        create, host_config = pause_container(
            self.plan.shape,
            labels=self.plan.create["labels"],
            seccomp=security_opt(runtime="runc"),
        )
        with docker_errors("create the task's network namespace (its pause container)"):
            self.pause = str(
                self.api.create_container(
                    host_config=self.api.create_host_config(**host_config), **create
                )["Id"]
            )
            self.api.start(self.pause)
            return int(self.api.inspect_container(self.pause)["State"]["Pid"])

    def _pause_to_remove(self) -> tuple[str, ...]:
        """The pause container, if one was made (looked up by its labels if its creation was
        cut short)."""
        pause, self.pause = self.pause, None
        if pause is None:
            return ()
        if pause:
            return (pause,)
        with best_effort():
            labels = [f"{host.RUN_ID}={self.run_id}", f"{ROLE}={PAUSE_ROLE}"]
            found = self.api.containers(all=True, filters={"label": labels})
            return tuple(str(item["Id"]) for item in found)
        return ()

    def _attach_egress(self, network: Network, pid: int) -> None:
        """Give the network namespace of process ``pid`` (the task's init, waiting for the
        task, or the pause container's) its veth and proxy, and the task the proxy's
        address."""
        egress = self.executor._egress_for()
        self.slot = egress.allocate(self.run_id, AllowList.parse(network.allow))
        egress.attach(self.slot, pid)
        task = self.prepared.task
        env = {**task.env, **self.slot.environment()}
        self.command = command_block(argv_of(task, self.image), env, task.workdir, task.outputs)

    def _release_egress(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            self.connections = self.executor._egress_for().release(slot)

    def _send_stdin(self, raw: socket.socket) -> None:
        """Send the secret and the command (the task starts on them), then the task's stdin,
        then end-of-file."""
        data = self.demux.secret + self.command + self.plan.stdin
        if len(data) <= _INLINE_STDIN:
            _feed(raw.dup(), data, API_TIMEOUT)
            return
        # A task may print a lot before it reads its stdin: write from another thread.
        threading.Thread(
            target=_feed,
            args=(raw.dup(), data, self.plan.timeout + API_TIMEOUT),
            daemon=True,
            name="parity-sandbox-stdin",
        ).start()

    def _pump(self, raw: socket.socket, deadline: float) -> str:
        """Read the attach stream until init's trailer (``"done"``), its end (``"eof"``: the
        container died), the deadline, a cancel or the executor's close."""
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        slice_ = 0.25 if self.cancel is not None else 1.0
        while self.demux.exit_code is None:
            if self.cancel is not None and self.cancel.is_set():
                return "cancel"
            if self.executor.closed:
                return "closed"
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            raw.settimeout(min(left, slice_))
            try:
                size = raw.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError as exc:
                if self.executor.closed:
                    return "closed"
                raise RuntimeUnavailable(f"lost the task's output stream: {exc}") from exc
            if size == 0:
                return "eof"
            self.demux.feed(view[:size])
        return "done"

    def _finish(self, ended: str) -> Result:
        assert self.container is not None
        usage = host.cgroup_usage(self.container)
        if ended == "cancel":
            raise Cancelled("the task was cancelled")
        if ended == "closed":
            raise RuntimeUnavailable("the executor was closed while the task ran")
        if ended == "timeout":
            message = f"the task ran past its timeout of {self.plan.timeout:g} s and was killed"
            if usage.pids_exhausted:
                message += " (it had also hit its process limit)"
            return self._result(Status.TIMEOUT, None, usage, message=message)
        if ended == "done" and self.demux.launch_failure is not None:
            self.exiting = True
            return self._launch_failed(*self.demux.launch_failure, usage)
        if ended == "done":
            assert self.demux.exit_code is not None
            code, oom = self.demux.exit_code, usage.oom_killed
            collected = self._collect() if self.demux.outputs_exist else Collected(OutputCaps())
            self.exiting = True
        else:  # the container ended without init's trailer: killed from outside (OOM, runsc)
            with docker_errors("wait for the container"):
                code = int(self.api.wait(self.container, timeout=EXIT_TIMEOUT)["StatusCode"])
                state = self.api.inspect_container(self.container)["State"]
            collected, oom = None, bool(state.get("OOMKilled")) or usage.oom_killed
            if (
                usage.oom_killed is None
                and code == _KILLED_BY_SIGKILL
                and self.plan.runtime == "runsc"
            ):
                # An OOM kill takes a gVisor sandbox whole, and its cgroup can be gone before
                # it is read (Docker does not flag runsc's OOM kills): nothing else SIGKILLs
                # it here (the deadline, cancel and close were handled above).
                oom = True
        if oom:
            message = "the task ran out of memory and was killed"
            return self._result(Status.RESOURCE_LIMIT, code, usage, collected, "memory", message)
        # The kernel's answer to a write past RLIMIT_FSIZE (unless the task sent it itself).
        if code == _KILLED_BY_SIGXFSZ:
            limit: LimitName = (
                "disk" if self.plan.shape.file_size >= self.plan.shape.disk else "file_size"
            )
            message = f"the task wrote a file past its {limit} limit and was killed (SIGXFSZ)"
            return self._result(Status.RESOURCE_LIMIT, code, usage, collected, limit, message)
        if usage.pids_exhausted and code != 0:
            message = "the task hit its process limit"
            return self._result(Status.RESOURCE_LIMIT, code, usage, collected, "pids", message)
        if collected is None:
            message = f"the container ended without its init (exit status {code})"
            return self._result(Status.ERROR, code, usage, message=message, lost=True)
        status = Status.SUCCEEDED if code == 0 else Status.FAILED
        return self._result(status, code, usage, collected)

    def _launch_failed(self, stage: str, errno: int, usage: host.CgroupUsage) -> Result:
        """The command never started: not found or not executable, or no working directory."""
        reason = os.strerror(errno) if errno else "unknown error"
        if stage == "workdir":
            message = f"cannot enter the working directory {self.prepared.task.workdir}: {reason}"
        elif stage == "fork":
            message = f"cannot start a process for the task: {reason}"
        else:
            message = f"cannot run {self.plan.argv0!r}: {reason}"
        return self._result(Status.LAUNCH_FAILED, None, usage, message=message)

    def _no_room_for_gvisor(self) -> Result:
        """runsc was killed while it started: gVisor's own kernel did not fit in the limit."""
        memory = self.plan.host_config["mem_limit"]
        message = (
            f"gVisor could not start within the memory limit of {memory >> 20} MiB (its own "
            "kernel needs about 16 MiB of it); raise limits.memory"
        )
        return self._result(
            Status.RESOURCE_LIMIT, None, host.CgroupUsage(), None, "memory", message
        )

    def _collect(self) -> Collected:
        assert self.container is not None
        collected = Collected(OutputCaps(max_files=self.plan.output_files))
        for path in self.plan.outputs:
            try:
                with docker_errors("copy the outputs out"):
                    stream, _ = self.api.get_archive(self.container, f"{WORKDIR}/{path}")
                    read_outputs(stream, path, collected)
            except RuntimeUnavailable as exc:
                cause = exc.__cause__
                if isinstance(cause, docker.errors.NotFound):
                    continue  # the task made no such path
                if isinstance(cause, docker.errors.APIError):
                    break  # the container is gone (killed by the kernel): nothing to copy
                raise
        return collected

    def _remove(self) -> None:
        assert self.container is not None
        # Letting init exit and removing a stopped container is much faster than a forced
        # removal, which kills and then waits.
        if self.exiting and let_init_exit(self.api, self.container):
            with best_effort():
                self.api.wait(self.container, timeout=EXIT_TIMEOUT)
        remove_container(self.api, self.container)

    def _result(
        self,
        status: Status,
        code: int | None,
        usage: host.CgroupUsage,
        collected: Collected | None = None,
        limit: LimitName | None = None,
        message: str = "",
        *,
        lost: bool = False,
    ) -> Result:
        """The result; stdout and stderr without init's trailer. ``lost``: the container
        was killed from outside, neither by its deadline nor for a limit."""
        stdout, stdout_cut = self.demux.output(STDOUT)
        stderr, stderr_cut = self.demux.output(STDERR)
        report = RunReport(
            status=status,
            runtime=RuntimeInfo(
                name="docker",
                version=self.executor.daemon_version,
                image=self.image.reference,
                image_id=self.image.id,
                oci_runtime=self.plan.runtime,
                warm=self.warm,
            ),
            exit_code=code,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=stdout_cut,
            stderr_truncated=stderr_cut,
            files=collected.files if collected else {},
            files_truncated=collected.truncated if collected else False,
            duration=self.duration,
            cpu_time=usage.cpu_time,
            peak_memory=usage.peak_memory,
            limit=limit,
            message=message,
            pids_exhausted=bool(usage.pids_exhausted),
            # Every memory limit Docker reports is a kill by the kernel's OOM killer (runsc
            # included: it takes the whole sandbox).
            oom_killed=status is Status.RESOURCE_LIMIT and limit == "memory",
            worker_lost=lost,
            not_followed=collected.not_followed.count if collected else 0,
            not_followed_paths=collected.not_followed.paths if collected else (),
            connections=self.connections,
        )
        return self.prepared.result(report)


def _feed(raw: socket.socket, data: bytes, timeout: float) -> None:
    """Write the task's stdin, then close our side so that the task reads end-of-file.

    ``raw`` is a duplicate of the attach socket, with its own timeout; a task that never reads
    its stdin leaves this thread blocked until the container is killed or the timeout passes.
    """
    try:
        raw.settimeout(timeout)
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        raw.close()
