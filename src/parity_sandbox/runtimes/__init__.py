"""Runtimes, registered in one table.

A runtime is an ``Executor`` subclass (see ``parity_sandbox._executor``) and one entry here:
``RUNTIMES`` for those shipped with the package, :func:`register` for another (in a process),
or ``PARITY_SANDBOX_RUNTIMES=name=module:Class,...`` (for every process that reads the
environment, the CLI's included). Modules are imported only when their runtime is used, so a
missing optional dependency affects only that runtime.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import TYPE_CHECKING

from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable

if TYPE_CHECKING:  # the package of every runtime module, a WASM worker's too: kept light
    from parity_sandbox._executor import Executor

#: Runtime name -> "module:class" of its executor.
RUNTIMES: dict[str, str] = {
    "wasm": "parity_sandbox.runtimes.wasm.executor:WasmExecutor",
    "docker": "parity_sandbox.runtimes.docker.executor:DockerExecutor",
}
#: The variable that names more runtimes: ``name=module:Class``, comma-separated.
RUNTIMES_ENV = "PARITY_SANDBOX_RUNTIMES"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def register(name: str, target: str) -> None:
    """Make runtime ``name`` the executor ``target`` (``"module:Class"``), in this process.

    Raises:
        InvalidInput: a malformed name or target, or a name the package's own runtimes use.
    """
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"runtime: {name!r} is not a runtime name (a-z, 0-9, _ and -)")
    if not _TARGET.fullmatch(target):
        raise InvalidInput(f"runtime {name}: {target!r} is not module:Class")
    if name in _BUILT_IN and RUNTIMES.get(name) != target:
        raise InvalidInput(f"runtime: {name!r} is one of the package's own runtimes")
    RUNTIMES[name] = target


def names() -> list[str]:
    """The names of the runtimes registered here (those of ``PARITY_SANDBOX_RUNTIMES`` too).

    Raises:
        InvalidInput: ``PARITY_SANDBOX_RUNTIMES`` is malformed.
    """
    global _from_environment  # read once, on first use
    if not _from_environment:
        _from_environment = True
        entries = os.environ.get(RUNTIMES_ENV, "").split(",")
        for entry in filter(None, (part.strip() for part in entries)):
            name, _, target = entry.partition("=")
            register(name.strip(), target.strip())
    return sorted(RUNTIMES)


_BUILT_IN = frozenset(RUNTIMES)
_from_environment = False

#: Runtimes that are planned but not in this release, with what to use meanwhile.
PLANNED: dict[str, str] = {}


def executor_class(name: str) -> type[Executor]:
    """The executor class of runtime ``name``.

    Raises:
        InvalidInput: no runtime has that name.
        RuntimeUnavailable: the runtime is known but cannot be loaded here.
    """
    if name in PLANNED and name not in RUNTIMES:
        raise RuntimeUnavailable(PLANNED[name])
    if name not in names():
        raise InvalidInput(
            f"runtime: {name!r} is not a runtime; choose one of {', '.join(sorted(RUNTIMES))}",
            field="runtime",
        )
    module_name, _, class_name = RUNTIMES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeUnavailable(f"the {name} runtime cannot be loaded: {exc}") from exc
    cls: type[Executor] = getattr(module, class_name)
    return cls
