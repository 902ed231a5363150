"""Spec hashes and result hashes: stable, canonical, and sensitive to every byte that matters."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from parity_sandbox import Config, InvalidInput, Result, Status, Task, spec_hash
from parity_sandbox._hashing import canonical

MODULE = b"\0asm\x01\0\0\0"


def task(**fields: object) -> Task:
    base: dict[str, object] = {
        "wasm_module": MODULE,
        "args": ("a", "b"),
        "env": {"X": "1", "Y": "2"},
        "stdin": b"input",
        "input_files": {"data/one.txt": b"1", "two.txt": b"2"},
        "limits": {"memory": "64m", "timeout": "30s", "fuel": 1000},
    }
    base.update(fields)
    return Task(**base)


def test_canonical_encoding_is_sorted_and_compact() -> None:
    assert canonical({"b": [1, 2.5], "a": "é"}) == '{"a":"é","b":[1,2.5]}'.encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_spec_hash_is_the_documented_encoding() -> None:
    # The encoding is a contract with other machines: written out here by hand, it must
    # never drift.
    document = (
        '{"args":["a","b"],"deterministic":false,"env":{"X":"1","Y":"2"},'
        f'"input_files":{{"data/one.txt":"{sha(b"1")}","two.txt":"{sha(b"2")}"}},'
        '"kind":"task","limits":{"disk":67108864,"fuel":1000,"memory":67108864,'
        '"output":1048576,"stack_size":1048576,"timeout":30.0},"outputs":["out"],'
        f'"program":{{"module_sha256":"{sha(MODULE)}"}},"runtime":"wasm",'
        f'"stdin_sha256":"{sha(b"input")}","v":1}}'
    )
    assert spec_hash(task()) == sha(document.encode())
    assert spec_hash(task()) == "bdada29d76ca5af19955b74291eb4d19f8a5519dacb86da28714cf94cc132df4"


def test_a_docker_spec_hash_never_drifts() -> None:
    # Docker's own fields and its always-hashed limits, pinned as they were first released.
    docker = Task(
        image="sha256:" + "a" * 64,
        command=["sh", "-c", "echo"],
        user="1000",
        workdir="/work",
        oci_runtime="runsc",
        limits={"open_files": 64, "cpu": 1, "pids": 10},
    )
    assert spec_hash(docker) == "15ba63c0a736c80ef0a42e0b0dd9eaeac3213c349c928f8885ddbec202181080"


def test_spec_hash_is_the_same_in_another_process() -> None:
    code = (
        "from parity_sandbox import Task, spec_hash\n"
        f"print(spec_hash(Task(wasm_module={MODULE!r}, args=('a', 'b'),"
        " env={'Y': '2', 'X': '1'},"
        " stdin=b'input', input_files={'two.txt': b'2', 'data/one.txt': b'1'},"
        " limits={'memory': 67108864, 'timeout': 30, 'fuel': '1000'})))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == spec_hash(task())


def test_equivalent_spellings_and_bookkeeping_do_not_change_it(tmp_path: Path) -> None:
    reference = spec_hash(task())
    module = tmp_path / "m.wasm"
    module.write_bytes(MODULE)
    data = tmp_path / "one.txt"
    data.write_bytes(b"1")
    same = [
        task(limits={"memory": 64 << 20, "timeout": timedelta(seconds=30), "fuel": 1000}),
        task(limits={"memory": "65536k", "timeout": "0.5m", "fuel": "1000"}),
        task(env={"Y": "2", "X": "1"}),
        task(input_files={"two.txt": b"2", "data/one.txt": data}),
        task(wasm_module=None, wasm_file=module),
        task(id="another-id", labels={"team": "x"}),
        task(limits={"memory": "64m", "timeout": "30s", "fuel": 1000, "cpu": 4, "pids": 9}),
        task(cacheable=True),
    ]
    for other in same:
        assert spec_hash(other) == reference


@pytest.mark.parametrize(
    "change",
    [
        {"stdin": b"inpuT"},
        {"wasm_module": MODULE + b"\0"},
        {"args": ("a", "c")},
        {"args": ("a b",)},
        {"env": {"X": "1", "Y": "3"}},
        {"env": {"X": "1"}},
        {"input_files": {"data/one.txt": b"1", "two.txt": b"3"}},
        {"input_files": {"data/uno.txt": b"1", "two.txt": b"2"}},
        {"outputs": ("results",)},
        {"limits": {"memory": "65m", "timeout": "30s", "fuel": 1000}},
        {"limits": {"memory": "64m", "timeout": "31s", "fuel": 1000}},
        {"limits": {"memory": "64m", "timeout": "30s", "fuel": 1001}},
        {"limits": {"memory": "64m", "timeout": "30s", "fuel": 1000, "output": "2m"}},
        {"deterministic": True},
    ],
)
def test_what_determines_the_output_changes_it(change: dict[str, object]) -> None:
    assert spec_hash(task(**change)) != spec_hash(task())


def test_configured_limits_count() -> None:
    plain = Task(wasm_module=MODULE)
    assert spec_hash(plain, Config(memory_limit="128m")) != spec_hash(plain)
    assert spec_hash(plain, Config(wasm={"memory_limit": "256m"})) == spec_hash(plain)


def test_a_docker_task_needs_its_image_id() -> None:
    image_id = "sha256:" + "ab" * 32
    with pytest.raises(InvalidInput, match="image"):
        spec_hash(Task(image="busybox:latest", command=["true"]))
    named = spec_hash(Task(image="busybox:latest", command=["true"]), image_id=image_id)
    assert named == spec_hash(Task(image=image_id, command=["true"]))
    assert named != spec_hash(Task(image=image_id, command=["false"]))
    assert named != spec_hash(Task(image=image_id, command=["true"], user="1000"))
    with pytest.raises(InvalidInput, match="deterministic"):
        Task(image=image_id, deterministic=True)


def result(**fields: object) -> Result:
    base: dict[str, object] = {
        "status": Status.SUCCEEDED,
        "exit_code": 0,
        "stdout": b"out",
        "stderr": b"err",
        "files": {"out/a": b"A"},
    }
    base.update(fields)
    return Result(**base)


def test_result_hash_has_a_fixed_value_and_ignores_bookkeeping() -> None:
    reference = result().result_hash
    document = (
        f'{{"exit_code":0,"files":{{"out/a":{{"sha256":"{sha(b"A")}","size":1}}}},'
        f'"files_truncated":false,"kind":"result","status":"succeeded",'
        f'"stderr_sha256":"{sha(b"err")}","stderr_truncated":false,'
        f'"stdout_sha256":"{sha(b"out")}","stdout_truncated":false,"v":1}}'
    )
    assert reference == sha(document.encode())
    assert result(duration=9.5, task_id="t", labels={"a": "b"}).result_hash == reference
    assert result().to_json_dict()["result_hash"] == reference


@pytest.mark.parametrize(
    "change",
    [
        {"stdout": b"ouT"},
        {"stderr": b""},
        {"exit_code": 1, "status": Status.FAILED},
        {"stdout_truncated": True},
        {"files": {"out/a": b"B"}},
        {"files": {"out/b": b"A"}},
        {"files": {}},
        {"files_truncated": True},
    ],
)
def test_result_hash_follows_the_outcome(change: dict[str, object]) -> None:
    assert result(**change).result_hash != result().result_hash
