"""Nothing is left behind: killed hosts, Ctrl-C, and a daemon lost in the middle of a task."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_IMAGE, containers_of, managed_containers
from parity_sandbox import Config, DockerExecutor, RuntimeUnavailable, Task

pytestmark = pytest.mark.docker

DOCKER_SOCKET = "/var/run/docker.sock"


def wait_for(condition: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def labelled_volumes(executor: DockerExecutor, task_id: str) -> list[str]:
    found = executor._api.volumes(filters={"label": f"parity_sandbox.task_id={task_id}"})
    return [v["Name"] for v in found.get("Volumes") or []]


def test_sigkilled_host_process_is_reaped(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    task_id = f"orphaned-{uuid.uuid4().hex[:8]}"
    script = (
        "from parity_sandbox import DockerExecutor, Task\n"
        "with DockerExecutor(reap=False) as ex:\n"
        f"    ex.execute(Task(image={TEST_IMAGE!r}, command=['sleep', '600'], id={task_id!r},\n"
        f"                    oci_runtime={oci_runtime!r}, input_files={{'a': b'x'}}))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        assert wait_for(lambda: managed_containers(docker_executor, task_id))
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the container outlives the killed process ...
    assert managed_containers(docker_executor, task_id)
    assert labelled_volumes(docker_executor, task_id)
    # ... until a reap, which finds its owner dead
    assert docker_executor.reap() >= 1
    assert managed_containers(docker_executor, task_id) == []
    assert labelled_volumes(docker_executor, task_id) == []


def test_reap_spares_live_runs(docker_executor: DockerExecutor) -> None:
    task_id = f"live-{uuid.uuid4().hex[:8]}"
    done: list[object] = []
    worker = threading.Thread(
        target=lambda: done.append(
            docker_executor.execute(Task(image=TEST_IMAGE, command=["sleep", "2"], id=task_id))
        )
    )
    worker.start()
    assert wait_for(lambda: managed_containers(docker_executor, task_id))
    with DockerExecutor(reap=False) as other:  # the same process owns it: not a leftover
        other.reap()
    worker.join(20)
    assert len(done) == 1 and getattr(done[0], "ok", False)


def test_ctrl_c_in_the_cli_removes_the_container(docker_executor: DockerExecutor) -> None:
    task_id = f"ctrl-c-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parity_sandbox.cli",
            "run",
            "--image",
            TEST_IMAGE,
            "--",
            "sh",
            "-c",
            f"echo {task_id}; sleep 600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )

    try:
        assert wait_for(lambda: bool(containers_of(docker_executor, child.pid)))
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    assert child.returncode == 130
    assert b"interrupted" in stderr and b"Traceback" not in stderr
    assert containers_of(docker_executor, child.pid) == []


@contextlib.contextmanager
def socket_proxy(path: Path) -> Iterator[threading.Event]:
    """A Unix-socket proxy to the Docker socket; setting the event cuts every connection."""
    cut = threading.Event()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(64)
    listener.settimeout(0.1)
    pairs: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not cut.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(DOCKER_SOCKET)
            pairs.extend((client, upstream))
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        for sock in pairs:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        listener.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield cut
    finally:
        cut.set()
        server.join(5)


def test_daemon_lost_mid_task(docker_executor: DockerExecutor, tmp_path: Path) -> None:
    task_id = f"lost-{uuid.uuid4().hex[:8]}"
    with socket_proxy(tmp_path / "docker.sock") as cut:
        config = Config(docker={"base_url": f"unix://{tmp_path}/docker.sock"})
        executor = DockerExecutor(config, reap=False)
        threading.Timer(1.5, cut.set).start()
        started = time.monotonic()
        with (
            pytest.warns(RuntimeWarning, match="could not remove"),
            pytest.raises(RuntimeUnavailable, match=r"Docker|output stream"),
        ):
            executor.execute(
                Task(image=TEST_IMAGE, command=["sleep", "600"], id=task_id, limits={"timeout": 30})
            )
        assert time.monotonic() - started < 10
        executor.close()
    # the daemon is back (the real socket): the next executor's reap removes what was left
    assert managed_containers(docker_executor, task_id)
    with DockerExecutor():
        pass
    assert managed_containers(docker_executor, task_id) == []
    assert labelled_volumes(docker_executor, task_id) == []


def test_a_reap_while_a_container_is_being_made_spares_it(
    docker_executor: DockerExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another executor of this process reaps just after the daemon made the container and
    # before create_container returned: the run is known as live from before it started.
    with DockerExecutor(reap=False) as executor, DockerExecutor(reap=False) as other:
        real_create = executor._api.create_container

        def create_then_reap(*args: Any, **kwargs: Any) -> Any:
            made = real_create(*args, **kwargs)
            other.reap()
            return made

        monkeypatch.setattr(executor._api, "create_container", create_then_reap)
        result = executor.execute(Task(image=TEST_IMAGE, command=["echo", "survived"]))
    assert result.stdout == b"survived\n"


def test_an_interrupt_while_the_daemon_creates_leaves_no_container() -> None:
    # Ctrl-C can land after the daemon made the container but before its id came back.
    task_id = f"cut-{uuid.uuid4().hex[:8]}"
    with DockerExecutor(Config(cache={"enabled": False}), reap=False) as executor:
        create = executor._api.create_container

        def create_then_interrupt(*args: Any, **kwargs: Any) -> Any:
            create(*args, **kwargs)
            raise KeyboardInterrupt

        executor._api.create_container = create_then_interrupt  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            executor.execute(Task(image=TEST_IMAGE, command=["true"], id=task_id))
        assert managed_containers(executor, task_id) == []


def test_the_container_finders_find_a_running_task(docker_executor: DockerExecutor) -> None:
    """The helpers that other tests use to show that nothing is left must find what is there:
    otherwise a renamed label would turn every such check into a check of nothing."""
    task_id = f"found-{uuid.uuid4().hex[:8]}"
    with DockerExecutor(Config(cache={"enabled": False}), reap=False) as executor:
        task = Task(image=TEST_IMAGE, command=["sleep", "3"], id=task_id)
        runner = threading.Thread(target=executor.execute, args=(task,))
        runner.start()
        try:
            assert wait_for(lambda: bool(managed_containers(docker_executor, task_id)))
            assert containers_of(docker_executor, os.getpid())
        finally:
            runner.join(30)
    assert managed_containers(docker_executor, task_id) == []
