"""Which module may import which: each imports (at module level) only modules of lower layers,
as docs/ARCHITECTURE.md draws them. A new module must be placed here, or this fails."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: Bottom to top. A WASM worker's own modules (``wasm.worker`` and what it imports) sit
#: below the data model: a worker loads no pydantic, YAML or SQLite.
LAYERS: list[set[str]] = [
    {
        "parity_sandbox",  # the root: every name imported on first use, nothing at import
        "_units",
        "_hashing",
        "_exceptions",
        "_seccomp",
        "_egress",
        "metrics",  # prometheus_client imported when a Metrics is made, not before
        "runtimes.wasm",  # runtime packages: a docstring, no imports
        "runtimes.docker",
        "runtimes.docker.host",
        "runtimes.docker.seccomp",
        "service",  # the HTTP service (extra [service]); its package imports nothing
        "service.store",
        "cluster",  # distributed execution on Ray (extra [ray]); its package imports nothing
        "cluster.launch",  # Ray's command, imported when it runs
    },
    {"_fs", "_proxy", "runtimes", "runtimes.docker.daemon", "service.views", "cluster._ray"},
    {"runtimes.wasm.protocol", "runtimes.docker.streams"},
    {"runtimes.wasm.worker", "_models"},
    {"_config", "runtimes.wasm.modules", "wasi_spec"},
    {"_cache", "_inputs", "audit", "runtimes.docker.spec", "cluster.node"},
    {
        "_executor",
        "runtimes.docker.init",
        "runtimes.docker.pool",
        "runtimes.docker.egress",
        "service.server",
    },
    {"runtimes.wasm.pool", "runtimes.docker.run"},
    {"runtimes.wasm.deadlines"},
    {"runtimes.wasm.lanes"},
    {"runtimes.docker.executor", "runtimes.wasm.executor", "_record"},
    {"service.webhooks", "cluster.agent"},
    {"_batch", "service.dispatch", "remote", "cluster.executor"},
    {"cli", "service.app"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC / "parity_sandbox").with_suffix("").parts)
    return name.removesuffix(".__init__").removesuffix("__init__") or "parity_sandbox"


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is imported (not for type checking)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module in ("parity_sandbox", "parity_sandbox.runtimes"):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "parity_sandbox" or name.startswith("parity_sandbox."):
                found.add(_known(name.removeprefix("parity_sandbox.")))
    return found


def _known(name: str) -> str:
    """``runtimes.executor_class`` is a name in ``runtimes``; a module stays as it is."""
    while name not in LAYER and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


#: Scripts that Alembic runs (the service's schema migrations), not modules anyone imports.
MIGRATIONS = SRC / "parity_sandbox" / "service" / "migrations"


def package_modules() -> list[Path]:
    return [
        path
        for path in (SRC / "parity_sandbox").rglob("*.py")
        if not path.is_relative_to(MIGRATIONS)
    ]


def test_every_module_has_a_layer() -> None:
    modules = {module_name(path) for path in package_modules()}
    assert modules == set(LAYER), "place new modules in LAYERS (and in ARCHITECTURE.md)"


def test_modules_import_only_lower_layers() -> None:
    upward = [
        f"{module_name(path)} imports {dependency}"
        for path in package_modules()
        for dependency in imports_of(path)
        if LAYER[dependency] >= LAYER[module_name(path)]
    ]
    assert upward == []


def test_the_data_model_reads_nothing_from_the_host() -> None:
    """Reading host files and hashing specs belong to the layer that prepares tasks."""
    assert imports_of(SRC / "parity_sandbox" / "_models.py") <= {
        "parity_sandbox",
        "runtimes",
        "_egress",  # parses grants; reads nothing
        "_exceptions",
        "_hashing",
        "_units",
    }
