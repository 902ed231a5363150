"""Runtimes, one module each, registered in one table.

Adding a runtime is one file in this package and one line in ``RUNTIMES``. Modules are imported
only when their runtime is used, so a missing optional dependency affects only that runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable

if TYPE_CHECKING:  # the package of every runtime module, a WASM worker's too: kept light
    from parity_sandbox._executor import Executor

#: Runtime name -> "module:class" of its executor.
RUNTIMES: dict[str, str] = {
    "wasm": "parity_sandbox.runtimes.wasm:WasmExecutor",
    "docker": "parity_sandbox.runtimes.docker:DockerExecutor",
}

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
    if name not in RUNTIMES:
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
