"""The seccomp deny-list of the WASM workers, checked in a real process against the real kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import Task, WasmExecutor, _seccomp

pytestmark = pytest.mark.skipif(not _seccomp.supported(), reason="no deny-list for this arch")

PROBE = r"""
import ctypes, errno, os, socket, threading
from parity_sandbox import _seccomp
assert _seccomp.install()
def refused(action):
    try:
        action()
    except OSError as exc:
        return exc.errno in (errno.EPERM, errno.ENOSYS)
    return False
box = []
thread = threading.Thread(target=lambda: box.append(sum(range(1000))))
thread.start(); thread.join()
libc = ctypes.CDLL(None, use_errno=True)
def ptrace():
    if libc.ptrace(16, os.getppid(), 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
print("socket", refused(lambda: socket.socket()))
print("fork", refused(os.fork))
print("exec", refused(lambda: os.execv("/bin/true", ["true"])))
print("ptrace", refused(ptrace))
print("thread", box == [499500])
print("file", open(__file__ if "__file__" in dir() else "/proc/self/status").read(1) != "")
"""


def test_the_deny_list_refuses_exec_fork_sockets_and_ptrace_but_keeps_threads() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    verdicts = dict(line.split() for line in done.stdout.splitlines())
    assert verdicts == {
        "socket": "True",
        "fork": "True",
        "exec": "True",
        "ptrace": "True",
        "thread": "True",
        "file": "True",
    }


def test_workers_run_under_the_filter(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    from test_wasm_cleanup import worker_pids

    assert executor.execute(Task(wasm_file=wasm.hello)).ok
    pids = worker_pids(str(executor._root))
    assert pids
    for pid in pids:
        assert "Seccomp:\t2" in Path(f"/proc/{pid}/status").read_text()


def test_every_denied_call_jumps_to_the_refusal() -> None:
    import errno

    for machine in ("x86_64", "aarch64"):
        code = _seccomp.program(machine)
        assert code[-1][0] == 0x06  # the program ends in returns
        for index, (opcode, true_jump, false_jump, value) in enumerate(code):
            if opcode & 0x07 != 0x05:  # not a jump
                continue
            assert index + 1 + max(true_jump, false_jump) < len(code)
            if index >= 4 and opcode == 0x15 and value in _seccomp._ARCHES[machine][1].values():
                assert code[index + 1 + true_jump] == (0x06, 0, 0, 0x00050000 | errno.EPERM)
