"""The exceptions of parity-sandbox.

Every exception the library raises is a :class:`SandboxError`; no ``wasmtime``, ``docker`` or
``pydantic`` exception reaches a caller. Errors of a task that ran carry its partial
:class:`~parity_sandbox.Result` (the output captured so far) as ``.result``.

The tree::

    SandboxError                    .result: Result | None, .exit_code (for the CLI)
    ├── InvalidInput                rejected before anything ran; .field names the culprit
    ├── RuntimeUnavailable          the runtime cannot run tasks here (missing, daemon down, ...)
    └── TaskError                   the task ran and did not end normally
        ├── ExecutionTimeout        the wall-clock limit passed; the task was killed
        ├── ResourceLimitExceeded   .limit: "memory", "fuel", "stack", "disk", "file_size",
        │                           "pids"
        ├── ExecutionError          the task crashed (a trap) or its worker died
        ├── LaunchFailed            the task's program never started (not found, not runnable)
        └── TaskFailed              raised only by Result.raise_for_status() on a non-zero exit

A non-zero exit is a normal :class:`~parity_sandbox.Result` with ``status == "failed"``;
``execute()`` returns it and only ``Result.raise_for_status()`` turns it into ``TaskFailed``.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

    from parity_sandbox._models import Result

__all__ = [
    "ExecutionError",
    "ExecutionTimeout",
    "InvalidInput",
    "LaunchFailed",
    "ResourceLimitExceeded",
    "RuntimeUnavailable",
    "SandboxError",
    "TaskError",
    "TaskFailed",
]


class SandboxError(Exception):
    """Base of every error raised by parity-sandbox."""

    #: Exit code of the ``parity-sandbox`` CLI when this error ends a command.
    exit_code: ClassVar[int] = 125

    def __init__(self, message: str, *, result: Result | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


class InvalidInput(SandboxError):
    """A task, limit or configuration value was rejected before anything ran."""

    exit_code: ClassVar[int] = 65

    def __init__(
        self, message: str, *, field: str | None = None, result: Result | None = None
    ) -> None:
        super().__init__(message, result=result)
        self.field = field

    @classmethod
    def from_validation(
        cls, exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
    ) -> InvalidInput:
        """Turn pydantic's report into one message that names each field, value and form.

        ``model`` is the model that was validated; with it, an unknown key's message lists the
        keys accepted in its place.
        """
        problems: list[str] = []
        first_field: str | None = None
        folded: frozenset[str] = getattr(model, "folded_fields", frozenset())
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            if len(loc) > 1 and loc[0] in folded:
                loc = loc[1:]  # the model reads these entries from the document's top level
            field = ".".join(str(part) for part in (prefix, *loc) if part != "")
            first_field = first_field or field
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
                accepted = _accepted_keys(model, error["loc"][:-1])
                if accepted:
                    message += f"; accepted keys: {', '.join(accepted)}"
            shown = _shorten(repr(error.get("input")))
            problems.append(f"{field or prefix or 'value'}: {message} (got {shown})")
        return cls("; ".join(problems), field=first_field)


class RuntimeUnavailable(SandboxError):
    """The runtime asked for cannot run tasks on this machine; the message says how to fix it."""

    exit_code: ClassVar[int] = 125


class TaskError(SandboxError):
    """The task ran and did not end normally; ``.result`` holds what it produced."""


class ExecutionTimeout(TaskError):
    """The task ran past its wall-clock limit and was stopped."""

    exit_code: ClassVar[int] = 124


class ResourceLimitExceeded(TaskError):
    """The task hit a resource limit; ``.limit`` names which one."""

    exit_code: ClassVar[int] = 123

    def __init__(self, limit: str, message: str, *, result: Result | None = None) -> None:
        super().__init__(message, result=result)
        self.limit = limit


class ExecutionError(TaskError):
    """The task crashed (a WebAssembly trap) or the process running it died."""

    exit_code: ClassVar[int] = 126


class LaunchFailed(TaskError):
    """The task's program could not be started: its command was not found or cannot be
    executed, or its working directory does not exist. Nothing of the task ran, so its exit
    code is not one the program chose (a command that exits 127 itself is ``failed``)."""

    exit_code: ClassVar[int] = 122


class TaskFailed(TaskError):
    """The task exited with a non-zero code (raised by ``Result.raise_for_status()`` only)."""

    exit_code: ClassVar[int] = 1


def _accepted_keys(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc``, if ``loc`` leads to a model."""
    parts = iter(loc)
    for part in parts:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) is dict:  # a mapping of models: skip the entry's key
            annotation = typing.get_args(annotation)[1]
            if next(parts, None) is None:
                return []
        model = (
            annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields")
            else None
        )
    return sorted(model.model_fields) if model is not None else []


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
