"""A fake runtime for ``tests/test_runtime_registry.py``: it "runs" a module task by echoing its
arguments, stdin and input file names, and writes the same into one output file.

It sandboxes nothing and stands in for no real runtime: it shows that a runtime plugs into the
contract with one ``Executor`` subclass and one registry line, and nothing else.
"""

from __future__ import annotations

import threading

from parity_sandbox import Executor, PreparedTask, Result, RuntimeInfo, Status


class FakeExecutor(Executor):
    runtime_name = "fake"
    applied_limits = frozenset({"memory", "timeout", "output", "input"})
    ignored_because = "the fake runtime runs nothing"

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        task = prepared.task
        said = b"%s|%s|%s" % (
            " ".join(task.args).encode(),
            task.input,
            ",".join(sorted(prepared.inputs)).encode(),
        )
        return Result(
            status=Status.SUCCEEDED,
            exit_code=0,
            stdout=said,
            files={"out/said": said},
            runtime=RuntimeInfo(name="fake", version="1", module_sha256=prepared.program),
            task_id=task.id,
            labels=task.labels,
        )
