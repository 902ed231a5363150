"""What a guest can reach: only /work, /input and what it was given; outputs collected safely."""

from __future__ import annotations

from pathlib import Path

from conftest import WasmFixtures
from parity_sandbox import Limits, Task, WasmExecutor


def test_the_guest_cannot_leave_work_and_input(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    """Every way out is denied. The workspace is also the guest's working directory (``.``),
    which wasi-libc takes as its root too: ``mkdir("/newdir")`` and ``opendir("/")`` act in
    the workspace, nowhere else."""
    result = executor.execute(Task(wasm_file=wasm.fs_escape, input_files={"data.txt": b"data"}))
    assert result.ok
    lines = dict(line.split() for line in result.stdout.decode().splitlines())
    in_workspace = {"mkdir_root", "list_root"}
    attempts = {
        name: verdict
        for name, verdict in lines.items()
        if not name.endswith("_create") and name not in in_workspace
    }
    assert len(attempts) >= 7
    assert set(attempts.values()) == {"denied"}, result.stderr.decode()
    listed = {
        line.rsplit(" ", 1)[1]
        for line in result.stderr.decode().splitlines()
        if line.startswith("list_root: entry ")
    }
    # what the guest made itself, and the empty out/ made for it: nothing of the host's
    assert listed <= {".", "..", "out", "newdir", "uplink"}, listed


def test_inputs_are_readable_and_read_only(
    executor: WasmExecutor, wasm: WasmFixtures, tmp_path: Path
) -> None:
    host = tmp_path / "notes.txt"
    host.write_bytes(b"from the host\n")
    result = executor.execute(
        Task(wasm_file=wasm.read_input, args=("a.txt",), input_files={"a.txt": host})
    )
    assert result.stdout == b"from the host\n"
    assert b"write denied" in result.stderr
    assert host.read_bytes() == b"from the host\n"
    nested = executor.execute(
        Task(wasm_file=wasm.read_input, args=("d/b.bin",), input_files={"d/b.bin": b"\0\1"})
    )
    assert nested.stdout == b"\0\1"


def test_outputs_are_collected_without_following_guest_symlinks(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    result = executor.execute(Task(wasm_file=wasm.write_outputs))
    assert result.ok, result.stderr
    assert result.files == {"out/result.txt": b"result 42\n", "out/sub/nested.txt": b"nested\n"}
    assert not result.files_truncated


def test_declared_output_paths(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    result = executor.execute(
        Task(wasm_file=wasm.write_outputs, outputs=("out/result.txt", "out/evil", "missing"))
    )
    assert result.files == {"out/result.txt": b"result 42\n"}


def test_a_deep_wide_tree_is_collected_within_caps_and_removed(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    result = executor.execute(
        Task(wasm_file=wasm.deep_tree, args=("1500", "20000"), limits=Limits(timeout=60))
    )
    assert result.ok, result.stderr
    assert result.files_truncated
    assert len(result.files) == 1000
    assert all(name.count("/") <= 33 for name in result.files)
    # The next task starts in an empty workspace.
    listing = executor.execute(Task(wasm_file=wasm.write_outputs))
    assert set(listing.files) == {"out/result.txt", "out/sub/nested.txt"}


def test_nothing_passes_between_tasks(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    executor.execute(Task(wasm_file=wasm.write_outputs))
    result = executor.execute(Task(wasm_file=wasm.hello, outputs=("out",)))
    assert result.files == {}
