"""What a task names on the host, read once: its input files and its module.

The data model (``_models``) does no I/O: a ``Task`` holds host paths as ``pathlib.Path``
values and nothing more. This module reads them (regular files only, capped, see
``_fs.read_host_file``) for the layer that prepares tasks (``Executor.prepare``), and offers
the spec hash and portable form of a task to callers without an executor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from parity_sandbox._config import Config
from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._fs import read_host_file
from parity_sandbox._hashing import digest
from parity_sandbox._models import MAX_INPUT_BYTES, MAX_MODULE_BYTES, Limits, Task


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


def limits_of(task: Task, config: Config | None = None) -> tuple[str, Limits]:
    """The runtime ``task`` runs on and its limits there, resolved under ``config`` (default:
    built-in defaults): defaults, then the configuration, then the task."""
    settings = config if config is not None else Config()
    runtime = task.runtime_name or "wasm"
    return runtime, task.effective_limits(settings.limits_for(runtime).merged(task.limits))


def spec_hash(task: Task, config: Config | None = None, *, image_id: str | None = None) -> str:
    """``task``'s spec hash under ``config``: SHA-256 over a canonical encoding of everything
    that determines its output (see ``parity_sandbox._hashing``); its files are read here.

    Args:
        task: the task.
        config: the configuration whose limits apply (default: built-in defaults).
        image_id: for a Docker task, the image's id (``sha256:...``); a task whose ``image``
            is already an id needs none. ``DockerExecutor.spec_hash`` looks it up.

    Raises:
        InvalidInput: a Docker task's image is a name (a tag can move), or a file cannot be
            read.
    """
    runtime, limits = limits_of(task, config)
    if task.image is not None and image_id is None:
        if not task.image.startswith("sha256:"):
            raise InvalidInput(
                f"image: a spec hash needs the image's id, not the name {task.image!r}; give "
                "image_id= or use DockerExecutor.spec_hash, which looks it up",
                field="image",
            )
        image_id = task.image
    module_sha256 = None
    if task.image is None:
        module_sha256 = hashlib.sha256(read_module(task)).hexdigest()
    document = task.spec_document(
        limits,
        module_sha256=module_sha256,
        image_id=image_id,
        inputs=read_inputs(task),
        runtime=runtime,
    )
    return digest(document)


def portable(task: Task, config: Config | None = None, *, image_id: str | None = None) -> Task:
    """``task`` made self-contained, as a record for another machine to re-run: the module
    and input files embedded as bytes, the limits resolved under ``config`` (only those its
    runtime applies), the image by id."""
    runtime, limits = limits_of(task, config)
    unused = {
        "wasm": ("cpu", "pids", "open_files"),
        "docker": ("fuel", "stack_size"),
    }.get(runtime, ())
    limits = limits.model_copy(update=dict.fromkeys(unused))
    update: dict[str, object] = {"input_files": read_inputs(task), "limits": limits}
    if task.image is None:
        update.update(wasm_module=read_module(task), wasm_file=None)
    elif image_id is not None:
        update["image"] = image_id
    return task.model_copy(update=update)
