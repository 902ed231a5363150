"""Batches: a file of tasks, one JSON document per line, run across the runtimes they name.

A line is a task in its record form (see :mod:`._record`): ``Task`` fields, with ``stdin``,
``wasm_module`` and input file contents in base64, so a line never makes the host read a file
other than a ``wasm_file``. A line that is not a task becomes an ``error`` result in its place;
the batch goes on.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Callable, Generator, Iterable, Iterator

from parity_sandbox._config import Config
from parity_sandbox._exceptions import InvalidInput, SandboxError
from parity_sandbox._executor import Executor, available_memory, run_all
from parity_sandbox._models import Result, Task
from parity_sandbox._record import task_from_document
from parity_sandbox.runtimes import executor_class

#: The longest line read as a task (input files travel inside it).
MAX_LINE_BYTES = 256 << 20


def read_tasks(lines: Iterable[bytes]) -> Iterator[Task | InvalidInput]:
    """The tasks of a JSON-lines file, or for a bad line the error that names it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        yield _task_of(line, number)


def _task_of(line: bytes, number: int) -> Task | InvalidInput:
    where = f"line {number}"
    if len(line) > MAX_LINE_BYTES:
        return InvalidInput(f"{where}: longer than {MAX_LINE_BYTES >> 20} MiB", field=where)
    try:
        document = json.loads(line)
    except ValueError as exc:
        return InvalidInput(f"{where}: not JSON: {exc}", field=where)
    if not isinstance(document, dict):
        return InvalidInput(f"{where}: a task is a JSON object", field=where)
    try:
        return task_from_document(document)
    except InvalidInput as exc:
        return InvalidInput(f"{where}: {exc.message}", field=exc.field)
    except (binascii.Error, ValueError, TypeError) as exc:
        return InvalidInput(f"{where}: {exc}", field=where)


def run_batch(
    tasks: Iterable[Task | InvalidInput],
    config: Config,
    *,
    max_parallel: int | None = None,
    memory_budget: int | None = None,
    make_executor: Callable[[str], Executor] | None = None,
) -> Generator[Result, None, None]:
    """Run ``tasks`` (each on the runtime it names, else the default), yielding results in
    order; each runtime's executor is made on first use (by ``make_executor(runtime)``, by
    default the runtime's own class) and closed at the end."""
    executors: dict[str, Executor] = {}
    make = make_executor or (lambda name: executor_class(name)(config))

    def placed(
        items: Iterable[Task | InvalidInput],
    ) -> Iterator[tuple[Executor | None, Task | SandboxError]]:
        for item in items:
            if isinstance(item, SandboxError):
                yield None, item
                continue
            name = item.runtime_name or config.default_runtime
            try:
                if name not in executors:
                    executors[name] = make(name)
            except SandboxError as exc:
                yield None, exc
                continue
            yield executors[name], item

    try:
        yield from run_all(
            placed(tasks),
            width=max_parallel or 2 * (os.cpu_count() or 1),
            memory_budget=memory_budget if memory_budget is not None else available_memory(),
        )
    finally:
        for executor in executors.values():
            executor.close()
