"""The CLI over the Docker runtime: run, reap, image import and doctor, as a user runs them."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from conftest import TEST_IMAGE
from parity_sandbox import DockerExecutor
from test_cli import assert_one_line, run_cli

pytestmark = pytest.mark.docker


def test_run_an_image(docker_executor: DockerExecutor, oci_runtime: str) -> None:
    done = run_cli(
        "run",
        "--image",
        TEST_IMAGE,
        "--oci-runtime",
        oci_runtime,
        "--memory",
        "64m",
        "--",
        "sh",
        "-c",
        "cat; echo err >&2; exit 4",
        stdin=b"in\n",
    )
    assert (done.returncode, done.stdout, done.stderr) == (4, b"", b"err\n")
    done = run_cli("run", "--image", TEST_IMAGE, "--stdin", "-", "--", "cat", stdin=b"in\n")
    assert (done.returncode, done.stdout) == (0, b"in\n")


def test_json_result_has_the_wasm_shape(docker_executor: DockerExecutor) -> None:
    done = run_cli("run", "--image", TEST_IMAGE, "--json", "--", "echo", "hi")
    document = json.loads(done.stdout)
    assert done.returncode == 0
    assert document["status"] == "succeeded" and document["stdout"] == "hi\n"
    assert document["runtime"]["name"] == "docker"
    assert document["runtime"]["image_id"].startswith("sha256:")
    assert set(document) >= {"exit_code", "stderr", "usage", "duration_s", "files", "error"}


def test_exit_codes_of_limits(docker_executor: DockerExecutor, tmp_path: Path) -> None:
    done = run_cli("run", "--image", TEST_IMAGE, "--timeout", "1s", "--", "sleep", "30")
    assert done.returncode == 124
    assert_one_line(done.stderr, "ExecutionTimeout")
    done = run_cli("run", "--image", TEST_IMAGE, "--memory", "32m", "--", "probe", "memory")
    assert done.returncode == 123
    assert_one_line(done.stderr, "memory")
    out = tmp_path / "out"
    done = run_cli(
        "run",
        "--image",
        TEST_IMAGE,
        "--output-dir",
        str(out),
        "--",
        "sh",
        "-c",
        "mkdir -p out && echo r > out/r.txt && ln -s /etc/passwd out/p",
    )
    assert done.returncode == 0
    assert [p.name for p in (out / "out").iterdir()] == ["r.txt"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image", "-v/:/host", "--", "true"], "image"),
        (["--image", "Busybox;id", "--", "true"], "image"),
        (["--runtime", "docker", "--", "true"], "--image"),
        (["--image", TEST_IMAGE, "--user", "root", "--", "true"], "user"),
        (["--image", TEST_IMAGE, "--user", "0", "--", "true"], "root"),
        (["--image", TEST_IMAGE, "--memory", "0", "--", "true"], "memory"),
        (["--image", TEST_IMAGE, "--memory", "2m", "--", "true"], "6 MiB"),
        (["--image", TEST_IMAGE, "--cpus", "999", "--", "true"], "limits.cpu"),
        (["--image", TEST_IMAGE, "--pids", "0", "--", "true"], "pids"),
        (["--image", TEST_IMAGE, "--gpus", "-1", "--", "true"], "gpus"),
        (["--image", TEST_IMAGE, "--input", "../x=/etc/hostname", "--", "true"], "input"),
        (["--image", TEST_IMAGE, "--input", "z=/dev/zero", "--", "true"], "regular file"),
        (["--image", TEST_IMAGE, "--docker-runtime", "crun", "--", "true"], "oci_runtime"),
        (["--image", TEST_IMAGE, "--env", "HOME", "--", "true"], "--env"),
    ],
)
def test_bad_input_exits_65(docker_executor: DockerExecutor, args: list[str], needle: str) -> None:
    done = run_cli("run", *args)
    assert done.returncode == 65, done.stderr
    assert_one_line(done.stderr, needle)


def test_privileged_config_is_refused(docker_executor: DockerExecutor, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("sandbox:\n  docker: {privileged: true}\n")
    done = run_cli("run", "--config", str(config), "--image", TEST_IMAGE, "--", "true")
    assert done.returncode == 65
    assert_one_line(done.stderr, "privileged")


def test_missing_image_exits_125(docker_executor: DockerExecutor) -> None:
    done = run_cli("run", "--image", "parity-sandbox-test/absent:1", "--", "true")
    assert done.returncode == 125
    assert_one_line(done.stderr, "image import")


def test_image_import_then_run(docker_executor: DockerExecutor, tmp_path: Path) -> None:
    busybox = Path("/bin/busybox").read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        entry = tarfile.TarInfo("bin/busybox")
        entry.mode, entry.size = 0o755, len(busybox)
        archive.addfile(entry, io.BytesIO(busybox))
        link = tarfile.TarInfo("bin/echo")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        archive.addfile(link)
    rootfs = tmp_path / "rootfs.tar"
    rootfs.write_bytes(buffer.getvalue())
    name = f"parity-sandbox-test/imported-{uuid.uuid4().hex[:8]}:1"
    try:
        done = run_cli("image", "import", str(rootfs), name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().split()[1].startswith("sha256:")
        done = run_cli("run", "--image", name, "--", "echo", "imported")
        assert (done.returncode, done.stdout) == (0, b"imported\n")
    finally:
        docker_executor._api.remove_image(name, force=True)
    done = run_cli("image", "import", str(tmp_path / "missing.tar"), "x:1")
    assert done.returncode == 65


def test_reap_and_doctor(docker_executor: DockerExecutor) -> None:
    done = run_cli("reap")
    assert done.returncode == 0 and b"removed" in done.stdout
    done = run_cli("doctor")
    text = done.stdout.decode()
    assert "docker" in text and "runsc: yes" in text and "GPU:" in text


def test_save_and_verify_a_docker_run(docker_executor: DockerExecutor, tmp_path: Path) -> None:
    record = tmp_path / "run.json"
    done = run_cli("run", "--save", str(record), "--image", TEST_IMAGE, "--", "echo", "same")
    assert done.returncode == 0
    saved = json.loads(record.read_text())
    assert saved["task"]["image"].startswith("sha256:")  # pinned by id, never a tag
    done = run_cli("verify", str(record))
    assert done.returncode == 0 and done.stdout.startswith(b"match ")


def test_a_program_that_never_started_exits_122(docker_executor: DockerExecutor) -> None:
    done = run_cli("run", "--image", TEST_IMAGE, "--", "no-such-program")
    assert done.returncode == 122
    assert b"LaunchFailed" in done.stderr and b"no-such-program" in done.stderr
    done = run_cli("run", "--image", TEST_IMAGE, "--json", "--", "no-such-program")
    document = json.loads(done.stdout)
    assert done.returncode == 122
    assert document["status"] == "launch_failed" and document["exit_code"] is None
    assert document["error"]["type"] == "LaunchFailed"
    # a program that exits 127 itself passes its code through
    done = run_cli("run", "--image", TEST_IMAGE, "--", "sh", "-c", "exit 127")
    assert done.returncode == 127
