"""``RemoteExecutor``: the executor contract over a ``parity-sandbox serve`` service.

Code written for a local executor runs against a service unchanged: ``execute``, ``submit``,
``map``, ``execute_async`` and ``close`` behave as they do locally, and errors come back as the
same exception types (a timeout is ``ExecutionTimeout`` with the partial result, a rejected
task ``InvalidInput`` naming its field). A task travels in its portable form: its files read
here once and sent as bytes, its limits resolved under this executor's configuration, so the
service computes the same spec hash as ``prepare`` does here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from typing import Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"RemoteExecutor needs httpx: pip install 'parity-sandbox[remote]' ({exc})"
    ) from exc

from parity_sandbox._cache import ResultCache
from parity_sandbox._config import Config
from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable
from parity_sandbox._executor import Cancelled, Executor, PreparedTask, portable
from parity_sandbox._models import ErrorInfo, Result, Status, Task
from parity_sandbox._record import _task_document

#: The variable that holds the service's API key, when none is given.
API_KEY_ENV = "PARITY_SANDBOX_API_KEY"
#: Seconds one request waits for a task to end (the service bounds it too).
LONG_POLL = 30.0
#: How long a task may wait for room at a busy service (429, 503) before that is an error.
BUSY_TIMEOUT = 300.0
_ENDED = ("queued", "running")


class RemoteExecutor(Executor):
    """Runs tasks on a parity-sandbox service.

    Args:
        url: the service, e.g. ``http://127.0.0.1:8080``.
        api_key: its API key (default: ``$PARITY_SANDBOX_API_KEY``).
        config: resolves the tasks' limits before they are sent (default ``Config()``);
            its result cache, if enabled, answers repeated cacheable tasks here.
        max_parallel: tasks in flight at once from ``map`` and ``submit``.

    Raises:
        RuntimeUnavailable: no API key was given.
    """

    runtime_name = "remote"

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        config: Config | None = None,
        max_parallel: int = 16,
        cache: ResultCache | None = None,
        timeout: float = 60.0,
    ) -> None:
        key = api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise RuntimeUnavailable(
                f"a RemoteExecutor needs an API key: give api_key= or set {API_KEY_ENV}"
            )
        super().__init__(config, cache=cache)
        self.url = url.rstrip("/")
        self._width = max(1, max_parallel)
        #: What the entry point running in this thread was asked (``use_cache``).
        self._asked = threading.local()
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(timeout, read=LONG_POLL + timeout),
        )

    def max_parallel(self) -> int:
        return self._width

    def _close(self) -> None:
        self._client.close()

    # -- the contract ----------------------------------------------------------------------

    def _prepare(self, task: Task) -> PreparedTask:
        """The task as the service will run it: files read here, once, and embedded; limits
        resolved under this executor's configuration."""
        runtime = task.runtime_name or self.config.default_runtime
        sent = portable(task, self.config)
        if sent.image is None:
            assert sent.wasm_module is not None
            program = hashlib.sha256(sent.wasm_module).hexdigest()
        else:
            program = sent.image  # the service resolves the tag to an id
        body = json.dumps(_task_document(sent), separators=(",", ":")).encode()
        return PreparedTask(task, runtime, sent.limits, program, sent.embedded_inputs(), form=body)

    def _execute_cached(
        self, item: Task | PreparedTask, cancel: threading.Event | None, *, use_cache: bool = True
    ) -> Result:
        # The service has a result cache of its own: ``use_cache=False`` goes there too.
        self._asked.use_cache = use_cache
        return super()._execute_cached(item, cancel, use_cache=use_cache)

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        if not isinstance(prepared.form, bytes):
            raise InvalidInput(
                "task: prepared by another executor; prepare it with this one", field="task"
            )
        use_cache = getattr(self._asked, "use_cache", True)
        view = self._submit(prepared.form, cancel, use_cache)
        task_id = view["id"]
        while view["state"] in _ENDED:
            if cancel is not None and cancel.is_set():
                self._request("POST", f"/v1/tasks/{task_id}/cancel")
                raise Cancelled("the task was cancelled")
            wait = 0.5 if cancel is not None else LONG_POLL
            view = self._request("GET", f"/v1/tasks/{task_id}", params={"wait": wait}).json()
        if view.get("result") is not None:
            return Result.from_json(json.dumps(view["result"]))
        task = prepared.task
        return Result(
            status=Status.ERROR,
            error=ErrorInfo(
                type="ExecutionError",
                message=f"the service says the task was {view['state']}: {view.get('reason')}",
            ),
            task_id=task.id,
            labels=task.labels,
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _submit(
        self, body: bytes, cancel: threading.Event | None, use_cache: bool
    ) -> dict[str, Any]:
        """POST the task; wait out a busy service (429, 503) as it asks, for a while."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            response = self._request(
                "POST",
                "/v1/tasks",
                content=body,
                params={
                    "wait": 0.5 if cancel is not None else LONG_POLL,
                    "use_cache": "true" if use_cache else "false",
                },
                busy_ok=True,
            )
            if response.status_code not in (429, 503):
                view: dict[str, Any] = response.json()
                return view
            pause = _retry_after(response)
            if time.monotonic() + pause > deadline:
                raise RuntimeUnavailable(
                    f"the service at {self.url} stayed busy for {BUSY_TIMEOUT:g} s: "
                    f"{_detail(response)}"
                )
            if cancel is not None and cancel.wait(pause):
                raise Cancelled("the task was cancelled")
            if cancel is None:
                time.sleep(pause)

    def _request(
        self, method: str, path: str, *, busy_ok: bool = False, **options: Any
    ) -> httpx.Response:
        """One request; the service's problems raised as the library's errors."""
        self._check_open()
        try:
            response = self._client.request(method, path, **options)
        except httpx.HTTPError as exc:
            raise RuntimeUnavailable(f"cannot reach the service at {self.url}: {exc}") from exc
        status = response.status_code
        if status < 400 or (busy_ok and status in (429, 503)):
            return response
        detail = _detail(response)
        if status in (400, 409, 413, 422):
            field = None
            with contextlib.suppress(ValueError):
                field = response.json().get("field")
            raise InvalidInput(detail, field=field)
        if status == 401:
            raise RuntimeUnavailable(f"the service at {self.url} refused the API key: {detail}")
        raise RuntimeUnavailable(f"the service at {self.url} answered {status}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail") or response.text)
    except ValueError:
        return response.text[:500]


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "1")
    return min(max(float(value), 0.1), 30.0) if value.replace(".", "", 1).isdigit() else 1.0
