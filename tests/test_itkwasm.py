"""A real third-party WASI program runs unchanged: ITK-wasm's compress-stringify pipelines
(PyPI ``itkwasm-compress-stringify-wasi``, fetched by ``scripts/fetch-itkwasm.sh``) are WASI
reactors, run through ``Task.entry`` in the sandbox's own layout, and give the same bytes as
a plain wasmtime-py run."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import wasmtime

from parity_sandbox import Task, WasmExecutor

WHEELS = Path(__file__).resolve().parent / "fixtures" / "itkwasm"
WHEEL = "itkwasm_compress_stringify_wasi-3.5.0-py3-none-any.whl"
COMPRESS = "compress-stringify.wasi.wasm"
DECOMPRESS = "parse-string-decompress.wasi.wasm"
ENTRY, EXIT = "itk_wasm_delayed_start", "itk_wasm_delayed_exit"


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    wheel = WHEELS / WHEEL
    if not wheel.is_file():
        if os.environ.get("PARITY_TEST_ITKWASM") == "required":
            pytest.fail(f"{wheel} is missing: run scripts/fetch-itkwasm.sh")
        pytest.skip(f"{wheel} is missing: run scripts/fetch-itkwasm.sh")
    where = tmp_path_factory.mktemp("itkwasm")
    found = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in (COMPRESS, DECOMPRESS):
            member = f"itkwasm_compress_stringify_wasi/wasm_modules/{name}"
            found[name] = where / name
            found[name].write_bytes(archive.read(member))
    return found


def plain_run(module: Path, args: list[str], inputs: dict[str, bytes], root: Path) -> bytes:
    """The module run by wasmtime-py alone, in the same layout: ``_initialize``, the entry
    point, the finaliser; what it wrote to ``out/result.txt``."""
    work, given = root / "work", root / "input"
    (work / "out").mkdir(parents=True)
    given.mkdir()
    for name, data in inputs.items():
        (given / name).write_bytes(data)
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["task.wasm", *args]
    wasi.preopen_dir(str(work), "/work")
    wasi.preopen_dir(str(work), ".")
    wasi.preopen_dir(str(given), "/input")
    store.set_wasi(wasi)
    exports = linker.instantiate(store, wasmtime.Module.from_file(engine, str(module))).exports(
        store
    )
    exports["_initialize"](store)  # type: ignore[operator]
    code = exports[ENTRY](store)  # type: ignore[operator]
    try:
        exports[EXIT](store, code)  # type: ignore[operator]
    except wasmtime.ExitTrap as exit_:
        code = exit_.code
    assert code == 0
    return (work / "out" / "result.txt").read_bytes()


def test_itk_wasm_reactors_round_trip_their_input_as_plain_wasmtime_does(
    executor: WasmExecutor, modules: dict[str, Path], tmp_path: Path
) -> None:
    data = bytes(range(256)) * 64 + b"parity-sandbox " * 500
    args = ["/input/in.bin", "out/result.txt", "--stringify", "--compression-level", "5"]

    def run(module: Path, given: bytes, extra: list[str]) -> bytes:
        task = Task(
            wasm_file=module,
            entry=ENTRY,
            entry_exit=EXIT,
            args=(*extra,),
            input_files={"in.bin": given},
            required_outputs=("out/result.txt",),
            limits={"timeout": "60s", "memory": "512m"},
        )
        result = executor.execute(task)
        assert result.ok, result
        return result.files["out/result.txt"]

    compressed = run(modules[COMPRESS], data, args)
    assert compressed.startswith(b"data:application/zstd;base64,")
    assert compressed == plain_run(modules[COMPRESS], args, {"in.bin": data}, tmp_path / "plain")
    back = ["/input/in.bin", "out/result.txt", "--parse-string"]
    assert run(modules[DECOMPRESS], compressed, back) == data
