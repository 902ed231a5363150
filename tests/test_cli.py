"""The CLI, run as a user runs it: a real process, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WasmFixtures

CLI = [sys.executable, "-m", "parity_sandbox.cli"]


def run_cli(
    *args: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    cache: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    if cache is not None:
        environ["XDG_CACHE_HOME"] = str(cache)
    environ.update(env or {})
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, env=environ, timeout=timeout, check=False
    )


def assert_one_line(stderr: bytes, needle: str) -> None:
    text = stderr.decode()
    assert "Traceback" not in text
    assert needle in text


def test_run_passes_output_and_exit_code_through(wasm: WasmFixtures, cache_dir: Path) -> None:
    done = run_cli("run", str(wasm.exit_code), "--", "7", cache=cache_dir)
    assert done.returncode == 7
    assert done.stderr == b"bye\n"
    done = run_cli("run", str(wasm.args), "--", "-x", "--flag", cache=cache_dir)
    assert done.returncode == 0
    assert done.stdout.splitlines()[2:] == [b"-x", b"--flag"]


def test_stdin_env_inputs_and_output_dir(
    wasm: WasmFixtures, cache_dir: Path, tmp_path: Path
) -> None:
    done = run_cli("run", "--stdin", "-", str(wasm.echo_stdin), stdin=b"piped", cache=cache_dir)
    assert done.stdout == b"piped"
    done = run_cli("run", "--env", "A=1", "--env", "B=two=2", str(wasm.env), cache=cache_dir)
    assert done.stdout.splitlines() == [b"A=1", b"B=two=2", b"count=2"]
    (tmp_path / "in.txt").write_bytes(b"input file\n")
    done = run_cli(
        "run",
        "--input",
        f"x.txt={tmp_path / 'in.txt'}",
        str(wasm.read_input),
        "--",
        "x.txt",
        cache=cache_dir,
    )
    assert done.stdout == b"input file\n"
    out = tmp_path / "results"
    done = run_cli("run", "--output-dir", str(out), str(wasm.write_outputs), cache=cache_dir)
    assert done.returncode == 0
    assert (out / "out" / "result.txt").read_bytes() == b"result 42\n"
    assert sorted(p.name for p in (out / "out").iterdir()) == ["result.txt", "sub"]
    # Again into the same place: nothing is overwritten, the output still shows, exit 65.
    done = run_cli("run", "--output-dir", str(out), str(wasm.write_outputs), cache=cache_dir)
    assert done.returncode == 65
    assert done.stdout == b"written\n"
    assert_one_line(done.stderr, "never overwritten")
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    done = run_cli("run", "--output-dir", str(blocked), str(wasm.write_outputs), cache=cache_dir)
    assert done.returncode == 65
    assert_one_line(done.stderr, "--output-dir")


def test_json_result(wasm: WasmFixtures, cache_dir: Path) -> None:
    done = run_cli(
        "run", "--json", "--output-limit", "10", str(wasm.flood), "--", "100", cache=cache_dir
    )
    document = json.loads(done.stdout)
    assert document["status"] == "succeeded"
    assert document["stdout"] == "x" * 10 and document["stdout_truncated"] is True
    for key in ("exit_code", "stderr", "stderr_truncated", "duration_s", "limit", "error"):
        assert key in document


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--timeout", "1", "{loop}"], 124, "ExecutionTimeout"),
        (["--memory", "32m", "{membomb}"], 123, "memory"),
        (["--fuel", "1000", "{count}"], 123, "fuel"),
        (["{trap}"], 126, "unreachable"),
        (["--memory", "12x", "{hello}"], 65, "memory"),
        (["--timeout", "-1", "{hello}"], 65, "timeout"),
        (["{hello}.missing"], 65, "cannot open"),
        (["--env", "NOVALUE", "{hello}"], 65, "KEY=VALUE"),
        (["--input", "../x=/etc/hostname", "{hello}"], 65, "input"),
        (["--runtime", "docker", "{hello}"], 65, "--image"),
        (["--runtime", "vm", "{hello}"], 65, "runtime"),
    ],
)
def test_failures_have_documented_codes_and_one_line(
    wasm: WasmFixtures, cache_dir: Path, args: list[str], code: int, needle: str
) -> None:
    paths = {
        name: str(getattr(wasm, name)) for name in ("loop", "membomb", "count", "trap", "hello")
    }
    done = run_cli("run", *(a.format(**paths) for a in args), cache=cache_dir)
    assert done.returncode == code, done.stderr
    assert_one_line(done.stderr, needle)
    json_done = run_cli("run", "--json", *(a.format(**paths) for a in args), cache=cache_dir)
    assert json_done.returncode == code
    document = json.loads(json_done.stdout)
    assert document["error"]["type"]
    assert "Traceback" not in json_done.stderr.decode()


def test_bad_config_is_reported_with_its_key(
    wasm: WasmFixtures, cache_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("sandbox:\n  wasm: {memory_limt: 1g}\n")
    done = run_cli("run", "--config", str(config), str(wasm.hello), cache=cache_dir)
    assert done.returncode == 65
    assert_one_line(done.stderr, "sandbox.wasm.memory_limt")
    done = run_cli("config", "show", env={"PARITY_SANDBOX_CONFIG": str(config)}, cache=cache_dir)
    assert done.returncode == 65


def test_config_show_and_doctor(cache_dir: Path) -> None:
    done = run_cli("config", "show", env={"PARITY_SANDBOX_WASM_TIMEOUT": "7s"}, cache=cache_dir)
    assert done.returncode == 0
    assert b"timeout: 7s" in done.stdout
    done = run_cli("doctor", cache=cache_dir)
    assert done.returncode == 0, done.stderr
    assert b"wasm" in done.stdout and b"wasmtime" in done.stdout
    assert b"docker" in done.stdout
    unreachable = {
        "PARITY_SANDBOX_DEFAULT_RUNTIME": "docker",
        "DOCKER_HOST": f"unix://{cache_dir}/no-docker.sock",
    }
    done = run_cli("doctor", env=unreachable, cache=cache_dir)
    assert done.returncode == 1
    assert b"cannot reach the Docker daemon" in done.stdout
    assert_one_line(done.stderr, "default runtime")


def test_limits_wasm_cannot_enforce_are_named_once(wasm: WasmFixtures, cache_dir: Path) -> None:
    done = run_cli("run", "--cpus", "0.5", str(wasm.hello), cache=cache_dir)
    assert done.returncode == 0
    assert done.stderr.decode().count("ignores limits.cpu") == 1
    assert "pids" not in done.stderr.decode()


def test_ctrl_c_stops_the_task_with_exit_130(wasm: WasmFixtures, cache_dir: Path) -> None:
    import signal
    import time

    from test_wasm_cleanup import worker_pids

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
    environ["XDG_CACHE_HOME"] = str(cache_dir)
    child = subprocess.Popen(
        [*CLI, "run", "--timeout", "60", str(wasm.print_then_sleep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
    )
    assert child.stdout is not None
    deadline = time.monotonic() + 30
    while not worker_pids(f"parity-sandbox-wasm-{child.pid}-") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(f"parity-sandbox-wasm-{child.pid}-"), "no worker found while it runs"
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=10)
    assert child.returncode == 130
    assert_one_line(stderr, "interrupted")
    time.sleep(0.2)
    assert worker_pids(f"parity-sandbox-wasm-{child.pid}-") == set()
