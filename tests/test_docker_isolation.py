"""The must-shows of the Docker runtime, each under runc and under runsc (gVisor), and each
on the cold path and through a warm pool (where every task must run in a warm container).

Everything here runs in real containers on the real engine, with the test image that
scripts/docker-setup.sh builds (busybox plus ``probe``, tests/fixtures/docker/probe.c).
"""

from __future__ import annotations

import gc
import subprocess
import time
import tracemalloc
import uuid
import warnings
from typing import Any

import pytest

from conftest import TEST_IMAGE, WarmOnly, managed_containers
from parity_sandbox import (
    DockerExecutor,
    ExecutionTimeout,
    InvalidInput,
    LaunchFailed,
    ResourceLimitExceeded,
    Result,
    Status,
    Task,
    TaskError,
)

pytestmark = pytest.mark.docker


@pytest.fixture(params=["cold", "warm"])
def docker_executor(
    request: pytest.FixtureRequest,
    docker_executor: DockerExecutor,
    warm_docker_executor: DockerExecutor,
) -> DockerExecutor | WarmOnly:
    """The shared executor (cold path), or one whose every task takes a warm container."""
    return docker_executor if request.param == "cold" else WarmOnly(warm_docker_executor)


def run(executor: DockerExecutor, runtime: str, *command: str, **fields: Any) -> Result:
    return executor.execute(Task(image=TEST_IMAGE, command=command, oci_runtime=runtime, **fields))


def sh(executor: DockerExecutor, runtime: str, script: str, **fields: Any) -> Result:
    return run(executor, runtime, "sh", "-c", script, **fields)


def outcome(executor: DockerExecutor, runtime: str, script: str, **fields: Any) -> Result:
    """The result, also of a task that ``execute`` reports by raising (timeout, limit)."""
    try:
        return sh(executor, runtime, script, **fields)
    except TaskError as error:
        assert error.result is not None
        return error.result


def test_fork_bomb_is_contained(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = run(docker_executor, oci_runtime, "probe", "forkbomb", limits={"pids": 64})
    assert result.ok, result.stderr
    made = int(result.stdout.split()[1])
    assert 0 < made < 64, result.stdout
    assert b"EAGAIN" in result.stdout
    # the shell version too: it ends at the timeout, and the host is fine afterwards
    task_id = f"bomb-{uuid.uuid4().hex[:8]}"
    bomb = outcome(
        docker_executor,
        oci_runtime,
        "f(){ f | f & }; f; sleep 60",
        limits={"pids": 64, "timeout": 3},
        id=task_id,
    )
    assert bomb.status in (Status.TIMEOUT, Status.FAILED, Status.RESOURCE_LIMIT)
    assert managed_containers(docker_executor, task_id) == []
    assert sh(docker_executor, oci_runtime, "echo fine").stdout == b"fine\n"


def test_memory_bomb_is_a_memory_limit(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    with pytest.raises(ResourceLimitExceeded) as raised:
        run(docker_executor, oci_runtime, "probe", "memory", limits={"memory": "64m"})
    assert raised.value.limit == "memory"
    assert raised.value.result is not None
    assert raised.value.result.status is Status.RESOURCE_LIMIT


@pytest.mark.parametrize(
    "script",
    [
        "while :; do :; done",
        "trap '' TERM INT HUP; while :; do :; done",
        "setsid sh -c 'sleep 86400' & (sleep 86400 &) ; sleep 86400",
    ],
    ids=["busy-loop", "sigterm-trap", "orphans"],
)
def test_timeout_kills_everything(
    docker_executor: DockerExecutor, oci_runtime: str, script: str
) -> None:
    task_id = f"timeout-{uuid.uuid4().hex[:8]}"
    marker = f"echo started-{task_id}; "
    with pytest.raises(ExecutionTimeout) as raised:
        sh(docker_executor, oci_runtime, marker + script, limits={"timeout": 1.5}, id=task_id)
    result = raised.value.result
    assert result is not None and result.status is Status.TIMEOUT
    assert result.stdout == f"started-{task_id}\n".encode()  # partial output is returned
    assert 1.5 <= result.duration < 6
    assert managed_containers(docker_executor, task_id) == []
    assert subprocess.run(["pgrep", "-f", "sleep 86400"], capture_output=True).stdout == b""


def test_orphans_die_when_the_task_exits(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = sh(docker_executor, oci_runtime, "setsid sleep 86399 & echo done")
    assert result.ok and result.stdout == b"done\n"
    assert result.duration < 5
    assert subprocess.run(["pgrep", "-f", "sleep 86399"], capture_output=True).stdout == b""


def test_stdout_flood_is_bounded(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    size = 200_000_000 if oci_runtime == "runc" else 50_000_000
    tracemalloc.start()
    try:
        result = sh(
            docker_executor,
            oci_runtime,
            f"head -c {size} /dev/zero; echo tail >&2",
            limits={"output": "1m", "timeout": 60},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert len(result.stdout) == 1 << 20 and result.stdout_truncated
    assert result.stderr == b"tail\n" and not result.stderr_truncated
    assert peak < 2 * (1 << 20) + (20 << 20)


FLOODS = {"stdout": "yes", "stderr": "yes >&2", "both": "yes & yes >&2"}


@pytest.mark.parametrize("timeout", [1, 5])
@pytest.mark.parametrize("stream", sorted(FLOODS))
def test_a_flood_at_the_timeout_ends_on_time(
    docker_executor: DockerExecutor, oci_runtime: str, stream: str, timeout: int
) -> None:
    """A task still flooding its output when its timeout strikes: the result comes within a
    second of the timeout, with the container already gone and no warning (the daemon, blocked
    writing into an attach connection left open, once held the removal for 30 s)."""
    task_id = f"flood-{uuid.uuid4().hex[:8]}"
    task = Task(
        image=TEST_IMAGE,
        command=("sh", "-c", FLOODS[stream]),
        oci_runtime=oci_runtime,
        limits={"timeout": timeout},
        id=task_id,
    )
    if isinstance(docker_executor, WarmOnly):
        assert docker_executor.warm(task, wait=60) >= 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        with pytest.raises(ExecutionTimeout) as raised:
            docker_executor.execute(task)
        elapsed = time.monotonic() - started
        left = docker_executor._api.containers(
            all=True, filters={"label": f"parity_sandbox.task_id={task_id}"}
        )
        gc.collect()  # an unclosed socket warns when it is collected
    assert elapsed < timeout + 1, f"the result came {elapsed - timeout:.2f} s after the timeout"
    assert left == []
    assert [str(w.message) for w in caught] == []
    result = raised.value.result
    assert result is not None
    for name in ("stdout", "stderr"):
        flooded = stream in (name, "both")
        assert (len(getattr(result, name)) == 1 << 20) is flooded, name
        assert getattr(result, f"{name}_truncated") is flooded, name


@pytest.mark.parametrize("place", ["/work", "/tmp", "/dev/shm"])
def test_disk_fill_stops_at_the_cap(
    docker_executor: DockerExecutor, oci_runtime: str, place: str
) -> None:
    script = (
        f"for i in 1 2 3 4 5 6; do dd if=/dev/zero of={place}/f$i bs=1M count=4 2>/dev/null; "
        f"done; du -sk {place} | cut -f1"
    )
    result = sh(docker_executor, oci_runtime, script, limits={"disk": "8m"})
    used_kib = int(result.stdout.split()[-1])
    assert used_kib <= 8 * 1024 + 64, result.stdout


def test_only_loopback(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = run(docker_executor, oci_runtime, "ls", "/sys/class/net")
    assert result.stdout.split() == [b"lo"]
    dev = run(docker_executor, oci_runtime, "cat", "/proc/net/dev").stdout.decode()
    assert [line.split(":")[0].strip() for line in dev.splitlines()[2:]] == ["lo"]


def test_root_filesystem_is_read_only(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = sh(docker_executor, oci_runtime, "touch /etc/x || touch /bin/x || echo refused")
    assert result.stdout.endswith(b"refused\n")


def test_no_capabilities_and_not_root(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    status = run(docker_executor, oci_runtime, "cat", "/proc/self/status").stdout.decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["CapPrm"].strip() == "0000000000000000"
    assert fields["Uid"].split()[0] == "65534"
    if "NoNewPrivs" in fields:  # gVisor's /proc does not show it
        assert fields["NoNewPrivs"].strip() == "1"


@pytest.mark.parametrize(
    "probe",
    [
        "setuid",
        "setgid",
        "mount",
        "unshare-user",
        "unshare-mount",
        "unshare-net",
        "ptrace-init",
        "ptrace-child",
        "keyctl",
        "vsock",
        "io_uring",
        "chroot",
        "bpf",
        "init-signal",
    ],
)
def test_privileged_operations_fail(
    docker_executor: DockerExecutor, oci_runtime: str, probe: str
) -> None:
    result = run(docker_executor, oci_runtime, "probe", probe)
    assert result.ok, (result.stdout, result.stderr)
    assert b"denied" in result.stdout


def test_proc_sys_and_sysrq_are_not_writable(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    result = sh(
        docker_executor,
        oci_runtime,
        "echo 1 > /proc/sys/kernel/sysrq && echo WROTE-SYS; "
        "echo h > /proc/sysrq-trigger && echo WROTE-SYSRQ; "
        "echo 1 > /proc/sys/vm/drop_caches && echo WROTE-VM; echo end",
    )
    assert result.stdout == b"end\n", result.stdout


def test_symlinks_in_outputs_are_not_followed(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    result = sh(
        docker_executor,
        oci_runtime,
        "mkdir -p /work/out && ln -s /etc/passwd /work/out/passwd && ln -s / /work/out/root "
        "&& ln -s /proc/1/root /work/out/init-root && mkfifo /work/out/fifo "
        "&& echo mine > /work/out/mine",
    )
    assert result.ok
    assert result.files == {"out/mine": b"mine\n"}
    whole = sh(docker_executor, oci_runtime, "ln -s /etc /work/out")
    assert whole.ok and whole.files == {}


def test_input_names_cannot_traverse(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    before = set(managed_containers(docker_executor))
    for name in ("../escape", "/etc/passwd", "a/../../b", "nul\x00name", "a/./b", ""):
        with pytest.raises(InvalidInput, match="input"):
            Task(image=TEST_IMAGE, oci_runtime=oci_runtime, input_files={name: b"x"})
    # no container made (earlier tasks' may still be going in the background meanwhile)
    assert set(managed_containers(docker_executor)) <= before


def test_input_files_are_read_only(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = sh(
        docker_executor,
        oci_runtime,
        "cat /input/dir/data.txt; echo x > /input/dir/data.txt || echo no-write; "
        "touch /input/new || echo no-create",
        input_files={"dir/data.txt": b"payload\n"},
    )
    assert result.stdout == b"payload\nno-write\nno-create\n"


def test_fifty_parallel_tasks_leave_nothing(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    batch = uuid.uuid4().hex[:8]
    tasks = [
        Task(
            image=TEST_IMAGE,
            command=["echo", str(i)],
            oci_runtime=oci_runtime,
            id=f"par-{batch}-{i}",
            labels={"batch": batch},
        )
        for i in range(50)
    ]
    results = list(docker_executor.map(tasks, max_parallel=50))
    assert docker_executor.drain(150)
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(50)]
    assert all(r.ok for r in results)
    leftovers = docker_executor._api.containers(
        all=True, filters={"label": "parity_sandbox.managed=true"}
    )
    assert [
        c
        for c in leftovers
        if c["Labels"].get("parity_sandbox.task_id", "").startswith(f"par-{batch}")
    ] == []
    volumes = docker_executor._api.volumes(filters={"dangling": True}).get("Volumes") or []
    assert [
        v
        for v in volumes
        if (v.get("Labels") or {}).get("parity_sandbox.task_id", "").startswith(f"par-{batch}")
    ] == []


def test_huge_and_deep_output_trees_are_capped(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    script = (
        "mkdir -p /work/out/many && cd /work/out/many && seq 1 20000 | xargs touch && "
        "d=/work/out/deep; i=0; while [ $i -lt 1500 ]; do d=$d/d; i=$((i+1)); done; "
        "mkdir -p $d && echo bottom > $d/f && echo top > /work/out/top.txt"
    )
    result = sh(docker_executor, oci_runtime, script, limits={"timeout": 120})
    assert result.ok, result.stderr
    assert len(result.files) == 1000 and result.files_truncated
    assert all(name.count("/") <= 34 for name in result.files)


def test_stdin_the_task_never_reads(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = sh(
        docker_executor, oci_runtime, "exec 0<&-; echo ignored-stdin", stdin=b"z" * 5_000_000
    )
    assert result.ok and result.stdout == b"ignored-stdin\n"


def test_closed_streams_do_not_end_the_task_early(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    result = outcome(
        docker_executor,
        oci_runtime,
        "echo before; exec >&- 2>&-; sleep 30",
        limits={"timeout": 1.5},
    )
    assert result.status is Status.TIMEOUT and result.stdout == b"before\n"


def test_block_io_throttles_reach_the_cgroup(docker_executor: DockerExecutor) -> None:
    from parity_sandbox import Config

    config = Config(docker={"disk_read_bps": "1m", "disk_write_iops": 100})
    with DockerExecutor(config, reap=False) as executor:
        result = executor.execute(
            Task(
                image=TEST_IMAGE,
                command=[
                    "cat",
                    "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device",
                    "/sys/fs/cgroup/blkio/blkio.throttle.write_iops_device",
                ],
            )
        )
    assert result.ok, result.stderr
    assert result.stdout.split()[1::2] == [b"1048576", b"100"]


def test_device_nodes_cannot_be_made(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    result = sh(
        docker_executor,
        oci_runtime,
        "mknod /tmp/mem c 1 1 && echo MADE-CHAR; mknod /work/disk b 254 0 && echo MADE-BLOCK; "
        "mkfifo /tmp/fifo && echo fifo-ok",
    )
    assert result.stdout == b"fifo-ok\n", result.stdout


def test_cpu_share_is_a_ceiling(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    # Two busy processes may use at most half a core between them.
    result = outcome(
        docker_executor,
        oci_runtime,
        "while :; do :; done & while :; do :; done",
        limits={"cpu": 0.5, "timeout": 3},
    )
    assert result.status is Status.TIMEOUT
    usage = result.usage
    assert usage.cpu_time is not None and usage.wall_time is not None
    assert usage.cpu_time < 0.7 * usage.wall_time


@pytest.mark.parametrize("probe", ["threads", "select", "loopback"])
def test_ordinary_programs_do_not_notice_the_hardening(
    docker_executor: DockerExecutor, oci_runtime: str, probe: str
) -> None:
    """Threads, select/poll/epoll, ``localhost`` and the container's own host name, and a
    server on loopback: what most programs (Python, a JVM, test servers) need."""
    result = run(docker_executor, oci_runtime, "probe", probe)
    assert result.ok, result.stdout + result.stderr
    if probe == "threads":
        assert result.stdout == b"threads: 8 of 8 started\n"
    elif probe == "select":
        assert result.stdout == b"select: ok\npoll: ok\nepoll: ok\n"
    else:
        assert result.stdout == b"loopback: ok\n"
    # still nothing but loopback
    assert run(docker_executor, oci_runtime, "ls", "/sys/class/net").stdout.split() == [b"lo"]


def test_a_thread_bomb_stops_at_the_process_limit(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    result = run(docker_executor, oci_runtime, "probe", "threadbomb", limits={"pids": 64})
    assert result.ok, result.stderr
    made = int(result.stdout.split()[1])
    assert 0 < made < 64, result.stdout
    assert b"EAGAIN" in result.stdout
    assert sh(docker_executor, oci_runtime, "echo fine").stdout == b"fine\n"


def test_programs_can_run_from_tmp_and_work(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    """/tmp and /work are exec (nosuid, nodev) under both runtimes alike: programs unpack and
    run helpers there."""
    result = sh(
        docker_executor,
        oci_runtime,
        # busybox runs the applet its file is named after
        "cp /bin/busybox /tmp/echo && /tmp/echo tmp; cp /bin/busybox /work/echo && /work/echo work",
    )
    assert result.stdout == b"tmp\nwork\n", result.stderr


def test_a_program_that_never_started_is_told_apart_from_its_exit_code(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    with pytest.raises(LaunchFailed, match=r"no-such-program.*No such file") as raised:
        run(docker_executor, oci_runtime, "no-such-program")
    result = raised.value.result
    assert result is not None and result.status is Status.LAUNCH_FAILED
    assert result.exit_code is None
    assert result.error is not None and result.error.type == "LaunchFailed"
    with pytest.raises(LaunchFailed, match="working directory /nowhere"):
        run(docker_executor, oci_runtime, "true", workdir="/nowhere")
    with pytest.raises(LaunchFailed, match="Permission denied"):
        run(docker_executor, oci_runtime, "/etc/passwd")
    # A program that exits 127 or 126 itself ran: its exit is a normal result.
    for code in (126, 127):
        exited = sh(docker_executor, oci_runtime, f"exit {code}")
        assert exited.status is Status.FAILED and exited.exit_code == code


def test_open_files_and_file_size_are_per_task(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    limits = {"open_files": 64, "file_size": "1m"}
    shown = sh(docker_executor, oci_runtime, "ulimit -n; ulimit -f", limits=limits)
    assert shown.stdout.split() == [b"64", b"2048"]  # -f counts 512-byte blocks
    opened = run(docker_executor, oci_runtime, "probe", "openfiles", limits=limits)
    assert opened.stdout == b"openfiles: 61, then EMFILE\n"  # 64 less stdin, stdout, stderr
    with pytest.raises(ResourceLimitExceeded) as raised:
        run(
            docker_executor,
            oci_runtime,
            *("dd", "if=/dev/zero", "of=/work/f", "bs=1M", "count=2"),
            limits=limits,
        )
    assert raised.value.limit == "file_size"
    small = run(
        docker_executor,
        oci_runtime,
        *("dd", "if=/dev/zero", "of=/work/f", "bs=1k", "count=512"),
        limits=limits,
    )
    assert small.ok, small.stderr


def test_output_files_are_capped_per_task(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    script = "mkdir out; for i in 1 2 3 4 5; do echo $i > out/f$i; done"
    result = sh(docker_executor, oci_runtime, script, limits={"output_files": 3})
    assert len(result.files) == 3 and result.files_truncated
    everything = sh(docker_executor, oci_runtime, script)
    assert len(everything.files) == 5 and not everything.files_truncated


def test_input_bytes_are_bounded_and_billed(
    docker_executor: DockerExecutor, oci_runtime: str
) -> None:
    """Input files live in a tmpfs the daemon fills, outside the task's memory cgroup: they
    are bounded by limits.input (default: half the memory limit) and billed in usage."""
    data = b"x" * (40 << 20)
    task_id = f"inputs-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidInput, match=r"limits\.input") as raised:
        sh(
            docker_executor,
            oci_runtime,
            "true",
            input_files={"big": data},
            limits={"memory": "64m"},
            id=task_id,
        )
    assert raised.value.field == "input_files"
    assert managed_containers(docker_executor, task_id) == []  # nothing was made
    result = sh(
        docker_executor,
        oci_runtime,
        "wc -c < /input/big",
        input_files={"big": data},
        limits={"memory": "64m", "input": "48m"},
    )
    assert result.stdout.strip() == str(len(data)).encode()
    assert result.usage.input_bytes == len(data)
    assert result.usage.memory_byte_seconds is not None
    assert result.usage.peak_memory is not None and result.usage.wall_time is not None
    assert result.usage.memory_byte_seconds >= len(data) * result.usage.wall_time
