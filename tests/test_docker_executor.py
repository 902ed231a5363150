"""The Docker executor's contract on the real engine: results, inputs, outputs, errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from conftest import TEST_IMAGE, managed_containers
from parity_sandbox import (
    Config,
    DockerExecutor,
    InvalidInput,
    LaunchFailed,
    ResourceLimitExceeded,
    RuntimeUnavailable,
    Status,
    Task,
    spec_hash,
)

pytestmark = pytest.mark.docker


def test_result_carries_output_code_files_and_provenance(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    task = Task(
        image=TEST_IMAGE,
        command=[
            "sh",
            "-c",
            'cat; echo "$GREETING" >&2; mkdir -p out/sub; '
            "cp /input/data.txt out/sub/copy.txt; pwd; exit 3",
        ],
        oci_runtime=oci_runtime,
        stdin=b"from stdin\n",
        env={"GREETING": "hello"},
        input_files={"data.txt": b"payload"},
        id="provenance",
        labels={"k": "v"},
    )
    result = docker_executor.execute(task)
    assert result.status is Status.FAILED and result.exit_code == 3
    assert result.stdout == b"from stdin\n/work\n"
    assert result.stderr == b"hello\n"
    assert result.files == {"out/sub/copy.txt": b"payload"}
    assert result.task_id == "provenance" and result.labels == {"k": "v"}
    assert result.runtime is not None
    assert result.runtime.name == "docker" and result.runtime.oci_runtime == oci_runtime
    assert result.runtime.image == TEST_IMAGE
    assert result.runtime.image_id is not None and result.runtime.image_id.startswith("sha256:")
    assert result.usage.cpu_time is not None and result.usage.cpu_time > 0
    assert result.usage.peak_memory is not None and result.usage.peak_memory > 0


def test_large_stdin_while_the_task_prints(docker_executor: DockerExecutor) -> None:
    data = bytes(range(256)) * 20_000  # 5 MB: more than any socket buffer holds
    result = docker_executor.execute(
        Task(image=TEST_IMAGE, command=["sh", "-c", "echo start; md5sum"], stdin=data)
    )
    import hashlib

    assert result.ok
    assert result.stdout == f"start\n{hashlib.md5(data).hexdigest()}  -\n".encode()


def test_user_and_workdir(docker_executor: DockerExecutor) -> None:
    result = docker_executor.execute(
        Task(
            image=TEST_IMAGE,
            command=["sh", "-c", "id -u; id -g; pwd"],
            user="1234:4321",
            workdir="/tmp",
        )
    )
    assert result.stdout == b"1234\n4321\n/tmp\n"


def test_a_command_that_does_not_exist(docker_executor: DockerExecutor) -> None:
    with pytest.raises(LaunchFailed) as raised:
        docker_executor.execute(Task(image=TEST_IMAGE, command=["no-such-program"]))
    result = raised.value.result
    assert result is not None and result.status is Status.LAUNCH_FAILED
    assert result.exit_code is None
    assert b"no-such-program" in result.stderr


def test_missing_image_is_never_pulled_silently(docker_executor: DockerExecutor) -> None:
    with pytest.raises(RuntimeUnavailable, match=r"not on this Docker host.*pull_policy"):
        docker_executor.execute(Task(image="parity-sandbox-test/absent:1", command=["true"]))


def test_a_failed_pull_is_a_clear_error() -> None:
    # A registry on loopback that is not there: the pull fails without leaving this host.
    config = Config(docker={"pull_policy": "if-missing"})
    with (
        DockerExecutor(config, reap=False) as executor,
        pytest.raises(RuntimeUnavailable, match="cannot pull image"),
    ):
        executor.execute(Task(image="127.0.0.1:9/absent/image:1", command=["true"]))


def test_allow_list(docker_executor: DockerExecutor) -> None:
    config = Config(docker={"allowed_images": ["parity-sandbox-test/*"]})
    with DockerExecutor(config, reap=False) as executor:
        assert executor.execute(Task(image=TEST_IMAGE, command=["true"])).ok
        with pytest.raises(InvalidInput, match="allowed_images"):
            executor.execute(Task(image="busybox", command=["true"]))


def test_gpus_without_a_gpu_runtime(docker_executor: DockerExecutor) -> None:
    if docker_executor.has_gpu_runtime():
        pytest.skip("this daemon has a GPU runtime")
    before = len(managed_containers(docker_executor))
    with pytest.raises(RuntimeUnavailable, match="GPU"):
        docker_executor.execute(Task(image=TEST_IMAGE, command=["true"], gpus=1))
    assert len(managed_containers(docker_executor)) == before


def test_unreachable_daemon(tmp_path: Path) -> None:
    config = Config(docker={"base_url": f"unix://{tmp_path}/no.sock"})
    with pytest.raises(RuntimeUnavailable, match="cannot reach the Docker daemon"):
        DockerExecutor(config)


def test_async_cancel_kills_the_container(docker_executor: DockerExecutor) -> None:
    task_id = f"cancel-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        job = asyncio.ensure_future(
            docker_executor.execute_async(
                Task(image=TEST_IMAGE, command=["sleep", "60"], id=task_id)
            )
        )
        await asyncio.sleep(1.0)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while managed_containers(docker_executor, task_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert managed_containers(docker_executor, task_id) == []


def test_close_during_a_run_removes_the_container() -> None:
    import threading

    executor = DockerExecutor(reap=False)
    task_id = f"close-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []

    def work() -> None:
        try:
            executor.execute(Task(image=TEST_IMAGE, command=["sleep", "60"], id=task_id))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 10
    while not managed_containers(executor, task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    executor.close()
    thread.join(15)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert len(errors) == 1 and isinstance(errors[0], RuntimeUnavailable)
    with DockerExecutor(reap=False) as other:
        assert managed_containers(other, task_id) == []


def test_the_hosts_environment_never_reaches_the_task(
    docker_executor: DockerExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARITY_HOST_SECRET", "host-only")
    result = docker_executor.execute(Task(image=TEST_IMAGE, command=["env"], env={"GIVEN": "yes"}))
    assert b"GIVEN=yes" in result.stdout
    assert b"host-only" not in result.stdout and b"PARITY_HOST_SECRET" not in result.stdout


def test_a_daemon_without_runsc_names_the_fix(docker_executor: DockerExecutor) -> None:
    with DockerExecutor(reap=False) as executor:
        executor._info = {**executor._info, "Runtimes": {"runc": {}}}
        with pytest.raises(RuntimeUnavailable, match=r"apt-get install runsc.*daemon\.json"):
            executor.execute(Task(image=TEST_IMAGE, command=["true"], oci_runtime="runsc"))


def test_spec_hash_resolves_the_image_to_its_id(docker_executor: DockerExecutor) -> None:
    task = Task(image=TEST_IMAGE, command=["true"])
    image_id = docker_executor._api.inspect_image(TEST_IMAGE)["Id"]  # type: ignore[no-untyped-call]
    assert docker_executor.spec_hash(task) == spec_hash(
        task, docker_executor.config, image_id=image_id
    )
    assert docker_executor.spec_hash(task) == spec_hash(
        Task(image=image_id, command=["true"]), docker_executor.config
    )


def test_a_cacheable_docker_task_is_served_from_the_cache(tmp_path: Path) -> None:
    config = Config(cache={"path": tmp_path / "results.sqlite3"})
    task = Task(image=TEST_IMAGE, command=["echo", "once"], cacheable=True)
    with DockerExecutor(config, reap=False) as executor:
        first = executor.execute(task)
        again = executor.execute(task)
        forced = executor.execute(task, use_cache=False)
    assert not first.cached and again.cached and not forced.cached
    assert first.spec_hash is not None and first.spec_hash == again.spec_hash
    assert again.result_hash == first.result_hash == forced.result_hash


def test_too_little_memory_for_gvisor_is_a_memory_limit(docker_executor: DockerExecutor) -> None:
    if "runsc" not in docker_executor.runtimes:
        pytest.skip("no runsc")
    with pytest.raises(ResourceLimitExceeded, match="gVisor") as raised:
        docker_executor.execute(
            Task(image=TEST_IMAGE, command=["true"], oci_runtime="runsc", limits={"memory": "8m"})
        )
    assert raised.value.limit == "memory"


def test_runsc_without_oci_seccomp_is_warned_about(docker_executor: DockerExecutor) -> None:
    assert docker_executor.runsc_applies_seccomp()  # as scripts/docker-setup.sh registers it
    with DockerExecutor(reap=False) as executor:
        executor._info = {
            **executor._info,
            "Runtimes": {"runc": {}, "runsc": {"path": "/usr/bin/runsc"}},
        }
        with pytest.warns(RuntimeWarning, match="oci-seccomp"):
            executor.execute(Task(image=TEST_IMAGE, command=["true"], oci_runtime="runsc"))
