"""parity-sandbox: run untrusted compute tasks with hard limits and hardened defaults.

from parity_sandbox import Task, WasmExecutor

with WasmExecutor() as executor:
    result = executor.execute(Task(wasm_file="hello.wasm", input=b"data"))
    print(result.status, result.stdout_text)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parity_sandbox._batch import read_tasks, run_batch
    from parity_sandbox._cache import CacheStats, RedisCache, ResultCache, SqliteCache, open_cache
    from parity_sandbox._config import (
        AuditSettings,
        CacheSettings,
        Config,
        DockerSettings,
        MetricsSettings,
        PoolProfile,
        PoolSettings,
        RaySettings,
        RuntimeSettings,
        ServiceSettings,
        WasmSettings,
        WebhookSettings,
        load_config,
    )
    from parity_sandbox._exceptions import (
        ExecutionError,
        ExecutionTimeout,
        InvalidInput,
        LaunchFailed,
        ResourceLimitExceeded,
        RuntimeUnavailable,
        SandboxError,
        TaskError,
        TaskFailed,
    )
    from parity_sandbox._executor import Executor, PreparedTask, RunReport, portable, spec_hash
    from parity_sandbox._models import (
        ErrorInfo,
        EventKind,
        LimitName,
        Limits,
        ResourceUsage,
        Result,
        RuntimeInfo,
        SecurityEvent,
        Status,
        Task,
    )
    from parity_sandbox._record import Record, Verification, verify
    from parity_sandbox.audit import AuditLog, BrokenEntry, ChainCheck, verify_chain
    from parity_sandbox.cluster.executor import RayExecutor
    from parity_sandbox.metrics import Metrics
    from parity_sandbox.remote import RemoteExecutor
    from parity_sandbox.runtimes.docker.executor import DockerExecutor
    from parity_sandbox.runtimes.wasm.executor import WasmExecutor

#: Where each public name lives. Nothing is imported before it is first used, so that
#: ``import parity_sandbox`` is light, and a WASM worker process, which imports one module of
#: the package, loads neither pydantic nor YAML nor SQLite.
_WHERE: dict[str, str] = {
    "AuditLog": "parity_sandbox.audit",
    "AuditSettings": "parity_sandbox._config",
    "BrokenEntry": "parity_sandbox.audit",
    "ChainCheck": "parity_sandbox.audit",
    "EventKind": "parity_sandbox._models",
    "SecurityEvent": "parity_sandbox._models",
    "verify_chain": "parity_sandbox.audit",
    "CacheSettings": "parity_sandbox._config",
    "CacheStats": "parity_sandbox._cache",
    "Config": "parity_sandbox._config",
    "DockerExecutor": "parity_sandbox.runtimes.docker.executor",
    "DockerSettings": "parity_sandbox._config",
    "EgressSettings": "parity_sandbox._config",
    "ErrorInfo": "parity_sandbox._models",
    "ExecutionError": "parity_sandbox._exceptions",
    "ExecutionTimeout": "parity_sandbox._exceptions",
    "Executor": "parity_sandbox._executor",
    "InvalidInput": "parity_sandbox._exceptions",
    "LaunchFailed": "parity_sandbox._exceptions",
    "LimitName": "parity_sandbox._models",
    "Metrics": "parity_sandbox.metrics",
    "MetricsSettings": "parity_sandbox._config",
    "Limits": "parity_sandbox._models",
    "Network": "parity_sandbox._models",
    "NetworkConnection": "parity_sandbox._models",
    "PoolProfile": "parity_sandbox._config",
    "PoolSettings": "parity_sandbox._config",
    "PreparedTask": "parity_sandbox._executor",
    "RunReport": "parity_sandbox._executor",
    "RayExecutor": "parity_sandbox.cluster.executor",
    "RaySettings": "parity_sandbox._config",
    "Record": "parity_sandbox._record",
    "RemoteExecutor": "parity_sandbox.remote",
    "RedisCache": "parity_sandbox._cache",
    "ResourceLimitExceeded": "parity_sandbox._exceptions",
    "ResourceUsage": "parity_sandbox._models",
    "Result": "parity_sandbox._models",
    "RuntimeSettings": "parity_sandbox._config",
    "ServiceSettings": "parity_sandbox._config",
    "WebhookSettings": "parity_sandbox._config",
    "ResultCache": "parity_sandbox._cache",
    "RuntimeInfo": "parity_sandbox._models",
    "RuntimeUnavailable": "parity_sandbox._exceptions",
    "SandboxError": "parity_sandbox._exceptions",
    "SqliteCache": "parity_sandbox._cache",
    "Status": "parity_sandbox._models",
    "Task": "parity_sandbox._models",
    "TaskError": "parity_sandbox._exceptions",
    "TaskFailed": "parity_sandbox._exceptions",
    "Verification": "parity_sandbox._record",
    "WasmExecutor": "parity_sandbox.runtimes.wasm.executor",
    "WasmSettings": "parity_sandbox._config",
    "load_config": "parity_sandbox._config",
    "open_cache": "parity_sandbox._cache",
    "portable": "parity_sandbox._executor",
    "read_tasks": "parity_sandbox._batch",
    "run_batch": "parity_sandbox._batch",
    "spec_hash": "parity_sandbox._executor",
    "verify": "parity_sandbox._record",
}

__version__ = "0.1.0"

__all__ = [
    "AuditLog",
    "AuditSettings",
    "BrokenEntry",
    "CacheSettings",
    "CacheStats",
    "ChainCheck",
    "Config",
    "DockerExecutor",
    "DockerSettings",
    "EgressSettings",
    "ErrorInfo",
    "EventKind",
    "ExecutionError",
    "ExecutionTimeout",
    "Executor",
    "InvalidInput",
    "LaunchFailed",
    "LimitName",
    "Limits",
    "Metrics",
    "MetricsSettings",
    "Network",
    "NetworkConnection",
    "PoolProfile",
    "PoolSettings",
    "PreparedTask",
    "RayExecutor",
    "RaySettings",
    "Record",
    "RedisCache",
    "RemoteExecutor",
    "ResourceLimitExceeded",
    "ResourceUsage",
    "Result",
    "ResultCache",
    "RunReport",
    "RuntimeInfo",
    "RuntimeSettings",
    "RuntimeUnavailable",
    "SandboxError",
    "SecurityEvent",
    "ServiceSettings",
    "SqliteCache",
    "Status",
    "Task",
    "TaskError",
    "TaskFailed",
    "Verification",
    "WasmExecutor",
    "WasmSettings",
    "WebhookSettings",
    "__version__",
    "load_config",
    "open_cache",
    "portable",
    "read_tasks",
    "run_batch",
    "spec_hash",
    "verify",
    "verify_chain",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'parity_sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
