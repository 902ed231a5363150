from datetime import timedelta
from pathlib import Path

import pytest

from parity_sandbox import (
    ExecutionTimeout,
    InvalidInput,
    Limits,
    ResourceLimitExceeded,
    Result,
    Status,
    Task,
    TaskFailed,
    WasmExecutor,
    spec_hash,
)

MODULE = b"\0asm\x01\0\0\0"


def test_limits_parse_units_once() -> None:
    limits = Limits(memory="128m", timeout=timedelta(minutes=1), disk="1g", output=0, fuel="1000")
    assert limits.memory == 128 << 20
    assert limits.timeout == 60.0
    assert limits.disk == 1 << 30
    assert limits.output == 0
    assert limits.fuel == 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory", "12x"),
        ("memory", 0),
        ("memory", "10k"),
        ("timeout", -1),
        ("timeout", 0),
        ("timeout", "forever"),
        ("cpu", 0),
        ("pids", 0),
        ("fuel", 0),
        ("stack_size", "1g"),
        ("output", "2g"),
        ("open_files", 3),
        ("open_files", "2000000"),
        ("file_size", -1),
        ("output_files", 100_001),
        ("input", "2g"),
    ],
)
def test_bad_limits_raise_invalid_input_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInput) as info:
        Limits(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_per_task_limits_judges_expect() -> None:
    limits = Limits(open_files=64, file_size="1m", output_files=0, input="10m")
    assert (limits.open_files, limits.file_size, limits.output_files) == (64, 1 << 20, 0)
    assert limits.input == 10 << 20
    unset = Limits(memory="64m")
    assert unset.open_files_or_default == 4096 and unset.output_files_or_default == 1000
    assert unset.input_or_default == 32 << 20  # half the memory limit


def test_new_limits_enter_the_spec_hash_only_when_set() -> None:
    plain = Task(wasm_module=MODULE)
    document = WasmExecutor.spec_document(plain, Limits(memory="64m"), program="0", inputs={})
    assert "file_size" not in document["limits"] and "fuel" in document["limits"]
    capped = Task(wasm_module=MODULE, limits={"file_size": "1m", "output_files": 3})
    assert spec_hash(capped) != spec_hash(plain)
    assert spec_hash(Task(image="sha256:" + "a" * 64, limits={"open_files": 64})) != spec_hash(
        Task(image="sha256:" + "a" * 64)
    )


def test_limits_merge_only_what_is_set() -> None:
    base = Limits(memory="1g", timeout=5)
    merged = base.merged(Limits(timeout=1))
    assert (merged.memory, merged.timeout) == (1 << 30, 1.0)


def test_task_accepts_the_seed_spelling_of_stdin() -> None:
    assert Task(wasm_module=MODULE, Input=b"x").input == b"x"
    assert Task(wasm_module=MODULE, stdin=b"y").input == b"y"
    assert Task(wasm_module=MODULE, input=b"z").input == b"z"


def test_task_is_immutable() -> None:
    task = Task(wasm_module=MODULE)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        task.args = ("x",)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, None),
        ({"wasm_module": MODULE, "wasm_file": Path("x.wasm")}, None),
        ({"wasm_module": MODULE, "args": ("a" * (10 << 20),)}, "args"),
        ({"wasm_module": MODULE, "args": ("a\0b",)}, "args"),
        ({"wasm_module": MODULE, "env": {"A=B": "x"}}, "env"),
        ({"wasm_module": MODULE, "env": {"": "x"}}, "env"),
        ({"wasm_module": MODULE, "env": {"A": "x\0"}}, "env"),
        ({"wasm_module": MODULE, "input_files": {"../x": b""}}, "input_files"),
        ({"wasm_module": MODULE, "input_files": {"/etc/passwd": b""}}, "input_files"),
        ({"wasm_module": MODULE, "input_files": {"a\0b": b""}}, "input_files"),
        ({"wasm_module": MODULE, "input_files": {"a/./b": b""}}, "input_files"),
        ({"wasm_module": MODULE, "input_files": {"x": "text"}}, "input_files"),
        ({"wasm_module": MODULE, "input_files": {"a": b"", "a/b": b""}}, "input_files"),
        ({"wasm_module": MODULE, "outputs": ("../../etc",)}, "outputs"),
        ({"wasm_module": MODULE, "outputs": ("/etc/passwd",)}, "outputs"),
        ({"wasm_module": MODULE, "id": "has space"}, "id"),
        ({"wasm_module": MODULE, "labels": {"k": "v\0"}}, "labels"),
        ({"wasm_module": MODULE, "limits": {"memory": "12x"}}, "limits.memory"),
        ({"wasm_module": MODULE, "unknown": 1}, "unknown"),
    ],
)
def test_hostile_task_fields_are_rejected(kwargs: dict[str, object], field: str | None) -> None:
    with pytest.raises(InvalidInput) as info:
        Task(**kwargs)
    if field is not None:
        assert info.value.field == field
        assert field in str(info.value)


def test_a_ten_megabyte_argument_is_named() -> None:
    with pytest.raises(InvalidInput, match="args"):
        Task(wasm_module=MODULE, args=("x" * (10 << 20),))


def test_output_paths_may_be_spelled_under_work() -> None:
    assert Task(wasm_module=MODULE, outputs=("/work/out/a.txt",)).outputs == ("out/a.txt",)


def test_raise_for_status_maps_each_status() -> None:
    assert Result(status=Status.SUCCEEDED, exit_code=0).raise_for_status().ok
    with pytest.raises(TaskFailed):
        Result(status=Status.FAILED, exit_code=3).raise_for_status()
    with pytest.raises(ExecutionTimeout) as timeout:
        Result(status=Status.TIMEOUT, stdout=b"partial").raise_for_status()
    assert timeout.value.result is not None
    assert timeout.value.result.stdout == b"partial"
    with pytest.raises(ResourceLimitExceeded) as limit:
        Result(status=Status.RESOURCE_LIMIT, limit="fuel").raise_for_status()
    assert limit.value.limit == "fuel"


def test_json_dict_replaces_undecodable_bytes() -> None:
    document = Result(status=Status.SUCCEEDED, exit_code=0, stdout=b"ok \xff").to_json_dict()
    assert document["stdout"] == "ok \ufffd"
    for key in (
        "status",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_truncated",
        "stderr_truncated",
        "duration_s",
        "limit",
        "error",
    ):
        assert key in document


def test_a_tasks_oci_runtime_has_one_spelling() -> None:
    assert Task(image="img", oci_runtime="runsc").oci_runtime == "runsc"
    with pytest.warns(DeprecationWarning, match="oci_runtime"):
        old = Task(image="img", docker_runtime="runsc")
    assert old.oci_runtime == "runsc"
    with pytest.raises(InvalidInput):
        Task(image="img", docker_runtime="runsc", oci_runtime="runc")


def test_the_model_reads_no_host_file(tmp_path: Path) -> None:
    path = tmp_path / "m.wasm"
    path.write_bytes(MODULE)
    task = Task(wasm_file=path, input_files={"f": path})
    assert not hasattr(task, "spec_document")  # the runtime's (Executor.spec_document)
    with pytest.raises(InvalidInput, match="host file"):
        task.embedded_inputs()
    assert Task(wasm_module=MODULE, input_files={"f": b"x"}).embedded_inputs() == {"f": b"x"}
