"""Nothing is left behind: no workspace, no worker process, also after timeouts and crashes."""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import Config, Limits, SandboxError, Status, Task, WasmExecutor
from parity_sandbox.runtimes.wasm.pool import (
    ROOT_PREFIX,
    WORKER_MODULE,
    reap_stale_roots,
    worker_environment,
)


def worker_pids(marker: str) -> set[int]:
    """Live worker processes whose command line mentions ``marker``.

    Found by the module the pool starts (``WORKER_MODULE``), so a rename cannot make this
    find nothing; a test that checks that workers are gone first checks that it saw them.
    """
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if WORKER_MODULE in cmdline and marker in cmdline and state != "Z":
            found.add(int(entry.name))
    return found


def roots_of(pid: int) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}{pid}-*"))


@pytest.mark.slow
def test_a_thousand_runs_with_timeouts_and_failures_leave_nothing(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    mix = [
        Task(wasm_file=wasm.hello),
        Task(wasm_file=wasm.exit_code, args=("3",)),
        Task(wasm_file=wasm.write_outputs),
        Task(wasm_file=wasm.trap),
        Task(wasm_file=wasm.echo_stdin, stdin=b"abc", input_files={"f": b"x"}),
    ]
    slow = [
        Task(wasm_file=wasm.loop, limits=Limits(timeout=0.05)),
        Task(wasm_file=wasm.sleep, limits=Limits(timeout=0.05)),
    ]
    statuses: dict[Status, int] = {}
    fds_before = len(os.listdir("/proc/self/fd"))
    executor = WasmExecutor(Config(cache_dir=cache_dir))
    root = executor._root
    try:
        assert executor.execute(mix[0]).ok
        assert worker_pids(str(root)), "the helper finds no worker while one runs"
        tasks = [slow[i // 50 % 2] if i % 50 == 49 else mix[i % len(mix)] for i in range(1000)]
        for result in executor.map(tasks):
            statuses[result.status] = statuses.get(result.status, 0) + 1
        # While the executor lives, no task's files outlive it (stdin and inputs are removed
        # just after the reply, so give the workers a moment).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            leftovers = [
                p
                for p in root.rglob("*")
                if p.is_file() and p.name != "worker.log" and p.parent.name != root.name
            ]
            if not leftovers:
                break
            time.sleep(0.05)
        assert leftovers == []
    finally:
        executor.close()
    assert statuses[Status.TIMEOUT] == 20
    assert statuses[Status.ERROR] == 200
    assert not root.exists()
    assert worker_pids(str(root)) == set()
    del executor
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # no descriptor leaked


CRASHING_PARENT = """
import sys, threading, time
from parity_sandbox import Config, Limits, Task, WasmExecutor
executor = WasmExecutor(Config(cache_dir=sys.argv[2]))
threading.Thread(
    target=executor.execute,
    args=(Task(wasm_file=sys.argv[1], limits=Limits(timeout=120)),),
    daemon=True,
).start()
print(executor._root, flush=True)
time.sleep(120)
"""


def test_a_crashed_parent_leaves_no_worker_and_its_root_is_reaped(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PARENT, str(wasm.sleep), str(cache_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    root = Path(parent.stdout.readline().strip())
    deadline = time.monotonic() + 30
    while not worker_pids(str(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(str(root)), "the worker did not start"
    time.sleep(0.5)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while worker_pids(str(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(str(root)) == set(), "an orphaned worker outlived its parent"
    assert root.exists()  # the crash left it; the next executor reaps it
    with WasmExecutor(Config(cache_dir=cache_dir), workers=1):
        assert not root.exists()


def test_ctrl_c_stops_the_task_and_leaves_nothing(wasm: WasmFixtures, cache_dir: Path) -> None:
    script = (
        "import sys\n"
        "from parity_sandbox import Config, Limits, Task, WasmExecutor\n"
        "with WasmExecutor(Config(cache_dir=sys.argv[2]), workers=1) as ex:\n"
        "    print(ex._root, flush=True)\n"
        "    ex.execute(Task(wasm_file=sys.argv[1], limits=Limits(timeout=120)))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(wasm.sleep), str(cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    root = Path(child.stdout.readline().strip())
    time.sleep(1.0)
    assert worker_pids(str(root)), "the helper finds no worker while one runs"
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=10)
    assert "KeyboardInterrupt" in stderr
    assert not root.exists()
    assert worker_pids(str(root)) == set()


def test_errors_are_sandbox_errors(wasm: WasmFixtures, executor: WasmExecutor) -> None:
    with pytest.raises(SandboxError):
        executor.execute(Task(wasm_file=wasm.trap))


def test_workers_are_hardened(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    assert executor.execute(Task(wasm_file=wasm.hello)).ok
    pids = worker_pids(str(executor._root))
    assert pids
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
        assert Path(f"/proc/{pid}/cwd").resolve().is_relative_to(executor._root)


def test_a_worker_environment_keeps_nothing_of_the_parent_but_its_python_path() -> None:
    parent = {"PARITY_CANARY_SECRET": "s3cret", "HOME": "/root", "PATH": "/bin", "PYTHONPATH": "/x"}
    env = worker_environment(parent, "/pkg")
    assert env["PYTHONPATH"] == os.pathsep.join(["/pkg", "/x"])
    assert set(env) == {"PYTHONPATH", "PYTHONSAFEPATH", "LC_ALL", "PYTHONUTF8"}
    assert "s3cret" not in str(env)
    assert worker_environment({}, "/pkg")["PYTHONPATH"] == "/pkg"


def test_workers_do_not_inherit_the_parents_environment(
    monkeypatch: pytest.MonkeyPatch, wasm: WasmFixtures, cache_dir: Path
) -> None:
    canary = "parity-canary-3f9c1e"
    monkeypatch.setenv("PARITY_CANARY_SECRET", canary)
    with WasmExecutor(Config(cache_dir=cache_dir), workers=1) as executor:
        assert executor.execute(Task(wasm_file=wasm.hello)).ok
        pids = worker_pids(str(executor._root))
        assert pids, "no worker process found"
        for pid in pids:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            names = {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}
            assert canary.encode() not in raw
            allowed = set(worker_environment({}, ""))
            assert names <= allowed
            assert names.isdisjoint(set(os.environ) - allowed)


def test_an_executor_dropped_unclosed_releases_everything(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    executor = WasmExecutor(Config(cache_dir=cache_dir), workers=1)
    assert executor.execute(Task(wasm_file=wasm.hello)).ok
    root = executor._root
    assert worker_pids(str(root))
    del executor
    gc.collect()
    assert not root.exists()
    deadline = time.monotonic() + 5
    while worker_pids(str(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_pids(str(root)) == set()


def test_a_root_is_never_reapable_before_its_lock_is_held(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, wasm: WasmFixtures
) -> None:
    # Another process's reap runs in the moment between creating the lock file and taking the
    # lock: the new root must not be visible to it yet (a race the 20-process test once hit).
    import parity_sandbox.runtimes.wasm.executor as wasm_runtime

    real_flock = fcntl.flock

    def reap_then_lock(fd: int, operation: int) -> None:
        reap_stale_roots()
        real_flock(fd, operation)

    racing = types.SimpleNamespace(flock=reap_then_lock, LOCK_EX=fcntl.LOCK_EX)
    monkeypatch.setattr(wasm_runtime, "fcntl", racing)
    with WasmExecutor(Config(cache_dir=cache_dir, cache={"enabled": False})) as executor:
        monkeypatch.setattr(wasm_runtime, "fcntl", fcntl)
        assert executor.execute(Task(wasm_file=wasm.hello)).ok
