"""A fake runtime for ``tests/test_runtime_registry.py``: it "runs" a module task by echoing its
arguments, stdin and input file names, and writes the same into one output file.

It sandboxes nothing and stands in for no real runtime: it shows that a runtime plugs into the
contract with one ``Executor`` subclass and one registry line, and nothing else.
"""

from __future__ import annotations

import threading
from typing import Any

from parity_sandbox import Executor, PreparedTask, Result, RunReport, RuntimeInfo, Status, Task


class FakeExecutor(Executor):
    runtime_name = "fake"
    applied_limits = frozenset({"memory", "timeout", "output", "input"})
    ignored_because = "the fake runtime runs nothing"

    @classmethod
    def _spec_fields(cls, task: Task) -> dict[str, Any]:
        return {"fake": {"echo": True}}  # what this runtime adds to a task's spec document

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        task = prepared.task
        said = b"%s|%s|%s" % (
            " ".join(task.args).encode(),
            task.input,
            ",".join(sorted(prepared.inputs)).encode(),
        )
        runtime = RuntimeInfo(name="fake", version="1", module_sha256=prepared.program)
        report = RunReport(
            status=Status.SUCCEEDED,
            runtime=runtime,
            exit_code=0,
            stdout=said,
            files={"out/said": said},
        )
        return prepared.result(report)
