"""Run records: a task and its result in one JSON file, so that anyone can re-run and compare.

A record is self-contained: the module and the input files are embedded (base64), the limits
are the resolved ones, and a Docker image is named by its id. ``verify`` re-runs the task and
compares result hashes::

    {"v": 1, "kind": "parity-sandbox-record",
     "task": {...Task fields; wasm_module, stdin and input files as base64...},
     "spec_hash": HEX, "result": {...Result.to_json()...}, "result_hash": HEX}
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity_sandbox._exceptions import InvalidInput, TaskError
from parity_sandbox._executor import Executor
from parity_sandbox._models import Result, Task

KIND = "parity-sandbox-record"
VERSION = 1
MAX_RECORD_BYTES = 2 << 30
_BYTES_FIELDS = ("wasm_module", "input")


@dataclass(frozen=True)
class Record:
    """A task as it ran, with its spec hash and its result."""

    task: Task
    spec_hash: str
    result: Result

    def to_json(self) -> str:
        document = {
            "v": VERSION,
            "kind": KIND,
            "task": _task_document(self.task),
            "spec_hash": self.spec_hash,
            "result": json.loads(self.result.to_json()),
            "result_hash": self.result.result_hash,
        }
        return json.dumps(document, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        """Read a record; raises ``InvalidInput`` naming what is wrong with it."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"record: not JSON: {exc}", field="record") from None
        if not isinstance(document, dict) or document.get("kind") != KIND:
            raise InvalidInput("record: not a parity-sandbox run record", field="record")
        if document.get("v") != VERSION:
            raise InvalidInput(
                f"record: version {document.get('v')!r}; this release reads {VERSION}",
                field="record",
            )
        try:
            task = task_from_document(document["task"])
            result = Result.from_json(json.dumps(document["result"]))
            spec_hash = str(document["spec_hash"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"record: malformed ({exc})", field="record") from None
        if result.result_hash != document.get("result_hash"):
            raise InvalidInput(
                "record: its result does not match its result_hash (edited or damaged)",
                field="record",
            )
        return cls(task=task, spec_hash=spec_hash, result=result)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Record:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_RECORD_BYTES + 1)
        except OSError as exc:
            raise InvalidInput(f"record: cannot read {path}: {exc.strerror}") from None
        if len(data) > MAX_RECORD_BYTES:
            raise InvalidInput(f"record: {path} is larger than 2 GiB", field="record")
        return cls.from_json(data)


def _unb64(text: str | bytes) -> bytes:
    """Base64 to bytes, refusing anything but the alphabet and its padding (``ValueError``)."""
    return binascii.a2b_base64(text, strict_mode=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _task_document(task: Task) -> dict[str, Any]:
    document = task.model_dump(mode="json", exclude={*_BYTES_FIELDS, "input_files", "wasm_file"})
    for name in _BYTES_FIELDS:
        value = getattr(task, name)
        document[name] = None if value is None else _b64(value)
    document["input_files"] = {
        name: _b64(content) for name, content in task.embedded_inputs().items()
    }
    return document


def task_from_document(document: dict[str, Any], **raw: bytes) -> Task:
    """A task from its record form (bytes and input files as base64; never a host path for an
    input file); ``raw`` gives fields as bytes already. Raises ``InvalidInput`` (from
    ``Task``) or ``ValueError`` (bad base64)."""
    fields = dict(document)
    for name in (*_BYTES_FIELDS, "stdin", "Input"):  # the aliases of ``input``
        if fields.get(name) is not None:
            fields[name] = _unb64(fields[name])
    fields.update(raw)
    input_files = fields.get("input_files") or {}
    if not isinstance(input_files, dict):
        raise InvalidInput("input_files: an object of name -> base64", field="input_files")
    fields["input_files"] = {name: _unb64(content) for name, content in input_files.items()}
    return Task(**fields)


@dataclass(frozen=True)
class Verification:
    """The outcome of re-running a record's task."""

    matched: bool
    expected: str
    actual: str
    result: Result


def verify(record: Record, executor: Executor) -> Verification:
    """Re-run ``record``'s task on ``executor`` and compare result hashes.

    Raises:
        InvalidInput: the record's task does not match its spec hash (it was edited).
        RuntimeUnavailable: the runtime (or a Docker task's image) is not here.
    """
    if executor.spec_hash(record.task) != record.spec_hash:
        raise InvalidInput(
            "record: its task does not match its spec_hash (edited or damaged)", field="record"
        )
    try:
        result = executor.execute(record.task, use_cache=False)  # verifying means running
    except TaskError as error:
        if error.result is None:
            raise
        result = error.result
    expected = record.result.result_hash
    return Verification(result.result_hash == expected, expected, result.result_hash, result)
