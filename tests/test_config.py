from datetime import timedelta
from pathlib import Path

import pytest

from parity_sandbox import Config, InvalidInput, load_config

SEED = """\
sandbox:
  default_runtime: "docker" # or "wasm"
  docker: {memory_limit: "512m", cpu_limit: "1.0", network_mode: "none", privileged: false}
  wasm: {memory_limit: "128m", stack_size: "1m", timeout: "5m"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_seed_file_is_accepted_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SEED), environ={})
    assert config.default_runtime == "docker"
    wasm = config.limits_for("wasm")
    assert (wasm.memory, wasm.stack_size, wasm.timeout) == (128 << 20, 1 << 20, 300.0)
    docker = config.limits_for("docker")
    assert (docker.memory, docker.cpu) == (512 << 20, 1.0)


def test_the_seed_python_usage_builds_a_config() -> None:
    config = Config(memory_limit="128m", timeout=timedelta(minutes=1))
    assert config.limits_for("wasm").memory == 128 << 20
    assert config.limits_for("wasm").timeout == 60.0


def test_config_file_comes_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, SEED)
    assert load_config(environ={"PARITY_SANDBOX_CONFIG": str(path)}).default_runtime == "docker"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    environ = {
        "PARITY_SANDBOX_WASM_MEMORY_LIMIT": "64m",
        "PARITY_SANDBOX_DEFAULT_RUNTIME": "wasm",
        "PARITY_SANDBOX_TIMEOUT": "9s",
    }
    config = load_config(write(tmp_path, SEED), environ=environ)
    assert config.default_runtime == "wasm"
    assert config.limits_for("wasm").memory == 64 << 20
    assert config.limits_for("docker").timeout == 9.0
    assert config.limits_for("wasm").timeout == 300.0  # the section still wins


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("sandbox:\n  wasm: {memory_limit: 12x}\n", ["sandbox.wasm.memory_limit", "12x", "512m"]),
        (
            "sandbox:\n  wasm: {memroy_limit: 1g}\n",
            ["sandbox.wasm.memroy_limit", "unknown key", "memory_limit"],
        ),
        ("sandbox:\n  bogus: 1\n", ["sandbox.bogus", "unknown key"]),
        ("sandbox:\n  timeout: -5\n", ["sandbox.timeout", "-5"]),
        ("sandbox:\n  docker: {privileged: true}\n", ["privileged", "allow_privileged"]),
        ("sandbox:\n  docker: {network_mode: host}\n", ["network_mode", "host"]),
        ("sandbox:\n  default_runtime: vm\n", ["default_runtime", "vm"]),
        ("- a\n- b\n", ["mapping"]),
        ("sandbox: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_bad_files_name_key_value_and_form(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(InvalidInput) as info:
        load_config(write(tmp_path, text), environ={})
    for needle in needles:
        assert needle in str(info.value)


def test_bad_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="PARITY_SANDBOX_WASM_MEMORY_LIMIT"):
        load_config(environ={"PARITY_SANDBOX_WASM_MEMORY_LIMIT": "lots"})
    with pytest.raises(InvalidInput, match="PARITY_SANDBOX_NOPE"):
        load_config(environ={"PARITY_SANDBOX_NOPE": "1"})


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_cache_dir_follows_xdg(tmp_path: Path) -> None:
    assert Config().resolved_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "parity-sandbox"
    )


def test_show_document_has_resolved_limits() -> None:
    document = Config(memory_limit="128m").to_document()
    assert document["sandbox"]["wasm"]["memory_limit"] == "128m"


def test_the_per_task_limits_have_configuration_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "sandbox:\n  docker: {open_files_limit: 128, file_size_limit: 2m, output_files_limit: 5,"
        " input_limit: 8m}\n"
    )
    limits = load_config(path).limits_for("docker")
    assert (limits.open_files, limits.file_size, limits.output_files) == (128, 2 << 20, 5)
    assert limits.input == 8 << 20
    shown = load_config(path).to_document()["sandbox"]["docker"]
    assert shown["open_files_limit"] == 128 and shown["output_files_limit"] == 5


def test_the_oci_runtime_has_one_spelling_and_the_old_ones_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "sandbox:\n  docker: {runtime: runsc, pool: {profiles: [{image: a, runtime: runc}]}}\n"
    )
    with pytest.warns(DeprecationWarning, match="oci_runtime"):
        docker = load_config(path).docker
    assert docker.oci_runtime == "runsc" and docker.pool.profiles[0].oci_runtime == "runc"
    with pytest.warns(DeprecationWarning, match="oci_runtime"):
        assert (
            load_config(environ={"PARITY_SANDBOX_DOCKER_RUNTIME": "runsc"}).docker.oci_runtime
            == "runsc"
        )
    path.write_text("sandbox:\n  docker: {runtime: runsc, oci_runtime: runc}\n")
    with pytest.raises(InvalidInput, match="oci_runtime only"):
        load_config(path)
