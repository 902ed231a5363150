"""Deterministic WASM mode: one result hash for one task, on every run and in every process."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import ResourceLimitExceeded, Task, WasmExecutor

RUN_ONCE = """
import json, sys
from parity_sandbox import Config, Task, WasmExecutor
# No result cache: each of the 20 processes must really run the task.
with WasmExecutor(Config(cache_dir=sys.argv[2], cache={"enabled": False})) as executor:
    hashes = {}
    for deterministic in (True, False):
        result = executor.execute(Task(wasm_file=sys.argv[1], deterministic=deterministic,
                                       input_files={"data.txt": b"x"}))
        hashes[str(deterministic)] = [result.result_hash, result.stdout.decode()]
print(json.dumps(hashes))
"""


def test_twenty_processes_give_one_result_hash(wasm: WasmFixtures, cache_dir: Path) -> None:
    def one(_: int) -> dict[str, list[str]]:
        done = subprocess.run(
            [sys.executable, "-c", RUN_ONCE, str(wasm.determinism), str(cache_dir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        answer: dict[str, list[str]] = json.loads(done.stdout)
        return answer

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(one, range(20)))
    deterministic = {run["True"][0] for run in runs}
    free = {run["False"][0] for run in runs}
    assert len(deterministic) == 1
    assert len(free) > 1  # the same module without the mode sees the host's clock and entropy
    output = runs[0]["True"][1]
    assert "realtime=1577836800." in output and "nan_bits=7ff8000000000000" in output
    assert "input_mtime=0" in output and "work_mtime=0" in output


def test_the_seed_comes_from_the_task(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    one = executor.execute(Task(wasm_file=wasm.determinism, deterministic=True))
    again = executor.execute(Task(wasm_file=wasm.determinism, deterministic=True))
    other = executor.execute(Task(wasm_file=wasm.determinism, deterministic=True, stdin=b"."))
    random = [line for line in one.stdout.split(b"\n") if line.startswith(b"random=")]
    assert one.stdout == again.stdout and one.result_hash == again.result_hash
    assert random and random[0] not in other.stdout


def test_fuel_is_the_cpu_limit(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    done = executor.execute(Task(wasm_file=wasm.hello, deterministic=True))
    assert done.ok and done.usage.fuel_used is not None and done.usage.fuel_used > 0
    with pytest.raises(ResourceLimitExceeded) as raised:
        executor.execute(Task(wasm_file=wasm.loop, deterministic=True, limits={"fuel": 10_000_000}))
    assert raised.value.limit == "fuel"


def test_a_deterministic_task_sees_a_fixed_program_name(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    named = executor.execute(Task(wasm_file=wasm.args, args=("x",)))
    fixed = executor.execute(Task(wasm_file=wasm.args, args=("x",), deterministic=True))
    assert b"args.wasm" in named.stdout
    assert b"args.wasm" not in fixed.stdout and b"task.wasm" in fixed.stdout
