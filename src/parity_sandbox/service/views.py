"""How the API shows a task (the same in a response and in a webhook)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from parity_sandbox.service.store import TaskRow


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")


def task_view(row: TaskRow, *, with_result: bool = True) -> dict[str, Any]:
    """A task as the API shows it; ``result`` is the ``Result`` as ``Result.to_json`` writes
    it (bytes in base64), so clients rebuild it exactly."""
    view: dict[str, Any] = {
        "id": row.id,
        "state": row.state,
        "runtime": row.runtime,
        "attempts": row.attempts,
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "ended_at": _iso(row.ended_at),
        "reason": row.reason,
    }
    if with_result:
        view["result"] = json.loads(row.result) if row.result is not None else None
    return view


def task_json(row: TaskRow) -> bytes:
    """``task_view(row)`` as JSON, the stored result spliced in as it is (not parsed and
    written again: it is ``Result.to_json()`` already)."""
    head = json.dumps(task_view(row, with_result=False), separators=(",", ":")).encode()
    return b"".join((head[:-1], b',"result":', row.result or b"null", b"}"))
