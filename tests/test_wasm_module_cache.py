"""Compiled modules persist on disk, so a new process does not compile again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import wasmtime

from conftest import WasmFixtures
from parity_sandbox import Config, Task, WasmExecutor

RUN_ONCE = """
import sys
from pathlib import Path
from parity_sandbox import Config, Task, WasmExecutor
with WasmExecutor(Config(cache_dir=Path(sys.argv[2])), workers=1) as ex:
    sys.stdout.buffer.write(ex.execute(Task(wasm_file=sys.argv[1])).stdout)
"""


def run_in_new_process(module: Path, cache: Path) -> bytes:
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONCE, str(module), str(cache)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_a_new_process_loads_the_compiled_module_from_disk(
    wasm: WasmFixtures, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert run_in_new_process(wasm.hello, cache) == b"hello\n"
    compiled = list(cache.rglob("*.cwasm"))
    assert len(compiled) == 1
    assert compiled[0].stat().st_mode & 0o077 == 0
    # Put another program's compiled code under hello's name: if the next process prints what
    # that program prints, it ran the cached code and did not compile hello.wasm again.
    engine_dir = compiled[0].parent
    stack, fuel = (int(part[1:]) for part in engine_dir.name.split("-")[-2:])
    config = wasmtime.Config()
    config.consume_fuel = bool(fuel)
    config.max_wasm_stack = stack
    config.cranelift_opt_level = "speed"
    impostor = wasmtime.Module(wasmtime.Engine(config), wasm.exit_code.read_bytes())
    compiled[0].write_bytes(bytes(impostor.serialize()))
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONCE, str(wasm.hello), str(cache)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stdout == b""  # exit_code.wasm prints "bye" to stderr only
    assert b"Traceback" not in done.stderr


def test_a_cache_dir_others_can_write_is_not_used(wasm: WasmFixtures, tmp_path: Path) -> None:
    # Compiled modules are native code: a directory that others can write must not feed them.
    modules = tmp_path / "wasm-modules"
    modules.mkdir()
    os.chmod(modules, 0o777)
    with WasmExecutor(Config(cache_dir=tmp_path), workers=1) as executor:
        assert executor.execute(Task(wasm_file=wasm.hello)).ok
    assert list(modules.rglob("*.cwasm")) == []


def test_changed_module_files_are_noticed(
    wasm: WasmFixtures, tmp_path: Path, cache_dir: Path
) -> None:
    target = tmp_path / "task.wasm"
    target.write_bytes(wasm.hello.read_bytes())
    with WasmExecutor(Config(cache_dir=cache_dir), workers=1) as executor:
        assert executor.execute(Task(wasm_file=target)).stdout == b"hello\n"
        target.write_bytes(wasm.exit_code.read_bytes())
        result = executor.execute(Task(wasm_file=target))
        assert (result.exit_code, result.stderr) == (3, b"bye\n")


def test_the_disk_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    from parity_sandbox.runtimes.wasm.worker import _evict

    for i in range(5):
        path = tmp_path / f"{i}.cwasm"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    _evict(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.cwasm", "3.cwasm", "4.cwasm"]
