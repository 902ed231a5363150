"""The WebAssembly runtime: WASI preview 1 modules under wasmtime, in worker processes.

- ``executor``: ``WasmExecutor`` (the parent side): preparation, the ``map`` scheduler (lanes
  of flights per worker, memory admission), partial-output recovery, results.
- ``modules``: module files (read and hashed once while unchanged).
- ``deadlines``: flights (a task on a worker) and the thread that kills at the deadline.
- ``pool``: worker processes (start, ready, kill), the pool, reaping stale roots.
- ``protocol``: the messages between parent and workers (marshal, never pickle).
- ``worker``: the worker process itself.

Nothing is imported here: a worker process imports ``worker`` and what it needs, never the
executor (and so never the data model or the configuration).
"""
