"""Real third-party WASI programs run unchanged: ITK-wasm's compress-stringify, downsample and
compare-images pipelines (PyPI ``itkwasm-*-wasi``, fetched by ``scripts/fetch-itkwasm.sh``)
are WASI reactors, run through ``Task.entry`` in the sandbox's own layout, and give the same
bytes as a plain wasmtime-py run.

Images travel in ITK-wasm's own file format, which the pipelines read and write themselves
when run without ``--memory-io``: a directory ``NAME.iwi`` holding ``index.json`` (type,
geometry, and ``data:application/vnd.itk.path,...`` references to the buffers beside it),
``data/direction.raw`` (float64 row-major) and ``data/data.raw`` (the pixels, little-endian).
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from parity_sandbox import Task, WasmExecutor

WHEELS = Path(__file__).resolve().parent / "fixtures" / "itkwasm"
STRINGIFY = "itkwasm_compress_stringify_wasi-3.5.0-py3-none-any.whl"
DOWNSAMPLE = "itkwasm_downsample_wasi-2.0.2-py3-none-any.whl"
COMPARE = "itkwasm_compare_images_wasi-5.4.2-py3-none-any.whl"
ENTRY, EXIT = "itk_wasm_delayed_start", "itk_wasm_delayed_exit"
LIMITS = {"timeout": "60s", "memory": "512m"}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("itkwasm")


def wasm_module(where: Path, wheel_name: str, name: str) -> Path:
    """The module ``name`` (``downsample.wasi.wasm``) taken out of a fetched wheel."""
    wheel = WHEELS / wheel_name
    if not wheel.is_file():
        if os.environ.get("PARITY_TEST_ITKWASM") == "required":
            pytest.fail(f"{wheel} is missing: run scripts/fetch-itkwasm.sh")
        pytest.skip(f"{wheel} is missing: run scripts/fetch-itkwasm.sh")
    package = wheel_name.split("-", 1)[0]
    path = where / name
    if not path.is_file():
        with zipfile.ZipFile(wheel) as archive:
            path.write_bytes(archive.read(f"{package}/wasm_modules/{name}"))
    return path


@functools.cache
def _compiled(module: Path) -> tuple[wasmtime.Engine, wasmtime.Module]:
    # Compiling a several-megabyte module takes seconds: once per module for the plain runs.
    engine = wasmtime.Engine()
    return engine, wasmtime.Module.from_file(engine, str(module))


def plain_run(
    module: Path, args: list[str], inputs: dict[str, bytes], root: Path
) -> dict[str, bytes]:
    """The module run by wasmtime-py alone, in the same layout: ``_initialize``, the entry
    point, the finaliser; every file it left under ``out``, by path (``out/NAME``)."""
    work, given = root / "work", root / "input"
    (work / "out").mkdir(parents=True)
    given.mkdir()
    for name, data in inputs.items():
        (given / name).parent.mkdir(parents=True, exist_ok=True)
        (given / name).write_bytes(data)
    engine, compiled = _compiled(module)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["task.wasm", *args]
    wasi.preopen_dir(str(work), "/work")
    wasi.preopen_dir(str(work), ".")
    wasi.preopen_dir(str(given), "/input")
    store.set_wasi(wasi)
    exports = linker.instantiate(store, compiled).exports(store)
    exports["_initialize"](store)  # type: ignore[operator]
    code = exports[ENTRY](store)  # type: ignore[operator]
    try:
        exports[EXIT](store, code)  # type: ignore[operator]
    except wasmtime.ExitTrap as exit_:
        code = exit_.code
    assert code == 0
    return {
        path.relative_to(work).as_posix(): path.read_bytes()
        for path in sorted((work / "out").rglob("*"))
        if path.is_file()
    }


def sandbox_run(
    executor: WasmExecutor, module: Path, args: list[str], inputs: dict[str, bytes]
) -> dict[str, bytes]:
    """The module run by the sandbox through ``Task.entry``; every file it left under ``out``."""
    task = Task(
        wasm_file=module,
        entry=ENTRY,
        entry_exit=EXIT,
        args=(*args,),
        input_files=inputs,
        limits=LIMITS,
    )
    result = executor.execute(task)
    assert result.ok, result
    assert not result.files_truncated
    return result.files


def iwi_image(size: int, component: str, pixels: bytes) -> dict[str, bytes]:
    """A square 2-D scalar image as the files of an ITK-wasm ``.iwi`` directory."""
    index = {
        "imageType": {
            "dimension": 2,
            "componentType": component,
            "pixelType": "Scalar",
            "components": 1,
        },
        "name": "Image",
        "origin": [0.0, 0.0],
        "spacing": [1.0, 1.0],
        "direction": "data:application/vnd.itk.path,data/direction.raw",
        "size": [size, size],
        "data": "data:application/vnd.itk.path,data/data.raw",
        "metadata": [],
    }
    return {
        "index.json": json.dumps(index).encode(),
        "data/direction.raw": struct.pack("<4d", 1.0, 0.0, 0.0, 1.0),
        "data/data.raw": pixels,
    }


def under(folder: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in files.items()}


def ramp(size: int) -> list[int]:
    """Pixel values with structure in both directions, so smoothing changes them."""
    return [(x * 3 + y * 5) % 256 for y in range(size) for x in range(size)]


def test_itk_wasm_reactors_round_trip_their_input_as_plain_wasmtime_does(
    executor: WasmExecutor, module_dir: Path, tmp_path: Path
) -> None:
    compress = wasm_module(module_dir, STRINGIFY, "compress-stringify.wasi.wasm")
    decompress = wasm_module(module_dir, STRINGIFY, "parse-string-decompress.wasi.wasm")
    data = bytes(range(256)) * 64 + b"parity-sandbox " * 500
    args = ["/input/in.bin", "out/result.txt", "--stringify", "--compression-level", "5"]

    compressed = sandbox_run(executor, compress, args, {"in.bin": data})
    assert compressed["out/result.txt"].startswith(b"data:application/zstd;base64,")
    assert compressed == plain_run(compress, args, {"in.bin": data}, tmp_path / "plain")
    back = ["/input/in.bin", "out/result.txt", "--parse-string"]
    given = {"in.bin": compressed["out/result.txt"]}
    assert sandbox_run(executor, decompress, back, given) == {"out/result.txt": data}


def test_itk_wasm_downsample_halves_an_image_as_plain_wasmtime_does(
    executor: WasmExecutor, module_dir: Path, tmp_path: Path
) -> None:
    module = wasm_module(module_dir, DOWNSAMPLE, "downsample.wasi.wasm")
    size = 256
    inputs = under("in.iwi", iwi_image(size, "uint8", bytes(ramp(size))))
    args = ["/input/in.iwi", "out/down.iwi", "--shrink-factors", "2", "2"]

    files = sandbox_run(executor, module, args, inputs)
    assert files == plain_run(module, args, inputs, tmp_path / "plain")
    index: dict[str, Any] = json.loads(files["out/down.iwi/index.json"])
    assert index["size"] == [size // 2, size // 2]
    assert index["spacing"] == [2, 2]
    assert index["imageType"]["componentType"] == "uint8"
    assert index["data"] == "data:application/vnd.itk.path,data/data.raw"
    assert len(files["out/down.iwi/data/data.raw"]) == (size // 2) ** 2


def test_itk_wasm_compare_images_finds_one_changed_pixel_as_plain_wasmtime_does(
    executor: WasmExecutor, module_dir: Path, tmp_path: Path
) -> None:
    # compare-double-images reads float64 images only ("Unsupported image type" otherwise):
    # the wheel's Python wrapper casts before it calls the module.
    module = wasm_module(module_dir, COMPARE, "compare-double-images.wasi.wasm")
    size = 64
    values = ramp(size)
    changed = list(values)
    changed[100] = 255 - changed[100]
    inputs = {
        **under("same.iwi", iwi_image(size, "float64", struct.pack(f"<{size**2}d", *values))),
        **under("other.iwi", iwi_image(size, "float64", struct.pack(f"<{size**2}d", *changed))),
    }
    outputs = ["out/metrics.json", "out/difference.iwi", "out/difference-uchar.iwi"]

    def metrics(baseline: str, plain_root: Path) -> dict[str, Any]:
        args = ["/input/same.iwi", *outputs, "--baseline-images", f"/input/{baseline}"]
        files = sandbox_run(executor, module, args, inputs)
        assert files == plain_run(module, args, inputs, plain_root)
        found: dict[str, Any] = json.loads(files["out/metrics.json"])
        return found

    same = metrics("same.iwi", tmp_path / "same")
    assert same["almostEqual"] is True
    assert same["numberOfPixelsWithDifferences"] == 0
    assert same["totalDifference"] == 0
    other = metrics("other.iwi", tmp_path / "other")
    assert other["almostEqual"] is False
    assert other["numberOfPixelsWithDifferences"] == 1
    assert other["maximumDifference"] == abs(changed[100] - values[100])
