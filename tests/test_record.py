"""Result JSON round trips, run records, and verification by re-running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import (
    Config,
    InvalidInput,
    ResourceUsage,
    Result,
    RuntimeInfo,
    Status,
    Task,
    WasmExecutor,
    portable,
    spec_hash,
)
from parity_sandbox._record import Record, verify
from test_cli import run_cli


def test_result_json_round_trips_exactly() -> None:
    result = Result(
        status=Status.RESOURCE_LIMIT,
        exit_code=None,
        stdout=b"\xff\x00binary",
        stderr="é".encode(),
        stdout_truncated=True,
        files={"out/a.bin": bytes(range(256))},
        duration=1.25,
        usage=ResourceUsage(cpu_time=0.5, peak_memory=1 << 20, fuel_used=7, wall_time=1.25),
        runtime=RuntimeInfo(name="wasm", version="x", module_sha256="ab"),
        limit="fuel",
        task_id="t",
        labels={"k": "v"},
        spec_hash="cd",
        cached=True,
    )
    again = Result.from_json(result.to_json())
    assert again == result and again.result_hash == result.result_hash
    with pytest.raises(InvalidInput):
        Result.from_json('{"status": "nonsense"}')


def test_a_portable_task_keeps_its_spec_hash(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(b"host file")
    task = Task(wasm_module=b"\0asm\x01\0\0\0", input_files={"d.txt": data}, limits={"fuel": 9})
    config = Config(timeout="7s")
    made = portable(task, config)
    assert made.input_files == {"d.txt": b"host file"}
    assert made.limits.timeout == 7.0
    # all its limits are explicit: another machine's configuration does not change its hash
    assert spec_hash(made, Config(timeout="99s")) == spec_hash(task, config)
    record = Record(made, spec_hash(made), Result(status=Status.SUCCEEDED, exit_code=0))
    again = Record.from_json(record.to_json())
    assert again.task == made and again.spec_hash == record.spec_hash


def test_verify_matches_a_deterministic_task(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    task = portable(Task(wasm_file=wasm.determinism, deterministic=True), executor.config)
    first = executor.execute(task)
    outcome = verify(Record(task, executor.spec_hash(task), first), executor)
    assert outcome.matched and outcome.actual == first.result_hash

    clocked = portable(Task(wasm_file=wasm.determinism), executor.config)
    first = executor.execute(clocked)
    outcome = verify(Record(clocked, executor.spec_hash(clocked), first), executor)
    assert not outcome.matched


def test_cli_save_and_verify(wasm: WasmFixtures, cache_dir: Path, tmp_path: Path) -> None:
    record = tmp_path / "run.json"
    done = run_cli(
        "run", "--deterministic", "--save", str(record), str(wasm.determinism), cache=cache_dir
    )
    assert done.returncode == 0
    done = run_cli("verify", str(record), cache=cache_dir)
    assert done.returncode == 0 and done.stdout.startswith(b"match ")

    loose = tmp_path / "loose.json"
    run_cli("run", "--save", str(loose), str(wasm.determinism), cache=cache_dir)
    done = run_cli("verify", str(loose), cache=cache_dir)
    assert done.returncode == 1 and b"MISMATCH" in done.stdout

    document = json.loads(record.read_text())
    document["result"]["stdout"] = "aGVsbG8K"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    done = run_cli("verify", str(edited), cache=cache_dir)
    assert done.returncode == 65 and b"result_hash" in done.stderr
    document = json.loads(record.read_text())
    document["task"]["args"] = ["changed"]
    edited.write_text(json.dumps(document))
    done = run_cli("verify", str(edited), cache=cache_dir)
    assert done.returncode == 65 and b"spec_hash" in done.stderr
    edited.write_text("not json")
    assert run_cli("verify", str(edited), cache=cache_dir).returncode == 65
