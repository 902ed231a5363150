"""The WASM runtime against real wasmtime: results, limits, timeouts and bad input."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import (
    Config,
    ExecutionError,
    ExecutionTimeout,
    InvalidInput,
    Limits,
    ResourceLimitExceeded,
    Status,
    Task,
    WasmExecutor,
)

MiB = 1 << 20


def test_the_seed_usage_works(
    wasm: WasmFixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "task.wasm").write_bytes(wasm.echo_stdin.read_bytes())
    monkeypatch.chdir(tmp_path)
    executor = WasmExecutor(Config(memory_limit="128m", timeout=timedelta(minutes=1)))
    try:
        result = executor.execute(Task(wasm_file="./task.wasm", input=b"input data"))
    finally:
        executor.close()
    assert result.status is Status.SUCCEEDED
    assert result.stdout == b"input data"
    assert result.stderr == b"\nbytes=10\n"


def test_a_successful_run_reports_everything(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = executor.execute(Task(wasm_file=wasm.hello, id="t-1", labels={"job": "demo"}))
    assert (result.status, result.exit_code, result.stdout) == (Status.SUCCEEDED, 0, b"hello\n")
    assert result.ok and not result.stdout_truncated
    assert result.task_id == "t-1" and result.labels == {"job": "demo"}
    assert result.runtime is not None
    assert result.runtime.name == "wasm" and result.runtime.version.startswith("wasmtime 50")
    assert result.runtime.module_sha256 == hashlib.sha256(wasm.hello.read_bytes()).hexdigest()
    assert result.duration > 0
    assert result.usage.cpu_time is not None and 0 < result.usage.cpu_time < 1
    assert result.usage.peak_memory


def test_a_non_zero_exit_is_a_result(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = executor.execute(Task(wasm_file=wasm.exit_code, args=("7",)))
    assert (result.status, result.exit_code, result.stderr) == (Status.FAILED, 7, b"bye\n")


def test_args_env_and_stdin_reach_the_task(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = executor.execute(Task(wasm_file=wasm.args, args=("one", "two words", "")))
    assert result.stdout.splitlines()[1:] == [b"args.wasm", b"one", b"two words", b""]
    result = executor.execute(Task(wasm_module=wasm.echo_stdin.read_bytes(), stdin=b"\0\1\2"))
    assert result.stdout == b"\0\1\2"


def test_the_task_sees_only_the_environment_it_was_given(
    executor: WasmExecutor, wasm: WasmFixtures, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_SECRET", "leaked")
    result = executor.execute(Task(wasm_file=wasm.env, env={"ONLY": "this"}))
    assert result.stdout.splitlines() == [b"ONLY=this", b"count=1"]
    result = executor.execute(Task(wasm_file=wasm.env))
    assert result.stdout.splitlines() == [b"count=0"]


def test_an_infinite_loop_times_out_on_time(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout) as info:
        executor.execute(Task(wasm_file=wasm.print_then_loop, limits=Limits(timeout=1)))
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert info.value.result is not None
    assert info.value.result.status is Status.TIMEOUT
    assert info.value.result.stdout == b"started\n"  # the partial output is kept


def test_a_sleeping_guest_times_out_on_time(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout) as info:
        executor.execute(Task(wasm_file=wasm.print_then_sleep, limits=Limits(timeout=1)))
    assert time.monotonic() - started < 2.0
    assert info.value.result is not None
    assert info.value.result.stdout == b"started\n"
    # The executor is still usable afterwards (the worker was replaced).
    assert executor.execute(Task(wasm_file=wasm.hello)).ok


def rss() -> int:
    """This (the host) process's resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_memory_bomb_hits_the_memory_limit(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    before = rss()
    with pytest.raises(ResourceLimitExceeded) as info:
        executor.execute(Task(wasm_file=wasm.membomb, limits=Limits(memory="64m")))
    assert rss() - before < 16 * MiB  # the guest's memory lives in a worker, not here
    assert info.value.limit == "memory"
    result = info.value.result
    assert result is not None and result.status is Status.RESOURCE_LIMIT
    assert b"allocation failed" in result.stderr
    assert result.usage.peak_memory is not None and result.usage.peak_memory <= 64 * MiB


def test_a_stack_overflow_is_a_clear_error(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    with pytest.raises((ResourceLimitExceeded, ExecutionError)) as info:
        executor.execute(Task(wasm_file=wasm.stack_overflow))
    assert "stack" in info.value.message


def test_a_trap_is_an_execution_error(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    with pytest.raises(ExecutionError) as info:
        executor.execute(Task(wasm_file=wasm.trap))
    assert "unreachable" in info.value.message
    assert info.value.result is not None and info.value.result.stdout == b"about to trap\n"


def test_fuel_exhaustion_is_deterministic(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    used = set()
    for _ in range(3):
        with pytest.raises(ResourceLimitExceeded) as info:
            executor.execute(Task(wasm_file=wasm.count, limits=Limits(fuel=1_000_000)))
        assert info.value.limit == "fuel"
        assert info.value.result is not None
        used.add(info.value.result.usage.fuel_used)
    assert used == {1_000_000}
    result = executor.execute(Task(wasm_file=wasm.count, args=("1000",), limits=Limits(fuel=10**9)))
    assert result.ok
    fuel = result.usage.fuel_used
    assert fuel is not None and 0 < fuel < 10**9
    again = executor.execute(Task(wasm_file=wasm.count, args=("1000",), limits=Limits(fuel=10**9)))
    assert again.usage.fuel_used == fuel


def test_a_stdout_flood_is_capped_and_quick(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    before = rss()
    started = time.monotonic()
    result = executor.execute(Task(wasm_file=wasm.flood, args=(str(100 * MiB),)))
    assert time.monotonic() - started < 5
    assert rss() - before < 16 * MiB  # about the 1 MiB cap, not 100 MB
    assert result.ok and result.stdout_truncated and not result.stderr_truncated
    assert result.stdout == b"x" * MiB
    result = executor.execute(
        Task(wasm_file=wasm.flood, args=("5000", "stderr"), limits=Limits(output=1000))
    )
    assert result.stderr == b"x" * 1000 and result.stderr_truncated


def test_an_endless_flood_keeps_the_cap_until_the_timeout(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    with pytest.raises(ExecutionTimeout) as info:
        executor.execute(Task(wasm_file=wasm.flood_forever, limits=Limits(timeout=1)))
    assert info.value.result is not None
    assert info.value.result.stdout == b"y" * MiB and info.value.result.stdout_truncated


def test_a_file_past_the_disk_limit_is_refused(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    with pytest.raises(ResourceLimitExceeded) as info:
        executor.execute(
            Task(wasm_file=wasm.big_file, args=(str(8 * MiB),), limits=Limits(disk="4m"))
        )
    assert info.value.limit == "disk"
    assert info.value.result is not None and b"write failed at 4 MiB" in info.value.result.stderr


def test_a_workspace_past_the_disk_limit_is_reported(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    # Each file is under the cap, together they are over it: checked after the run.
    with pytest.raises(ResourceLimitExceeded) as info:
        executor.execute(
            Task(wasm_file=wasm.many_files, args=("6", str(MiB)), limits=Limits(disk="4m"))
        )
    assert info.value.limit == "disk"
    within = executor.execute(
        Task(wasm_file=wasm.many_files, args=("3", str(MiB)), limits=Limits(disk="4m"))
    )
    assert within.ok


def test_a_workspace_outgrowing_the_disk_cap_is_stopped_while_it_runs(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    # 100,000 files of 1 MiB would be 100 GB: the run is stopped soon after it passes 4 MiB.
    started = time.monotonic()
    with pytest.raises(ResourceLimitExceeded) as info:
        executor.execute(
            Task(
                wasm_file=wasm.many_files,
                args=("100000", str(MiB)),
                limits=Limits(disk="4m", timeout=30),
            )
        )
    assert time.monotonic() - started < 5
    assert info.value.limit == "disk"
    assert executor.execute(Task(wasm_file=wasm.hello)).ok  # the worker was replaced


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        (lambda w: Task(wasm_file=w.hello.parent / "missing.wasm"), "cannot open"),
        (lambda w: Task(wasm_file=Path(__file__)), "not a WebAssembly module"),
        (lambda w: Task(wasm_module=b"\0asm\x0d\0\x01\0rest"), "component"),
        (lambda w: Task(wasm_module=b"\0asm\x01\0\0\0\xff\xff"), "not a valid WebAssembly"),
        (lambda w: Task(wasm_file=w.hello.parent), "not a regular file"),
        (lambda w: Task(wasm_file=Path("/dev/zero")), "not a regular file"),
    ],
)
def test_bad_modules_are_invalid_input(
    executor: WasmExecutor, wasm: WasmFixtures, task: object, needle: str
) -> None:
    with pytest.raises(InvalidInput, match=needle):
        executor.execute(task(wasm))  # type: ignore[operator]


def test_a_module_that_is_not_a_wasi_command_is_invalid_input(executor: WasmExecutor) -> None:
    import wasmtime

    reactor = wasmtime.wat2wasm('(module (func (export "run")))')
    with pytest.raises(InvalidInput, match="_start"):
        executor.execute(Task(wasm_module=bytes(reactor)))
    foreign = wasmtime.wat2wasm(
        '(module (import "env" "f" (func)) (func (export "_start") call 0))'
    )
    with pytest.raises(InvalidInput, match=r"env\.f"):
        executor.execute(Task(wasm_module=bytes(foreign)))


def test_memory_beyond_wasm32_is_refused(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    with pytest.raises(InvalidInput, match="memory"):
        executor.execute(Task(wasm_file=wasm.hello, limits=Limits(memory="8g")))


def test_results_come_from_the_limits_in_force(wasm: WasmFixtures, cache_dir: Path) -> None:
    config = Config(cache_dir=cache_dir, output_limit=10)
    with WasmExecutor(config, workers=1) as executor:
        result = executor.execute(Task(wasm_file=wasm.flood, args=("100",)))
        assert result.stdout == b"x" * 10 and result.stdout_truncated
        bigger = executor.execute(
            Task(wasm_file=wasm.flood, args=("100",), limits=Limits(output=50))
        )
        assert bigger.stdout == b"x" * 50


def test_a_flood_costs_the_worker_about_the_cap(wasm: WasmFixtures, cache_dir: Path) -> None:
    from test_wasm_cleanup import worker_pids

    def peak(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024

    with WasmExecutor(Config(cache_dir=cache_dir), workers=1) as executor:
        assert executor.execute(Task(wasm_file=wasm.hello)).ok
        (pid,) = worker_pids(str(executor._root))
        before = peak(pid)
        result = executor.execute(Task(wasm_file=wasm.flood, args=(str(100 * MiB),)))
        assert result.stdout_truncated
        assert peak(pid) - before < 32 * MiB  # 100 MB went through; about 1 MiB was kept


def test_file_size_is_a_per_task_limit(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    with pytest.raises(ResourceLimitExceeded) as info:
        executor.execute(
            Task(wasm_file=wasm.big_file, args=(str(2 * MiB),), limits=Limits(file_size="1m"))
        )
    assert info.value.limit == "file_size"
    assert info.value.result is not None and b"write failed at 1 MiB" in info.value.result.stderr
    fits = executor.execute(
        Task(wasm_file=wasm.big_file, args=(str(MiB // 2),), limits=Limits(file_size="1m"))
    )
    assert fits.ok


def test_output_files_are_capped_per_task(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    parts = tuple(f"part{i}.bin" for i in range(5))  # what many_files writes under /work
    task = Task(wasm_file=wasm.many_files, args=("5", "10"), outputs=parts)
    capped = executor.execute(task.model_copy(update={"limits": Limits(output_files=3)}))
    assert len(capped.files) == 3 and capped.files_truncated
    everything = executor.execute(task)
    assert len(everything.files) == 5 and not everything.files_truncated


def test_input_bytes_are_bounded_and_billed(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    data = b"x" * (3 * MiB)
    with pytest.raises(InvalidInput, match=r"limits\.input"):
        executor.execute(
            Task(wasm_file=wasm.hello, input_files={"a": data}, limits=Limits(memory="4m"))
        )
    result = executor.execute(
        Task(wasm_file=wasm.hello, input_files={"a": data}, limits=Limits(memory="4m", input="3m"))
    )
    assert result.usage.input_bytes == len(data)
