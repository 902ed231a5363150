"""Ordinary programs run unchanged: relative paths, output folders that exist, WASI reactors.

The modules are compiled from ``tests/fixtures/wasm/*.c`` (``relpath``: a command that writes
by relative path; ``reactor``: a reactor built with ``-mexec-model=reactor``, as the
``itkwasm-*-wasi`` modules are).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import TEST_IMAGE, WasmFixtures
from parity_sandbox import DockerExecutor, InvalidInput, Status, Task, WasmExecutor
from parity_sandbox._executor import spec_hash


def test_relative_paths_resolve_in_the_workspace(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    """``data.txt`` and ``out/result.txt``, written with no mkdir, come back; and the first is
    the same file as ``/work/data.txt``."""
    result = executor.execute(Task(wasm_file=wasm.relpath, outputs=("data.txt", "out")))
    assert result.ok, result.stderr
    assert result.stdout == b"relative\n"
    assert result.files == {"data.txt": b"relative\n", "out/result.txt": b"in out\n"}


def test_the_working_directory_may_be_a_folder_of_the_workspace(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    task = Task(
        wasm_file=wasm.relpath,
        workdir="/work/job",
        outputs=("job/data.txt", "job/out/result.txt"),
    )
    result = executor.execute(task)
    # Its relative writes land in /work/job; its read back of /work/data.txt finds nothing.
    assert result.exit_code == 3 and b"/work/data.txt" in result.stderr, result
    assert result.files == {"job/data.txt": b"relative\n", "job/out/result.txt": b"in out\n"}
    with pytest.raises(InvalidInput) as caught:
        Task(wasm_file=wasm.relpath, workdir="/input")
    assert "under /work" in caught.value.message


def test_output_folders_left_empty_are_no_output(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    result = executor.execute(Task(wasm_file=wasm.hello, outputs=("out", "results/a.txt")))
    assert result.ok and result.files == {}


def test_a_reactor_runs_through_its_entry_point(executor: WasmExecutor, wasm: WasmFixtures) -> None:
    """``_initialize`` first (its constructors ran: 42), then the entry point; its result
    (7) goes to the finaliser, which exits 0 for it."""
    task = Task(
        wasm_file=wasm.reactor,
        entry="delayed_start",
        entry_exit="delayed_exit",
        outputs=("data.txt", "out"),
    )
    result = executor.execute(task)
    assert result.ok, result
    assert result.stdout == b"started after _initialize: 42\nfinishing with 7\n"
    assert result.files == {"data.txt": b"initialized 42\n", "out/result.txt": b"done\n"}
    # without the finaliser, the entry point's result is the exit code
    alone = executor.execute(Task(wasm_file=wasm.reactor, entry="delayed_start"))
    assert alone.status is Status.FAILED and alone.exit_code == 7


def test_what_a_module_cannot_run_is_refused_naming_its_exports(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    with pytest.raises(InvalidInput) as caught:
        executor.execute(Task(wasm_file=wasm.reactor))  # a reactor has no _start
    assert "_start" in caught.value.message and "Task.entry" in caught.value.message
    with pytest.raises(InvalidInput) as caught:
        executor.execute(Task(wasm_file=wasm.reactor, entry="nope"))
    assert "'nope'" in caught.value.message and "delayed_start" in caught.value.message
    for fields in [
        {"entry": "has space"},
        {"entry": "1starts_with_digit"},
        {"entry": "x" * 300},
        {"entry_exit": "delayed_exit"},  # a finaliser without an entry point
    ]:
        with pytest.raises(InvalidInput):
            Task(wasm_file=wasm.reactor, **fields)
    with pytest.raises(InvalidInput):
        Task(image=TEST_IMAGE, entry="run")


def test_entry_points_are_part_of_the_spec_hash(wasm: WasmFixtures) -> None:
    plain = spec_hash(Task(wasm_file=wasm.reactor))
    entry = spec_hash(Task(wasm_file=wasm.reactor, entry="delayed_start"))
    both = spec_hash(Task(wasm_file=wasm.reactor, entry="delayed_start", entry_exit="delayed_exit"))
    assert len({plain, entry, both}) == 3


def test_the_cli_invokes_an_entry_point(wasm: WasmFixtures) -> None:
    cli = [sys.executable, "-m", "parity_sandbox.cli", "run"]
    done = subprocess.run(
        [*cli, "--invoke", "delayed_start", "--invoke-exit", "delayed_exit", str(wasm.reactor)],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"started after _initialize: 42\nfinishing with 7\n"


def test_a_docker_task_finds_its_output_folders_made(docker_executor: DockerExecutor) -> None:
    script = "echo made > out/a.txt && echo nested > results/b.txt && echo here > data.txt"
    task = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", script],
        outputs=("out", "results/b.txt", "data.txt"),
    )
    result = docker_executor.execute(task)
    assert result.ok, result.stderr
    assert result.files == {
        "out/a.txt": b"made\n",
        "results/b.txt": b"nested\n",
        "data.txt": b"here\n",
    }
    empty = docker_executor.execute(Task(image=TEST_IMAGE, command=["true"]))
    assert empty.ok and empty.files == {}


def test_a_missing_required_output_fails_the_task_whatever_its_exit_code(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    missing = executor.execute(Task(wasm_file=wasm.hello, required_outputs=("out/result.txt",)))
    assert missing.status is Status.FAILED and missing.exit_code == 0
    assert missing.error is not None and missing.error.type == "MissingOutput"
    assert "out/result.txt" in missing.error.message
    written = executor.execute(
        Task(wasm_file=wasm.write_outputs, required_outputs=("out/result.txt", "out/sub"))
    )
    assert written.ok and written.error is None, written
    with pytest.raises(InvalidInput) as caught:
        Task(wasm_file=wasm.hello, outputs=("out",), required_outputs=("elsewhere.txt",))
    assert "under none of outputs" in caught.value.message
    with pytest.raises(InvalidInput):
        Task(wasm_file=wasm.hello, required_outputs=("out/../../etc/passwd",))
    hashes = {
        spec_hash(Task(wasm_file=wasm.hello)),
        spec_hash(Task(wasm_file=wasm.hello, required_outputs=("out/result.txt",))),
    }
    assert len(hashes) == 2


def test_a_docker_task_s_required_output_is_checked_too(docker_executor: DockerExecutor) -> None:
    task = Task(image=TEST_IMAGE, command=["true"], required_outputs=("out/report.json",))
    result = docker_executor.execute(task)
    assert result.status is Status.FAILED and result.exit_code == 0
    assert result.error is not None and result.error.type == "MissingOutput"


FIXTURE = {"fixture/a.txt": b"A", "fixture/sub/b.txt": b"B", "plain.txt": b"P"}


def test_an_input_tree_is_mounted_read_only_where_the_task_says(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    def read(path: str) -> tuple[int | None, bytes, bytes]:
        task = Task(
            wasm_file=wasm.readpath, args=(path,), input_files=FIXTURE, mounts={"/data": "fixture"}
        )
        result = executor.execute(task)
        return result.exit_code, result.stdout, result.stderr

    assert read("/data/a.txt") == (0, b"A", b"write denied\n")
    assert read("/data/sub/b.txt") == (0, b"B", b"write denied\n")
    assert read("/input/plain.txt")[:2] == (0, b"P")
    assert read("/input/fixture/a.txt")[0] == 2  # mounted at /data, not under /input
    with_mount = spec_hash(
        Task(wasm_file=wasm.readpath, input_files=FIXTURE, mounts={"/d": "fixture"})
    )
    without = spec_hash(Task(wasm_file=wasm.readpath, input_files=FIXTURE))
    assert with_mount != without


@pytest.mark.parametrize(
    "mounts",
    [
        {"/": "nothing-there"},
        {"/work": "fixture"},
        {"/input/x": "fixture"},
        {"/etc/data": "fixture"},
        {"/data/../etc": "fixture"},
        {"data": "fixture"},
        {"/data": "nothing-there"},
        {"/data": "fixture", "/data/more": "fixture/sub"},
        {"/a": "fixture", "/b": "fixture/sub"},  # one folder inside another
        {"/a": "fixture:rw", "/b": "fixture:ro"},  # the same folder, whatever its modes
        {"/data": "fixture:wr"},  # no such folder: a mode is :ro or :rw
        {"/data": ":rw"},
        {"/work/fixture": "fixture:ro"},  # a tree under /work is always a writable copy
    ],
)
def test_a_bad_mount_is_refused(wasm: WasmFixtures, mounts: dict[str, str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        Task(wasm_file=wasm.readpath, input_files=FIXTURE, mounts=mounts)
    assert caught.value.field == "mounts"


def test_a_tree_mounted_at_root_is_the_guest_s_root_and_working_directory(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    """``/a.txt`` and ``a.txt`` are the tree's, read-only; ``/data`` and ``/input`` keep their
    own trees over it and ``/work`` stays the workspace."""
    files = {**FIXTURE, "other/c.txt": b"C", "fixture/data/hidden.txt": b"H"}
    mounts = {"/": "fixture", "/data": "other"}

    def read(path: str) -> tuple[int | None, bytes, bytes]:
        task = Task(wasm_file=wasm.readpath, args=(path,), input_files=files, mounts=mounts)
        result = executor.execute(task)
        return result.exit_code, result.stdout, result.stderr

    assert read("/a.txt") == (0, b"A", b"write denied\n")
    assert read("a.txt") == (0, b"A", b"write denied\n")
    assert read("sub/b.txt") == (0, b"B", b"write denied\n")
    assert read("/data/c.txt") == (0, b"C", b"write denied\n")
    assert read("/data/hidden.txt")[0] == 2  # /data is the other tree, not the root's folder
    assert read("/input/plain.txt") == (0, b"P", b"write denied\n")
    assert read("/../../etc/passwd")[0] == 2
    # Relative writes land in the read-only tree and fail; the workspace is /work.
    relative = executor.execute(Task(wasm_file=wasm.relpath, input_files=files, mounts=mounts))
    assert relative.exit_code == 1 and relative.stderr.startswith(b"data.txt: "), relative
    # without a tree at /, an absolute path resolves in the working directory (wasi-libc
    # matches "." to every path): /a.txt is not there
    alone = executor.execute(Task(wasm_file=wasm.readpath, args=("/a.txt",), input_files=FIXTURE))
    assert alone.exit_code == 2 and b"No such file" in alone.stderr, alone


def test_a_tree_at_root_stays_read_only_and_closed(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    """Every change to the tree is refused (EPERM) and no path leads out of it; the program
    still writes its outputs under /work/out."""
    task = Task(
        wasm_file=wasm.wasi_root,
        input_files={"t/a.txt": b"alpha\n", "t/sub/b.txt": b"beta\n"},
        mounts={"/": "t"},
    )
    result = executor.execute(task)
    assert result.ok, result.stderr
    assert result.stdout.endswith(b"fd 3: /\nread-only, no way out\nworkspace at /work\n")
    assert result.stderr.count(b"refused (errno 63: Operation not permitted)") == 8
    assert result.files == {"out/seen.txt": b"seen\n"}


def test_a_tree_at_root_takes_no_workdir_and_its_caps_apply(wasm: WasmFixtures) -> None:
    with pytest.raises(InvalidInput) as caught:
        Task(
            wasm_file=wasm.readpath,
            workdir="/work/job",
            input_files=FIXTURE,
            mounts={"/": "fixture"},
        )
    assert caught.value.field == "mounts" and "workdir" in caught.value.message
    assert Task(
        wasm_file=wasm.readpath, workdir="/work", input_files=FIXTURE, mounts={"/": "fixture"}
    )
    many = {f"fixture/{n}.txt": b"" for n in range(1001)}
    with pytest.raises(InvalidInput) as caught:
        Task(wasm_file=wasm.readpath, input_files=many, mounts={"/": "fixture"})
    assert caught.value.field == "input_files"
    rooted = spec_hash(Task(wasm_file=wasm.readpath, input_files=FIXTURE, mounts={"/": "fixture"}))
    assert rooted != spec_hash(
        Task(wasm_file=wasm.readpath, input_files=FIXTURE, mounts={"/d": "fixture"})
    )


@pytest.mark.docker
def test_a_docker_task_cannot_mount_a_tree_at_root(docker_executor: DockerExecutor) -> None:
    task = Task(image=TEST_IMAGE, command=["true"], input_files=FIXTURE, mounts={"/": "fixture"})
    with pytest.raises(InvalidInput) as caught:
        docker_executor.execute(task)
    assert caught.value.field == "mounts" and "its image" in caught.value.message


def test_a_docker_task_sees_its_mounted_tree_read_only(docker_executor: DockerExecutor) -> None:
    script = (
        "cat /data/a.txt /data/sub/b.txt /input/plain.txt; echo; "
        "test -e /input/fixture && echo visible-under-input; "
        "echo x >> /data/a.txt 2>/dev/null && echo write-ok || echo write-denied"
    )
    task = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", script],
        input_files=FIXTURE,
        mounts={"/data": "fixture"},
    )
    result = docker_executor.execute(task)
    assert result.ok, result.stderr
    assert result.stdout == b"ABP\nwrite-denied\n"


def test_a_tree_under_work_is_a_writable_copy(
    executor: WasmExecutor, docker_executor: DockerExecutor, wasm: WasmFixtures
) -> None:
    wasm_task = Task(
        wasm_file=wasm.readpath,
        args=("/work/fixture/a.txt",),
        input_files=FIXTURE,
        mounts={"/work/fixture": "fixture"},
        outputs=("fixture",),
    )
    result = executor.execute(wasm_task)
    assert result.stdout == b"A" and result.stderr == b"write ok\n", result
    assert result.files == {"fixture/a.txt": b"A", "fixture/sub/b.txt": b"B"}
    script = "echo more >> /work/fixture/a.txt && cat /work/fixture/a.txt"
    docker_task = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", script],
        input_files=FIXTURE,
        mounts={"/work/fixture": "fixture"},
        outputs=("fixture",),
    )
    done = docker_executor.execute(docker_task)
    assert done.ok and done.stdout == b"Amore\n", done
    assert done.files["fixture/a.txt"] == b"Amore\n"


def test_a_mount_s_mode_has_one_spelling_for_the_spec_hash(wasm: WasmFixtures) -> None:
    def task(mounts: dict[str, str]) -> Task:
        return Task(wasm_file=wasm.readpath, input_files=FIXTURE, mounts=mounts)

    assert task({"/data": "fixture:ro"}).mounts == {"/data": "fixture"}
    assert task({"/work/fix": "fixture:rw"}).mounts == {"/work/fix": "fixture"}
    assert task({"/data": "fixture:rw"}).mounts == {"/data": "fixture:rw"}
    assert spec_hash(task({"/data": "fixture:ro"})) == spec_hash(task({"/data": "fixture"}))
    assert spec_hash(task({"/data": "fixture:rw"})) != spec_hash(task({"/data": "fixture"}))


@pytest.mark.docker
def test_a_writable_tree_is_the_task_s_own_copy(
    executor: WasmExecutor, docker_executor: DockerExecutor, wasm: WasmFixtures
) -> None:
    """``:rw`` at /data: the task changes its copy (both runtimes); the next task sees the
    tree as given."""
    wasm_task = Task(
        wasm_file=wasm.readpath,
        args=("/data/a.txt",),
        input_files=FIXTURE,
        mounts={"/data": "fixture:rw"},
    )
    for _ in range(2):
        result = executor.execute(wasm_task)
        assert result.stdout == b"A" and result.stderr == b"write ok\n", result
    script = (
        "cat /data/a.txt; echo more >> /data/a.txt && cat /data/a.txt && mkdir /data/new "
        "&& touch /data/new/f && rm /data/sub/b.txt && ls -R /data | tr '\\n' ' '"
    )
    docker_task = Task(
        image=TEST_IMAGE,
        command=["sh", "-c", script],
        input_files=FIXTURE,
        mounts={"/data": "fixture:rw"},
    )
    for _ in range(2):
        done = docker_executor.execute(docker_task)
        assert done.ok, done.stderr
        assert done.stdout.startswith(b"AAmore\n/data: a.txt new sub"), done.stdout
