"""Tests of the WASI test suite as tasks.

A test of github.com/WebAssembly/wasi-testsuite is a WASI preview 1 module with a JSON spec
beside it (``foo.json`` for ``foo.wasm``; none means the default spec). :func:`spec_task` turns
the spec into a :class:`~parity_sandbox.Task` and :func:`spec_failures` checks a
:class:`~parity_sandbox.Result` against it, so a suite runs on any executor that runs WASM::

    spec = read_spec(module)
    result = executor.execute(spec_task(spec, module))
    assert not spec_failures(spec, result)

What each field becomes:

- ``args`` -> ``Task.args``; ``env`` -> ``Task.env`` (all of the environment, as the spec asks).
- ``root`` (the current form) names a fixture directory beside the test that the guest sees as
  its ``/``: its files become ``input_files`` ``NAME/...`` mounted at ``/`` as a writable copy
  (``mounts`` ``{"/": "NAME:rw"}``: the tests make and remove their scratch files there; the
  copy counts against ``disk`` and the host fixture stays unchanged). The tree is the working
  directory and fd 3, as a runtime given ``--dir NAME::/`` shows it: ``a.txt`` and ``/a.txt``
  are its ``a.txt``; the workspace stays at ``/work``.
- ``dirs`` (the older form) names fixture directories a runtime preopens under their relative
  names (``--dir fs-tests.dir``). Each becomes a writable copy at ``/work/NAME`` (``mounts``
  ``{"/work/NAME": NAME}``): the workspace is the working directory, so ``NAME/file`` reaches
  it as the test expects, and what the test creates or removes there changes its copy only.
- ``exit_code`` (default 0), ``stdout`` and ``stderr`` (checked when given) ->
  :func:`spec_failures`.
- ``wasi_functions`` only lists the functions a test calls: nothing to run or check.

What a task cannot express (each refused or documented, never run as something else):

- Preopen names and numbers under ``dirs``: fd 3 is the workspace (``/work``), fd 4 the
  working directory (``.``); no preopen is named ``NAME``, so a test that looks its directory
  up with ``fd_prestat_dir_name`` or takes fd 3 to be it does not find it. Paths through
  wasi-libc (C, Rust's ``std::fs``) resolve as under any runtime.
- Empty directories and symbolic links in a fixture: input trees hold regular files only
  (a folder exists where a file lies in it); a fixture with a symbolic link is refused.
- ``root`` and ``dirs`` together: with a tree at ``/`` relative paths resolve in it, not in the
  workspace where the ``dirs`` copies lie; refused.
- Anything of the runner's own (a ``.cleanup`` file, the host directory it runs in): a task
  has no host paths.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._models import MAX_INPUT_FILES, Result, Task

__all__ = ["SPEC_FIELDS", "read_spec", "spec_failures", "spec_task"]

#: The fields of a spec, current and older.
SPEC_FIELDS = frozenset(
    {"args", "env", "dirs", "root", "exit_code", "stdout", "stderr", "wasi_functions"}
)


def read_spec(wasm_file: Path) -> dict[str, Any]:
    """The spec beside ``wasm_file`` (``foo.json`` for ``foo.wasm``); ``{}``, the default spec,
    when there is none.

    Raises:
        InvalidInput: the file is not a JSON object of the spec's fields.
    """
    path = wasm_file.with_suffix(".json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"spec: {path}: {exc}", field="spec") from exc
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"spec: {path}: not JSON ({exc})", field="spec") from exc
    _check_spec(spec)
    return dict(spec)


def spec_task(spec: Mapping[str, Any], wasm_file: Path, **fields: Any) -> Task:
    """The task that runs ``wasm_file`` as ``spec`` asks; its fixture directories are those
    beside it. ``fields`` are further ``Task`` fields (``limits``, ``id``, ...).

    Raises:
        InvalidInput: a field the spec gives cannot be expressed as a task (see the module's
            docstring), or a fixture directory is missing, too large or holds a link.
    """
    _check_spec(spec)
    directory = wasm_file.parent
    root: str | None = spec.get("root")
    dirs: list[str] = list(spec.get("dirs", ()))
    if root is not None and dirs:
        raise InvalidInput(
            "spec: root and dirs together: with a tree at / relative paths resolve in it, not "
            "in the workspace where the dirs lie",
            field="spec.dirs",
        )
    input_files: dict[str, bytes | Path] = {}
    mounts: dict[str, str] = {}
    for name in [root] if root is not None else dirs:
        input_files.update(_fixture_files(directory, name, field="root" if root else "dirs"))
        if root is not None:
            mounts["/"] = f"{name}:rw"
        else:
            mounts[f"/work/{name}"] = name
    return Task(
        wasm_file=wasm_file,
        args=tuple(spec.get("args", ())),
        env=dict(spec.get("env", {})),
        input_files=input_files,
        mounts=mounts,
        **fields,
    )


def spec_failures(spec: Mapping[str, Any], result: Result) -> list[str]:
    """How ``result`` differs from what ``spec`` expects: its exit code (``exit_code``, 0 when
    not given) and, where the spec gives them, its stdout and stderr. Empty: the test passed.
    """
    _check_spec(spec)
    failures = []
    expected = spec.get("exit_code", 0)
    if result.exit_code != expected:
        detail = f" ({result.error.type}: {result.error.message})" if result.error else ""
        failures.append(f"exit code {result.exit_code}, expected {expected}{detail}")
    for stream in ("stdout", "stderr"):
        want = spec.get(stream)
        got: bytes = getattr(result, stream)
        if want is not None and got != want.encode():
            cut = (
                " (truncated: raise limits.output)"
                if getattr(result, f"{stream}_truncated")
                else ""
            )
            failures.append(f"{stream} {got[:200]!r}{cut}, expected {want[:200]!r}")
    return failures


def _check_spec(spec: Any) -> None:
    """Refuse a spec whose fields are unknown or of the wrong type (naming the field)."""
    if not isinstance(spec, Mapping):
        raise InvalidInput("spec: must be a JSON object", field="spec")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise InvalidInput(
            f"spec: unknown field(s) {', '.join(map(str, unknown))}: a task would not express them",
            field=f"spec.{unknown[0]}",
        )
    kinds: dict[str, Any] = {
        "args": list,
        "dirs": list,
        "wasi_functions": list,
        "env": dict,
        "root": str,
        "stdout": str,
        "stderr": str,
        "exit_code": int,
    }
    for name, value in spec.items():
        if not isinstance(value, kinds[name]) or isinstance(value, bool):
            raise InvalidInput(
                f"spec.{name}: must be a JSON {kinds[name].__name__}", field=f"spec.{name}"
            )
    items = [*spec.get("args", ()), *spec.get("dirs", ()), *spec.get("env", {}).values()]
    if not all(isinstance(item, str) for item in items):
        raise InvalidInput("spec: args, dirs and env values must be strings", field="spec")


def _fixture_files(directory: Path, name: str, *, field: str) -> dict[str, bytes | Path]:
    """The files of the fixture directory ``name`` beside a test, as input files
    ``name/...`` (host paths, read when the task runs); links refused, the count capped."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(part in (".", "..") for part in parts):
        raise InvalidInput(
            f"spec.{field}: {name!r} is not a directory beside the test", field=f"spec.{field}"
        )
    top = directory / name
    if top.is_symlink() or not top.is_dir():
        raise InvalidInput(
            f"spec.{field}: {top} is not a directory (a symbolic link is not followed)",
            field=f"spec.{field}",
        )
    files: dict[str, bytes | Path] = {}
    for folder, subdirs, names in os.walk(top):  # os.walk follows no links to folders
        for entry in sorted(subdirs + names):
            path = Path(folder) / entry
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            relative = path.relative_to(directory).as_posix()
            if not stat.S_ISREG(mode):
                raise InvalidInput(
                    f"spec.{field}: {relative} is not a regular file (input trees hold files only)",
                    field=f"spec.{field}",
                )
            files[relative] = path
            if len(files) > MAX_INPUT_FILES:
                raise InvalidInput(
                    f"spec.{field}: {name} holds more than {MAX_INPUT_FILES} files",
                    field=f"spec.{field}",
                )
    if not files:
        raise InvalidInput(
            f"spec.{field}: {name} holds no file (an empty tree cannot be mounted)",
            field=f"spec.{field}",
        )
    return files
