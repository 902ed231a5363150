"""Warm pools: containers started ahead of demand, one task each, never reused, never leaked.

The isolation must-shows run through a pool as well (test_docker_isolation.py, ``warm``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import TEST_IMAGE, managed_containers
from parity_sandbox import Config, DockerExecutor, ExecutionTimeout, InvalidInput, Task
from parity_sandbox._config import PoolSettings, load_config

pytestmark = pytest.mark.docker


def pooled(**pool: object) -> DockerExecutor:
    settings = {"enabled": True, "min": 1, "max": 2, **pool}
    return DockerExecutor(
        Config(timeout="20s", cache={"enabled": False}, docker={"pool": settings})
    )


@pytest.fixture
def pool_executor() -> Iterator[DockerExecutor]:
    with pooled() as executor:
        yield executor


def exists(executor: DockerExecutor, container: str) -> bool:
    return container in managed_containers(executor)


def test_a_warm_container_serves_one_task_and_is_destroyed(
    pool_executor: DockerExecutor,
) -> None:
    task = Task(image=TEST_IMAGE, command=["sh", "-c", "echo $A; pwd"], env={"A": "1"})
    assert pool_executor.warm(task, wait=60) >= 1
    (waiting,) = pool_executor.warm_containers()
    result = pool_executor.execute(task)
    assert result.runtime is not None and result.runtime.warm
    assert result.stdout == b"1\n/work\n"
    assert not exists(pool_executor, waiting)  # destroyed, not put back


def test_nothing_of_one_task_reaches_the_next(pool_executor: DockerExecutor) -> None:
    dirty = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", "echo x > /work/left; echo y > /tmp/left; (sleep 600 &); echo ok"],
    )
    look = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", "ls /work /tmp; ps -o args | grep -c '[s]leep 600'"],
    )
    pool_executor.warm(dirty, wait=60)
    first = pool_executor.execute(dirty)
    pool_executor.warm(look, wait=60)
    second = pool_executor.execute(look)
    assert first.runtime and second.runtime and first.runtime.warm and second.runtime.warm
    assert first.stdout == b"ok\n"
    assert b"left" not in second.stdout and second.stdout.endswith(b"0\n"), second.stdout


def test_a_tasks_own_command_env_workdir_stdin_inputs_and_outputs(
    pool_executor: DockerExecutor,
) -> None:
    task = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", "cat /input/in.txt; cat; echo $B > /work/out.txt; pwd"],
        env={"B": "from-env"},
        workdir="/tmp",
        stdin=b"from-stdin\n",
        input_files={"in.txt": b"from-file\n"},
        outputs=["out.txt"],
    )
    pool_executor.warm(task, wait=60)
    result = pool_executor.execute(task)
    assert result.runtime is not None and result.runtime.warm
    assert result.stdout == b"from-file\nfrom-stdin\n/tmp\n"
    assert result.files == {"out.txt": b"from-env\n"}


def test_a_task_without_a_pool_runs_cold_and_its_profile_is_warmed(
    pool_executor: DockerExecutor,
) -> None:
    task = Task(image=TEST_IMAGE, command=["true"], limits={"memory": "96m"})
    first = pool_executor.execute(task)
    assert first.runtime is not None and first.runtime.warm is False
    deadline = time.monotonic() + 60
    while not pool_executor.warm_containers() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = pool_executor.execute(task)
    assert second.runtime is not None and second.runtime.warm
    # other limits are another profile: cold
    other = pool_executor.execute(
        Task(image=TEST_IMAGE, command=["true"], limits={"memory": "96m", "pids": 9})
    )
    assert other.runtime is not None and other.runtime.warm is False


def test_input_files_larger_than_the_pools_volume_run_cold(
    pool_executor: DockerExecutor,
) -> None:
    # Warm containers of a profile with input files have an /input sized to the disk limit.
    small = Task(image=TEST_IMAGE, command=["true"], limits={"disk": "2m"}, input_files={"a": b"a"})
    pool_executor.warm(small, wait=60)
    big = Task(
        image=TEST_IMAGE,
        command=["wc", "-c", "/input/big"],
        limits={"disk": "2m"},
        input_files={"big": b"x" * (3 << 20)},
    )
    result = pool_executor.execute(big)
    assert result.runtime is not None and result.runtime.warm is False
    assert result.stdout.split()[0] == str(3 << 20).encode()
    fits = pool_executor.execute(small)
    assert fits.runtime is not None and fits.runtime.warm


def test_a_timeout_in_a_warm_container_kills_it(pool_executor: DockerExecutor) -> None:
    task = Task(
        image=TEST_IMAGE, command=["sh", "-c", "echo start; sleep 600"], limits={"timeout": 1}
    )
    pool_executor.warm(task, wait=60)
    (waiting,) = pool_executor.warm_containers()
    with pytest.raises(ExecutionTimeout) as caught:
        pool_executor.execute(task)
    assert caught.value.result is not None and caught.value.result.stdout == b"start\n"
    assert not exists(pool_executor, waiting)


def test_a_warm_container_that_died_is_not_handed_out(pool_executor: DockerExecutor) -> None:
    task = Task(image=TEST_IMAGE, command=["echo", "fine"])
    pool_executor.warm(task, wait=60)
    (waiting,) = pool_executor.warm_containers()
    pool_executor._api.kill(waiting)
    time.sleep(0.5)
    result = pool_executor.execute(task)
    assert result.ok and result.stdout == b"fine\n"
    assert result.runtime is not None and result.runtime.warm is False


def test_idle_containers_expire_and_close_drains_the_pool() -> None:
    task = Task(image=TEST_IMAGE, command=["true"])
    with pooled(min=0, idle_timeout=1) as executor:
        executor.warm(task, wait=60)
        (first,) = executor.warm_containers()
        deadline = time.monotonic() + 15
        while exists(executor, first) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not exists(executor, first)
        assert executor.warm_containers() == []  # min 0: an idle profile drains away
    with pooled(min=2) as executor:
        executor.warm(task, wait=60)
        deadline = time.monotonic() + 60
        while len(executor.warm_containers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = executor.warm_containers()
        assert len(waiting) == 2
    with DockerExecutor(reap=False) as other:
        assert not set(waiting) & set(managed_containers(other))


def test_named_profiles_are_renewed_and_profiles_from_tasks_forgotten() -> None:
    named = Task(image=TEST_IMAGE, command=["true"])
    passing = Task(image=TEST_IMAGE, command=["true"], limits={"memory": "90m"})
    with pooled(min=1, idle_timeout=1) as executor:
        executor.warm(named, wait=60)
        (first,) = executor.warm_containers()
        executor.execute(passing)  # cold: its profile is warmed, for a while
        deadline = time.monotonic() + 20
        renewed: list[str] = []
        while time.monotonic() < deadline:
            renewed = executor.warm_containers()
            if len(renewed) == 1 and first not in renewed:
                break
            time.sleep(0.1)
        # the named profile's container was replaced by a fresh one; the other profile is gone
        assert len(renewed) == 1 and first not in renewed
        again = executor.execute(named).runtime
        assert again is not None and again.warm


def test_profiles_in_the_config_are_warmed_at_start() -> None:
    profile = {"image": TEST_IMAGE, "limits": {"memory": "80m"}}
    with pooled(profiles=[profile]) as executor:
        deadline = time.monotonic() + 60
        while not executor.warm_containers() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = executor.execute(
            Task(image=TEST_IMAGE, command=["true"], limits={"memory": "80m"})
        )
        assert result.runtime is not None and result.runtime.warm


def test_warm_containers_of_all_profiles_stay_within_max_total() -> None:
    # Profiles come from tasks: a stranger varying a limit per task must not multiply them.
    def task(memory: int) -> Task:
        return Task(image=TEST_IMAGE, command=["true"], limits={"memory": f"{memory}m"})

    with pooled(min=1, max=2, max_total=2) as executor:
        for memory in range(70, 76):
            executor.execute(task(memory))  # cold; each warms its profile for later
        seen = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = max(seen, len(executor.warm_containers()))
            time.sleep(0.05)
        assert 1 <= seen <= 2
        assert executor.warm(task(75), wait=60) >= 1  # the newest profile has room
        oldest = executor.execute(task(70)).runtime
        assert oldest is not None and oldest.warm is False  # the oldest profile gave way


CRASH = """
import sys, time
from parity_sandbox import Config, DockerExecutor, Task
executor = DockerExecutor(Config(docker={"pool": {"enabled": True, "min": 2}}))
executor.warm(Task(image=sys.argv[1], command=["true"]), wait=60)
while len(executor.warm_containers()) < 2:
    time.sleep(0.05)
print(" ".join(executor.warm_containers()), flush=True)
time.sleep(600)
"""


def test_warm_containers_of_a_crashed_process_are_reaped(
    docker_executor: DockerExecutor,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH, TEST_IMAGE], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        waiting = child.stdout.readline().split()
        assert len(waiting) == 2
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert set(waiting) <= set(managed_containers(docker_executor))  # a crash leaves them
    docker_executor.reap()
    assert not set(waiting) & set(managed_containers(docker_executor))


def test_pool_settings() -> None:
    assert PoolSettings.model_validate(True).enabled
    assert Config(docker={"pool": "true"}).docker.pool.enabled
    assert load_config(environ={"PARITY_SANDBOX_DOCKER_POOL": "true"}).docker.pool.enabled
    assert Config(docker={"pool": {"idle_timeout": "2m"}}).docker.pool.idle_timeout == 120
    with pytest.raises(InvalidInput, match="min"):
        Config(docker={"pool": {"min": 5, "max": 2}})
    with pytest.raises(InvalidInput):
        Config(docker={"pool": {"profiles": [{"image": TEST_IMAGE, "oci_runtime": "kata"}]}})


UNCLOSED = """
import sys
from parity_sandbox import Config, DockerExecutor, Task
executor = DockerExecutor(Config(docker={"pool": True}))
executor.warm(Task(image=sys.argv[1], command=["true"]), wait=60)
print(" ".join(executor.warm_containers()), flush=True)
"""  # and exits without close()


def test_an_executor_never_closed_takes_its_warm_containers_at_exit(
    docker_executor: DockerExecutor,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    done = subprocess.run(
        [sys.executable, "-c", UNCLOSED, TEST_IMAGE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    waiting = done.stdout.split()
    assert len(waiting) == 1
    assert not set(waiting) & set(managed_containers(docker_executor))
