"""WASI test suite specs as tasks: programs compiled from ``tests/fixtures/wasm/wasi_*.c``
behave as the suite's tests do, and run beside their specs (``tests/fixtures/wasi-spec``) as
the suite lays them out: ``NAME.wasm``, ``NAME.json`` and the fixture directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import (
    InvalidInput,
    ResourceLimitExceeded,
    Result,
    Status,
    Task,
    WasmExecutor,
)
from parity_sandbox.wasi_spec import read_spec, spec_failures, spec_task

SPECS = Path(__file__).parent / "fixtures" / "wasi-spec"


def lay_out(tmp_path: Path, suite: str, module: Path, name: str | None = None) -> Path:
    """A copy of the suite folder ``suite`` with ``module`` in it as ``NAME.wasm``."""
    directory = tmp_path / suite
    shutil.copytree(SPECS / suite, directory)
    target = directory / f"{name or module.stem}.wasm"
    shutil.copyfile(module, target)
    return target


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_a_root_spec_gets_a_writable_copy_of_its_fixture_at_root(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    """As the suite's current tests do, the program makes, renames and removes scratch files
    in its root and changes the fixture; the host's fixture stays as it was, the next run sees
    it unchanged, and no path or link the task makes leads out of the tree."""
    module = lay_out(tmp_path, "root", wasm.wasi_root_rw)
    spec = read_spec(module)
    task = spec_task(spec, module)
    assert task.mounts == {"/": "fs-tests.dir:rw"}
    assert set(task.input_files) == {"fs-tests.dir/a.txt", "fs-tests.dir/sub/b.txt"}
    for _ in range(2):  # the second run sees "alpha" again: the change stayed in its copy
        result = executor.execute(task)
        assert spec_failures(spec, result) == [], result.stderr
        assert result.files == {"out/seen.txt": b"seen\n"}
    assert tree(module.parent / "fs-tests.dir") == tree(SPECS / "root" / "fs-tests.dir")


def test_a_writable_root_counts_against_the_disk_cap(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    """Files a task writes into its copy of the tree count with its workspace: eight files of
    256 KiB (none over the file size cap) pass a 1 MiB disk cap."""
    module = lay_out(tmp_path, "root", wasm.wasi_root_rw)
    files = spec_task(read_spec(module), module).input_files
    mounts = {"/": "fs-tests.dir:rw"}

    def fill(count: int, **limits: str) -> Result:
        return executor.execute(
            Task(
                wasm_file=module,
                args=("fill", str(count)),
                input_files=files,
                mounts=mounts,
                limits=limits,
            )
        )

    within = fill(2, disk="1m")
    assert within.status is Status.SUCCEEDED and within.stdout == b"filled 2\n", within
    with pytest.raises(ResourceLimitExceeded) as caught:
        fill(8, disk="1m")
    assert caught.value.limit == "disk" and "2113536 bytes" in str(caught.value)


def test_a_dirs_spec_gets_a_writable_copy_under_its_relative_name(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    """The test creates, reads and removes a file and a folder in ``fs-tests.dir``; the copy
    changes, the fixture on the host does not."""
    module = lay_out(tmp_path, "dirs", wasm.wasi_dirs)
    spec = read_spec(module)
    task = spec_task(spec, module, outputs=("fs-tests.dir",))
    assert task.mounts == {"/work/fs-tests.dir": "fs-tests.dir"}
    result = executor.execute(task)
    assert spec_failures(spec, result) == [], result.stderr
    assert result.files == {"fs-tests.dir/file": b"fixture\n"}  # "created" was removed
    assert tree(module.parent / "fs-tests.dir") == {"file": b"fixture\n"}


def test_args_env_exit_code_stdout_and_stderr_are_checked(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    module = lay_out(tmp_path, "plain", wasm.wasi_args_env)
    spec = read_spec(module)
    task = spec_task(spec, module)
    assert task.args == ("one", "two words") and task.env == {
        "GREETING": "hello there",
        "EXIT_WITH": "7",
    }
    result = executor.execute(task)
    assert result.status is Status.FAILED and result.exit_code == 7  # as the spec expects
    assert spec_failures(spec, result) == [], result
    # each expectation can fail on its own
    assert spec_failures({**spec, "exit_code": 0}, result) == ["exit code 7, expected 0"]
    (stderr,) = spec_failures({**spec, "stderr": "noise"}, result)
    assert stderr.startswith("stderr b''")
    assert spec_failures({k: v for k, v in spec.items() if k != "exit_code"}, result) == [
        "exit code 7, expected 0"
    ]


def test_a_spec_whose_stdout_differs_fails(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    module = lay_out(tmp_path, "plain", wasm.wasi_args_env, "wasi_args_env_wrong")
    spec = read_spec(module)
    result = executor.execute(spec_task(spec, module))
    (failure,) = spec_failures(spec, result)
    assert failure.startswith("stdout b'arg 1: one") and "GREETING=goodbye" in failure


def test_a_module_without_a_spec_runs_with_the_default_one(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    module = tmp_path / "hello.wasm"
    shutil.copyfile(wasm.hello, module)
    spec = read_spec(module)
    assert spec == {}
    task = spec_task(spec, module)
    assert task.args == () and task.env == {} and task.mounts == {}
    result = executor.execute(task)
    assert spec_failures(spec, result) == []
    assert spec_failures({"stdout": ""}, result) != []  # hello prints


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"preopens": ["x"]}, "spec.preopens"),
        ({"args": "one"}, "spec.args"),
        ({"exit_code": "0"}, "spec.exit_code"),
        ({"exit_code": True}, "spec.exit_code"),
        ({"env": {"A": 1}}, "spec"),
        ({"root": "../elsewhere"}, "spec.root"),
        ({"root": "/etc"}, "spec.root"),
        ({"root": "missing.dir"}, "spec.root"),
        ({"dirs": ["link.dir"]}, "spec.dirs"),  # a symbolic link to a directory
        ({"dirs": ["with-link.dir"]}, "spec.dirs"),  # a symbolic link inside
        ({"dirs": ["empty.dir"]}, "spec.dirs"),
        ({"root": "fs-tests.dir", "dirs": ["fs-tests.dir"]}, "spec.dirs"),
    ],
)
def test_what_a_task_cannot_express_is_refused(
    wasm: WasmFixtures, tmp_path: Path, spec: dict[str, object], field: str
) -> None:
    module = lay_out(tmp_path, "root", wasm.wasi_root)
    fixture = module.parent / "fs-tests.dir"
    (module.parent / "empty.dir").mkdir()
    os.symlink(fixture, module.parent / "link.dir")
    shutil.copytree(fixture, module.parent / "with-link.dir")
    os.symlink("/etc/passwd", module.parent / "with-link.dir" / "passwd")
    with pytest.raises(InvalidInput) as caught:
        spec_task(spec, module)
    assert caught.value.field == field, caught.value.message


def test_a_spec_file_that_is_not_a_spec_is_refused(wasm: WasmFixtures, tmp_path: Path) -> None:
    module = lay_out(tmp_path, "plain", wasm.wasi_args_env)
    module.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(InvalidInput) as caught:
        read_spec(module)
    assert caught.value.field == "spec"
    module.with_suffix(".json").write_text("{")
    with pytest.raises(InvalidInput, match="not JSON"):
        read_spec(module)
