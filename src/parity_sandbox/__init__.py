"""parity-sandbox: run untrusted compute tasks with hard limits and hardened defaults.

from parity_sandbox import Task, WasmExecutor

with WasmExecutor() as executor:
    result = executor.execute(Task(wasm_file="hello.wasm", input=b"data"))
    print(result.status, result.stdout_text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from parity_sandbox._batch import read_tasks, run_batch
from parity_sandbox._cache import CacheStats, RedisCache, ResultCache, SqliteCache, open_cache
from parity_sandbox._config import (
    CacheSettings,
    Config,
    DockerSettings,
    PoolProfile,
    PoolSettings,
    WasmSettings,
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
from parity_sandbox._executor import Executor, PreparedTask
from parity_sandbox._models import (
    ErrorInfo,
    LimitName,
    Limits,
    ResourceUsage,
    Result,
    RuntimeInfo,
    Status,
    Task,
)
from parity_sandbox._record import Record, Verification, verify

if TYPE_CHECKING:
    from parity_sandbox.runtimes.docker import DockerExecutor
    from parity_sandbox.runtimes.wasm import WasmExecutor

__version__ = "0.1.0"

__all__ = [
    "CacheSettings",
    "CacheStats",
    "Config",
    "DockerExecutor",
    "DockerSettings",
    "ErrorInfo",
    "ExecutionError",
    "ExecutionTimeout",
    "Executor",
    "InvalidInput",
    "LaunchFailed",
    "LimitName",
    "Limits",
    "PoolProfile",
    "PoolSettings",
    "PreparedTask",
    "Record",
    "RedisCache",
    "ResourceLimitExceeded",
    "ResourceUsage",
    "Result",
    "ResultCache",
    "RuntimeInfo",
    "RuntimeUnavailable",
    "SandboxError",
    "SqliteCache",
    "Status",
    "Task",
    "TaskError",
    "TaskFailed",
    "Verification",
    "WasmExecutor",
    "WasmSettings",
    "__version__",
    "load_config",
    "open_cache",
    "read_tasks",
    "run_batch",
    "verify",
]


def __getattr__(name: str) -> Any:
    # Executors are imported on first use, so `import parity_sandbox` stays light.
    if name == "WasmExecutor":
        from parity_sandbox.runtimes.wasm import WasmExecutor

        return WasmExecutor
    if name == "DockerExecutor":
        from parity_sandbox.runtimes.docker import DockerExecutor

        return DockerExecutor
    raise AttributeError(f"module 'parity_sandbox' has no attribute {name!r}")
