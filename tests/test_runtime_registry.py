"""A runtime plugs in with one line: registered, it works through ``run``, ``run-batch``,
``doctor``, ``config show``, spec hashes and run records, with no other edit anywhere."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from parity_sandbox import Config, InvalidInput, Task, load_config, runtimes, spec_hash
from parity_sandbox.runtimes import executor_class
from test_cli import run_cli

PLUGINS = Path(__file__).parent / "plugins"
#: The one line, for processes that read the environment (the CLI).
REGISTERED = {
    "PARITY_SANDBOX_RUNTIMES": "fake=fake_runtime:FakeExecutor",
    "PYTHONPATH": str(PLUGINS),
}
MODULE = b"\0asm\x01\0\0\0"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(PLUGINS))
    runtimes.register("fake", "fake_runtime:FakeExecutor")  # the one line, in this process
    yield
    del runtimes.RUNTIMES["fake"]


def test_the_library_runs_a_registered_runtime(fake: None, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(b"x")
    task = Task(
        wasm_module=MODULE, runtime="fake", args=("a", "b"), stdin=b"in", input_files={"d": data}
    )
    config = Config(cache={"enabled": False})
    with executor_class("fake")(config) as executor:
        result = executor.execute(task)
        assert result.stdout == b"a b|in|d" and result.files == {"out/said": b"a b|in|d"}
        # the contract made the result from the runtime's report: usage, id, no error
        assert (result.usage.input_bytes, result.usage.output_bytes) == (3, 16)
        assert result.error is None and result.runtime and result.runtime.name == "fake"
        assert executor.spec_hash(task) == spec_hash(task, config)
        limits = config.limits_for("fake")
        document = executor.spec_document(task, limits, program="0", inputs={"d": b"x"})
        assert document["runtime"] == "fake" and document["fake"] == {"echo": True}
        assert [r.stdout for r in executor.map([task, task])] == [b"a b|in|d"] * 2
        with pytest.warns(RuntimeWarning, match=r"fake runtime ignores limits\.cpu"):
            executor.execute(
                task.model_copy(update={"limits": task.limits.merged(type(task.limits)(cpu=1))})
            )
    assert Config(default_runtime="fake").default_runtime == "fake"


def test_an_unregistered_runtime_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not a runtime"):
        Task(wasm_module=MODULE, runtime="nowhere")
    with pytest.raises(InvalidInput, match="not a runtime"):
        Config(default_runtime="nowhere")
    with pytest.raises(InvalidInput, match="package's own"):
        runtimes.register("wasm", "fake_runtime:FakeExecutor")


def test_the_cli_runs_a_registered_runtime_everywhere(tmp_path: Path) -> None:
    module = tmp_path / "task.wasm"
    module.write_bytes(MODULE)
    done = run_cli("run", "--runtime", "fake", str(module), "--", "a", "b", env=REGISTERED)
    assert (done.returncode, done.stdout) == (0, b"a b||"), done.stderr
    # a run record, verified by a re-run
    record = tmp_path / "run.json"
    done = run_cli("run", "--runtime", "fake", "--save", str(record), str(module), env=REGISTERED)
    assert done.returncode == 0, done.stderr
    assert json.loads(record.read_text())["task"]["runtime"] == "fake"
    done = run_cli("verify", str(record), env=REGISTERED)
    assert done.returncode == 0, done.stdout + done.stderr
    # a batch
    lines = tmp_path / "tasks.jsonl"
    line = {"wasm_module": base64.b64encode(MODULE).decode(), "runtime": "fake", "args": ["x"]}
    lines.write_text(json.dumps(line) + "\n")
    out = tmp_path / "results.jsonl"
    done = run_cli("run-batch", str(lines), "-o", str(out), env=REGISTERED)
    assert done.returncode == 0, done.stderr
    assert base64.b64decode(json.loads(out.read_text())["stdout"]) == b"x||"
    # doctor and config show know it
    done = run_cli("doctor", env={**REGISTERED, "DOCKER_HOST": "unix:///nowhere.sock"})
    assert b"fake" in done.stdout and b"an executor starts" in done.stdout
    done = run_cli("config", "show", env=REGISTERED)
    assert done.returncode == 0 and b"fake:" in done.stdout, done.stderr


def test_a_registered_runtime_has_a_configuration_section(fake: None, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sandbox:\n  timeout: 9s\n  fake: {memory_limit: 64m}\n")
    config = load_config(path, environ={"PARITY_SANDBOX_FAKE_OUTPUT_LIMIT": "2k"})
    limits = config.limits_for("fake")
    assert (limits.memory, limits.timeout, limits.output) == (64 << 20, 9.0, 2048)
    assert config.limits_for("wasm").memory == 256 << 20  # the section is fake's alone
    shown = config.to_document()["sandbox"]["fake"]
    assert shown["memory_limit"] == "64m" and shown["output_limit"] == "2k"
    with pytest.raises(InvalidInput, match=r"^sandbox\.fake\.memory_limit"):
        Config.from_document({"fake": {"memory_limit": "lots"}}, prefix="sandbox")
    unknown = r"^sandbox\.fake\.memry: unknown key; accepted keys: .*memory_limit"
    with pytest.raises(InvalidInput, match=unknown):
        Config.from_document({"fake": {"memry": "64m"}}, prefix="sandbox")
