"""``parity-sandbox node start|stop`` and ``run --ray`` / ``run-batch --ray``, as an operator
uses them: a head and a worker on loopback, tasks run through the CLI, every process of the
nodes gone after ``node stop`` (checked by PID)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import Result, Status
from parity_sandbox.cluster import node as nodes
from raycluster import _free_base, cluster_or_skip
from test_batch import line
from test_cli import run_cli as _run_cli

pytestmark = pytest.mark.slow


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The CLI, given the time a node takes to start on a loaded machine."""
    return _run_cli(*args, stdin=stdin, timeout=240)


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A configuration file (the state dir, the token) and the nodes' short temp root."""
    cluster_or_skip(tmp_path)  # skips (or fails, where ray is required) without ray
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    config = tmp_path / "config.yaml"
    config.write_text(
        "sandbox:\n"
        f"  service: {{state_dir: {tmp_path / 'state'}}}\n"
        f"  ray: {{token_file: {token}, grace: 3}}\n"
        "  cache: {enabled: false}\n"
    )
    short = Path(tempfile.mkdtemp(prefix="psbray-", dir="/tmp"))
    try:
        yield config, short
    finally:
        nodes.stop(tmp_path / "state" / "ray")
        shutil.rmtree(short, ignore_errors=True)


def test_node_start_run_and_node_stop(
    operator: tuple[Path, Path], wasm: WasmFixtures, tmp_path: Path
) -> None:
    config, short = operator
    base = _free_base()
    head = run_cli(
        "node", "start", "--head", f"--port={base}", f"--ports-from={base}", "--name=head",
        f"--temp-dir={short / 'head'}", "--runtime=wasm", "--num-cpus=1", f"--config={config}",
    )  # fmt: skip
    assert head.returncode == 0, head.stderr.decode()[-2000:]
    assert b"node head" in head.stdout and b"psb_runtime_wasm" in head.stdout
    worker = run_cli(
        "node", "start", f"--address=127.0.0.1:{base}", f"--ports-from={_free_base()}",
        "--name=w1", f"--temp-dir={short / 'w1'}", "--runtime=wasm", "--num-cpus=1",
        f"--config={config}",
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr.decode()[-2000:]
    states = sorted((tmp_path / "state" / "ray").glob("node-*.json"))
    assert [p.name for p in states] == ["node-head.json", "node-w1.json"]
    pids = {json.loads(p.read_text())["pid"] for p in states}
    members = {m for pid in pids for m in nodes.processes(pid)}
    assert len(members) > 4, "the nodes' processes were not found"

    address = f"127.0.0.1:{base}"
    done = run_cli("run", str(wasm.echo_stdin), f"--ray={address}", f"--config={config}",
                   "--json", "--stdin=-", stdin=b"over ray")  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)
    assert result["stdout"] == "over ray" and result["attempts"] == 1

    source = tmp_path / "tasks.jsonl"
    source.write_bytes(
        b"".join(line(wasm_file=str(wasm.echo_stdin), input="dGFzayAl" + "MA==") + b"\n"
                 for _ in range(3))
    )  # fmt: skip
    out = tmp_path / "results.jsonl"
    batch = run_cli("run-batch", str(source), "-o", str(out), f"--ray={address}",
                    f"--config={config}")  # fmt: skip
    assert batch.returncode == 0, batch.stderr.decode()[-2000:]
    results = [Result.from_json(text) for text in out.read_text().splitlines()]
    assert [r.status for r in results] == [Status.SUCCEEDED] * 3

    both = run_cli("run", str(wasm.hello), f"--ray={address}", "--remote=http://127.0.0.1:1",
                   f"--config={config}")  # fmt: skip
    assert both.returncode == 65 and b"--ray" in both.stderr

    stopped = run_cli("node", "stop", f"--config={config}")
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert b"stopped node head" in stopped.stdout and b"stopped node w1" in stopped.stdout
    assert not [m for m in members if nodes.alive(m)], "node processes left after node stop"
    assert not list((tmp_path / "state" / "ray").glob("node-*.json"))
