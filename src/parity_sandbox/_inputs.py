"""What a task names on the host, read once: its input files and its module.

The data model (``_models``) does no I/O: a ``Task`` holds host paths as ``pathlib.Path``
values and nothing more. This module reads them (regular files only, capped, see
``_fs.read_host_file``) for the layer that prepares tasks (``Executor.prepare``) and for the
spec hash and portable form of a task (``_executor.spec_hash``, ``_executor.portable``).
"""

from __future__ import annotations

from pathlib import Path

from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._fs import read_host_file
from parity_sandbox._models import MAX_INPUT_BYTES, MAX_MODULE_BYTES, Task


def read_inputs(task: Task) -> dict[str, bytes]:
    """The input files' contents; host files are read safely (regular files only, capped).

    Raises:
        InvalidInput: a host file is missing, not a regular file, or too large.
    """
    contents: dict[str, bytes] = {}
    total = 0
    for name, content in task.input_files.items():
        if isinstance(content, Path):
            field = f"input_files[{name}]"
            content = read_host_file(content, field, MAX_INPUT_BYTES - total)[0]
        contents[name] = bytes(content)
        total += len(contents[name])
    return contents


def read_module(task: Task) -> bytes:
    """The task's WebAssembly module: its bytes, or its file's, read safely.

    Raises:
        InvalidInput: the task has no module, or its file cannot be read.
    """
    if task.wasm_module is not None:
        return task.wasm_module
    if task.wasm_file is None:
        raise InvalidInput("wasm_file: this task has no WebAssembly module", field="wasm_file")
    return read_host_file(task.wasm_file, "wasm_file", MAX_MODULE_BYTES)[0]
