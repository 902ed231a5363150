"""Shared fixtures: WASM test programs compiled from C at test time, and a shared executor."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from parity_sandbox import Config, WasmExecutor

FIXTURES = Path(__file__).parent / "fixtures" / "wasm"
BUILD_SCRIPT = Path(__file__).parent.parent / "scripts" / "build-wasm.sh"


@pytest.fixture(scope="session")
def wasm_dir() -> Path:
    """Directory of the compiled fixtures (built once; rebuilt when a source changes)."""
    out = Path(os.environ.get("WASM_FIXTURE_DIR", FIXTURES / "build"))
    subprocess.run(["bash", str(BUILD_SCRIPT), str(FIXTURES), str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def wasm(wasm_dir: Path) -> WasmFixtures:
    return WasmFixtures(wasm_dir)


class WasmFixtures:
    """``wasm.hello`` is the path of the compiled ``hello.c`` fixture, and so on."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def __getattr__(self, name: str) -> Path:
        path = self._dir / f"{name}.wasm"
        if not path.is_file():
            raise AttributeError(f"no compiled fixture {name}.wasm in {self._dir}")
        return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("module-cache")


@pytest.fixture(scope="module")
def executor(cache_dir: Path) -> Iterator[WasmExecutor]:
    """One executor per test module (its workers stay warm between tests)."""
    with WasmExecutor(Config(cache_dir=cache_dir, timeout="10s")) as ex:
        yield ex
