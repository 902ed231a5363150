"""A prepared task runs exactly the bytes its spec hash names, whatever happens to the host's
files (or an image's tag) between its preparation and its run."""

from __future__ import annotations

import contextlib
import io
import tarfile
import uuid
from pathlib import Path

import docker.errors
import pytest

from conftest import WasmFixtures
from parity_sandbox import (
    Config,
    DockerExecutor,
    InvalidInput,
    PreparedTask,
    Task,
    WasmExecutor,
    spec_hash,
)
from parity_sandbox.runtimes.docker import init


def test_a_prepared_wasm_task_runs_what_its_spec_hash_names(
    wasm: WasmFixtures, cache_dir: Path, tmp_path: Path
) -> None:
    data, module = tmp_path / "data.txt", tmp_path / "task.wasm"
    data.write_bytes(b"first")
    original = wasm.read_input.read_bytes()
    module.write_bytes(original)
    task = Task(
        wasm_file=module, args=("data.txt",), input_files={"data.txt": data}, cacheable=True
    )
    config = Config(cache_dir=cache_dir, cache={"enabled": False})
    with WasmExecutor(config, workers=1) as executor:
        prepared = executor.prepare(task)
        assert isinstance(prepared, PreparedTask)
        data.write_bytes(b"second")  # the host's files change after the preparation
        module.write_bytes(wasm.hello.read_bytes())
        result = executor.execute(prepared)
        again = executor.execute(prepared)  # a prepared task may run more than once
    assert result.stdout == again.stdout == b"first"
    as_prepared = Task(
        wasm_module=original, args=("data.txt",), input_files={"data.txt": b"first"}, cacheable=True
    )
    assert result.spec_hash == prepared.spec_hash == spec_hash(as_prepared, config)
    assert result.runtime is not None and result.runtime.module_sha256 == prepared.program
    # the plain task now names other bytes, and its hash says so
    with WasmExecutor(config, workers=1) as executor:
        assert executor.spec_hash(task) != prepared.spec_hash
        assert executor.execute(task).stdout == b"hello\n"


def test_a_task_prepared_for_one_runtime_is_refused_by_another(
    wasm: WasmFixtures, cache_dir: Path
) -> None:
    config = Config(cache_dir=cache_dir, cache={"enabled": False})
    with WasmExecutor(config, workers=1) as executor:
        prepared = executor.prepare(Task(wasm_file=wasm.hello))
    foreign = PreparedTask(
        prepared.task, "docker", prepared.limits, prepared.program, prepared.inputs
    )
    with WasmExecutor(config, workers=1) as executor, pytest.raises(InvalidInput, match="prepare"):
        executor.execute(foreign)


def rootfs(marker: bytes) -> bytes:
    """busybox and a /marker file: two images that differ only in it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data, mode in (
            ("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755),
            ("marker", marker, 0o644),
        ):
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), mode
            archive.addfile(entry, io.BytesIO(data))
        link = tarfile.TarInfo("bin/cat")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        archive.addfile(link)
    return buffer.getvalue()


@pytest.mark.docker
def test_a_prepared_docker_task_runs_the_image_it_was_prepared_with(
    docker_executor: DockerExecutor, tmp_path: Path
) -> None:
    tag = f"parity-sandbox-test/retag-{uuid.uuid4().hex[:8]}:1"
    data = tmp_path / "data.txt"
    data.write_bytes(b"first input")
    archives = {}
    for marker in ("A", "B"):
        archives[marker] = tmp_path / f"{marker}.tar"
        archives[marker].write_bytes(rootfs(marker.encode()))
    command = ["cat", "/marker", "/input/data.txt"]
    made = [docker_executor.import_image(archives["A"], tag)]
    try:
        task = Task(image=tag, command=command, input_files={"data.txt": data}, cacheable=True)
        prepared = docker_executor.prepare(task)
        made.append(docker_executor.import_image(archives["B"], tag))  # the tag moves on
        data.write_bytes(b"second input")  # and the input file changes
        assert made[0] != made[1]
        result = docker_executor.execute(prepared)
        assert result.stdout == b"Afirst input"
        assert result.runtime is not None
        assert result.runtime.image_id == made[0] == prepared.program
        as_prepared = Task(
            image=made[0], command=command, input_files={"data.txt": b"first input"}, cacheable=True
        )
        config = docker_executor.config
        assert result.spec_hash == prepared.spec_hash == spec_hash(as_prepared, config)
        assert docker_executor.execute(task).stdout == b"Bsecond input"  # the tag, now
    finally:
        assert docker_executor.drain(150)  # the containers that use the images are gone
        for image in made:
            with contextlib.suppress(docker.errors.NotFound):
                docker_executor._api.remove_image(init.derived_tag(image), force=True)
            with contextlib.suppress(docker.errors.NotFound):  # pruned with its child
                docker_executor._api.remove_image(image, force=True)
