"""The HTTP API: tasks in, results out, per API key; a thin adapter over the store and the
dispatcher.

Every error is ``application/problem+json`` (RFC 9457) naming the field or the reason; a
client's request never gets a traceback or a 500. A key sees only its own tasks: another
key's task id is answered exactly as an unknown one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.resources
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from http import HTTPStatus
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import parity_sandbox
from parity_sandbox import runtimes
from parity_sandbox._config import Config
from parity_sandbox._egress import AllowList
from parity_sandbox._exceptions import InvalidInput, SandboxError
from parity_sandbox._models import Task
from parity_sandbox._record import task_from_document
from parity_sandbox._units import format_size
from parity_sandbox.runtimes import executor_class
from parity_sandbox.service.dispatch import Dispatcher
from parity_sandbox.service.store import (
    STATES,
    Conflict,
    Key,
    NewTask,
    QuotaExceeded,
    Store,
    TaskRow,
)
from parity_sandbox.service.views import task_json, task_view
from parity_sandbox.service.webhooks import public_address_problem

log = logging.getLogger("parity_sandbox.service")

PROBLEM = "application/problem+json"
#: An ``application/problem+json`` body (RFC 9457), as ``Problem.response`` writes it.
_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": "string"},
    },
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the problems a route answers with (documented, so clients and
    schema-driven tests know them)."""
    return {
        code: {
            "description": HTTPStatus(code).phrase,
            "content": {PROBLEM: {"schema": _PROBLEM_SCHEMA}},
        }
        for code in codes
    }


#: A task as ``POST /v1/tasks`` takes it: the record form of ``Task`` (bytes in base64).
_TASK_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "wasm_module": {"type": "string", "contentEncoding": "base64"},
        "wasm_module_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "image": {"type": "string"},
        "args": {"type": "array", "items": {"type": "string"}},
        "command": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "stdin": {"type": "string", "contentEncoding": "base64"},
        "input_files": {
            "type": "object",
            "additionalProperties": {"type": "string", "contentEncoding": "base64"},
        },
        "outputs": {"type": "array", "items": {"type": "string"}},
        "required_outputs": {"type": "array", "items": {"type": "string"}},
        "workdir": {"type": "string"},
        "entry": {"type": "string"},
        "entry_exit": {"type": "string"},
        "network": {
            "oneOf": [
                {"type": "string", "enum": ["none"]},
                {
                    "type": "object",
                    "properties": {"allow": {"type": "array", "items": {"type": "string"}}},
                },
            ]
        },
        "limits": {"type": "object"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "id": {"type": "string"},
        "runtime": {"type": "string"},
        "deterministic": {"type": "boolean"},
        "cacheable": {"type": "boolean"},
        "callback_url": {"type": "string", "format": "uri", "maxLength": 2048},
    },
}


#: A JSON object (a task as ``task_view`` shows it).
_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


def _body(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def _binary(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": description,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


#: The most tasks one page of ``GET /v1/tasks`` lists.
MAX_PAGE = 1000
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_MAX_URL = 2048
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The most tasks one ``POST /v1/batches`` carries.
MAX_BATCH = 1000
#: Seconds between looks at a task whose events a client follows.
POLL_EVENTS = 0.5


class Problem(Exception):
    """An answer other than success: its status, a title, and what to fix."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(body, self.status, headers=self.headers, media_type=PROBLEM)


def _not_found() -> Problem:
    return Problem(404, "Not Found", "no such task")


async def authenticated(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Key:
    """The key the request carries, or 401 (none, unknown or revoked: the same answer)."""
    secret = x_api_key
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        secret = value.strip() if scheme.lower() == "bearer" else None
    key = None
    if secret and len(secret) <= 256:
        store: Store = request.app.state.store
        key = await store.run(store.authenticate, secret)
    if key is None:
        raise Problem(
            401,
            "Unauthorized",
            "send a live API key: Authorization: Bearer KEY (or X-API-Key: KEY)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key


KeyDep = Annotated[Key, Depends(authenticated)]


async def administrator(key: KeyDep) -> Key:
    """The key the request carries if it is an admin key; 403 for another live key."""
    if not key.admin:
        raise Problem(403, "Forbidden", "this needs an admin key (keys create --admin)")
    return key


AdminDep = Annotated[Key, Depends(administrator)]

#: The dashboard's own files, served from the package (``static/``; no build step).
STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "text/javascript; charset=utf-8",
}
#: What the dashboard's page may load and run: its own files only.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def create_app(config: Config, store: Store, dispatcher: Dispatcher) -> FastAPI:
    """The API over ``store``, running tasks with ``dispatcher`` (started with the app)."""
    settings = config.service

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.stop()

    app = FastAPI(
        title="parity-sandbox",
        version=parity_sandbox.__version__,
        description="Run untrusted tasks in WebAssembly or Docker sandboxes.",
        lifespan=lifespan,
    )
    app.state.store = store
    metrics = dispatcher.metrics
    audit = dispatcher.audit
    static_dir = importlib.resources.files("parity_sandbox.service") / "static"
    static_files = {name: (static_dir / name).read_bytes() for name in STATIC}

    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, first = [], None
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"][1:]) or str(error["loc"][0])
            first = first or where
            problems.append(f"{where}: {error['msg']}")
        return Problem(422, "Invalid Request", "; ".join(problems), field=first).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error")
        headers = dict(exc.headers or {})  # 405's Allow
        return Problem(exc.status_code, title, str(exc.detail), headers=headers).response()

    @app.exception_handler(Exception)
    async def _defect(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return Problem(500, "Internal Error", "the server failed; see its log").response()

    async def find_modules(key: Key, documents: list[Any]) -> dict[str, bytes]:
        found = {}
        for digest in _module_hashes(documents):
            module = store.cached_module(key.id, digest)
            if module is None:
                module = await store.run(store.module, key, digest)
            if module is not None:
                found[digest] = module
        return found

    async def waited(row: TaskRow, key: Key, seconds: float) -> TaskRow:
        """The task once it has ended, or as it is after ``seconds``."""
        ended = await dispatcher.wait(row.id, seconds)
        if ended is not None:
            return ended
        now = await store.run(store.task, row.id, key)
        return now if now is not None else row

    async def check_budget(key: Key) -> None:
        """429 until the next UTC day once the key's tasks used its CPU seconds for today."""
        budget = key.cpu_seconds_per_day
        if budget is None:
            return
        now = time.time()
        day = now - now % 86400
        used = await store.run(store.cpu_seconds_since, key, day)
        if used >= budget:
            raise Problem(
                429,
                "Too Many Requests",
                f"this key used {used:.1f} of its {budget:g} CPU seconds for today (UTC)",
                headers={"Retry-After": str(int(day + 86400 - now) + 1)},
            )

    async def check_callback(url: str | None, where: str) -> None:
        if url is None or settings.webhooks.allow_private:
            return
        problem = await asyncio.to_thread(public_address_problem, url)
        if problem is not None:
            raise Problem(
                422,
                "Invalid Request",
                f"{where}callback_url: {problem} (an operator may allow that: "
                "service.webhooks.allow_private)",
                field=f"{where}callback_url",
            )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={503: {"description": "Not ready", "content": {"application/json": {}}}},
    )
    async def readyz() -> JSONResponse:
        """Ready when the store answers and the default runtime runs tasks."""
        store_ok = await store.run(store.ping)
        ready = store_ok and dispatcher.ready
        body = {"status": "ready" if ready else "not ready", "store": store_ok}
        body["runtime"] = dispatcher.ready
        return JSONResponse(body, 200 if ready else 503)

    diagnosed: dict[str, tuple[float, dict[str, Any]]] = {}

    async def runtime_health() -> list[dict[str, Any]]:
        """What ``parity-sandbox doctor`` says of each runtime (checked at most every 30 s)."""
        found = []
        for name in runtimes.names():
            stamp, entry = diagnosed.get(name, (0.0, {}))
            if time.monotonic() - stamp > 30:
                try:
                    ok, detail = await asyncio.to_thread(executor_class(name).diagnose, config)
                except SandboxError as exc:  # a runtime that cannot even be loaded
                    ok, detail = False, exc.message
                entry = {"name": name, "ok": ok, "detail": detail}
                diagnosed[name] = (time.monotonic(), entry)
                if metrics is not None:
                    metrics.set_runtime_up(name, ok)
            found.append(entry)
        return found

    @app.get("/v1/runtimes", tags=["runtimes"], responses=_problems(401, 422))
    async def list_runtimes(_key: KeyDep) -> dict[str, Any]:
        """What ``parity-sandbox doctor`` says of each runtime (checked at most every 30 s)."""
        return {"default": config.default_runtime, "runtimes": await runtime_health()}

    async def metrics_reader(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> None:
        """Anyone, with ``service.metrics_open``; else an admin key (401, 403)."""
        if not settings.metrics_open:
            await administrator(await authenticated(request, authorization, x_api_key))

    @app.get(
        "/metrics",
        tags=["monitoring"],
        response_class=Response,
        dependencies=[Depends(metrics_reader)],
        responses={
            200: {
                "description": "Prometheus' text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **_problems(401, 403, 422, 503),
        },
    )
    async def get_metrics() -> Response:
        """The service's metrics for Prometheus (an admin key unless
        ``service.metrics_open``): the executors' counts, the queue, per-key counts."""
        if metrics is None:
            raise Problem(
                503,
                "Service Unavailable",
                "metrics are off here: install the [monitoring] extra, or set "
                "metrics.enabled: true",
            )
        counts = await asyncio.to_thread(store.active_counts)
        metrics.service_state(
            queued=sum(count for _, state, count in counts if state == "queued"),
            running=sum(count for _, state, count in counts if state == "running"),
            limit=settings.max_queued,
            per_key={(name, state): count for name, state, count in counts},
        )
        body, content_type = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=content_type)

    @app.get("/v1/stats", tags=["monitoring"], responses=_problems(401, 403, 422))
    async def stats(_key: AdminDep) -> dict[str, Any]:
        """What the dashboard shows (an admin key): the queue, ends of the last hour by
        state, security events per minute (tasks that ended on this server), the keys that
        used the most CPU today (UTC), and each runtime's health."""
        now = time.time()
        counts = await asyncio.to_thread(store.active_counts)
        ended = await asyncio.to_thread(store.ended_since, now - 3600)
        top = await asyncio.to_thread(store.top_cpu_since, now - now % 86400)
        return {
            "time": now,
            "queued": sum(count for _, state, count in counts if state == "queued"),
            "running": sum(count for _, state, count in counts if state == "running"),
            "running_here": dispatcher.running_here,
            "queue_limit": settings.max_queued,
            "ended_last_hour": dict(sorted(ended.items())),
            "events_per_minute": dispatcher.timeline.series(now),
            "top_keys_by_cpu": [{"key": name, "cpu_seconds": used} for name, used in top],
            "runtimes": await runtime_health(),
            "audit_failures": audit.failures if audit is not None else 0,
        }

    @app.get("/dashboard", include_in_schema=False, response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The dashboard's page: a shell with no data of its own. Its script asks
        ``/v1/stats`` with the admin key given in the URL's fragment (``#key=...``, which a
        browser never sends to a server, so no server or proxy logs it) or typed into the
        page, kept in the tab's ``sessionStorage`` and sent as ``Authorization: Bearer``."""
        return HTMLResponse(static_files_html, headers=DASHBOARD_HEADERS)

    @app.get("/static/{name}", include_in_schema=False, response_class=Response)
    async def static(name: str) -> Response:
        """The dashboard's script, style sheet and chart library (vendored from npm)."""
        if name not in STATIC:
            raise Problem(404, "Not Found", "no such file")
        return Response(
            static_files[name],
            media_type=STATIC[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"},
        )

    static_files_html = (static_dir / "dashboard.html").read_text()

    @app.post(
        "/v1/tasks",
        status_code=202,
        tags=["tasks"],
        openapi_extra=_body("application/json", _TASK_BODY),
        responses={
            200: {"description": "It ended within wait", "content": {"application/json": {}}},
            **_problems(401, 403, 409, 413, 422, 429, 503),
        },
    )
    async def submit(
        request: Request,
        key: KeyDep,
        # A default, not Annotated: annotations are strings here, and settings is a local.
        wait: float | None = Query(
            None, ge=0, le=settings.max_wait, description="seconds to wait for the result"
        ),
        idempotency_key: Annotated[str | None, Header(pattern=r"^[\x21-\x7e]{1,255}$")] = None,
        use_cache: Annotated[
            bool, Query(description="false: run it even if the result cache has its result")
        ] = True,
    ) -> Response:
        """Queue a task (its ``Task`` fields in record form: bytes in base64), with an
        optional ``callback_url``. ``202`` and ``Location`` once it is stored; with
        ``?wait=SECONDS``, ``200`` and the result if it ends in time."""
        _check_wait(wait, settings.max_wait)
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise Problem(
                422,
                "Invalid Request",
                "Idempotency-Key: 1 to 255 printable ASCII characters",
                field="Idempotency-Key",
            )
        body = await _read_body(request, settings.max_body)
        document = _json_body(body)
        found = await find_modules(key, [document])
        parsed = _parse_task(document, config, found)
        _check_caps(key, parsed, config)
        await check_budget(key)
        await check_callback(parsed.callback_url, "")
        runtime, record, callback_url = parsed.runtime, parsed.record, parsed.callback_url
        # A free slot here: the task is stored running here and handed over as parsed.
        slots = dispatcher.take_slots(runtime, 1)
        handed = False

        def hand_over(row: TaskRow) -> None:
            nonlocal handed
            dispatcher.run_here(row, parsed.task)
            handed = True

        try:
            row, created = await store.run(
                store.add_task,
                key,
                runtime=runtime,
                task=record,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
                body_sha256=hashlib.sha256(body).hexdigest(),
                max_active=key.max_active or settings.max_active_per_key,
                max_queued=settings.max_queued,
                use_cache=use_cache,
                module=parsed.module,
                run_as=dispatcher.owner if slots else None,
                # SQLite's transactions run on the event loop: the run begins before the
                # commit and overlaps it, and no end of it is seen before the row is stored.
                # PostgreSQL's run in a thread, while the loop goes on: the run begins after.
                begin=hand_over if store.sqlite else None,
            )
            if created and row.state == "running" and not handed:
                hand_over(row)
        except Conflict:
            raise Problem(
                409,
                "Conflict",
                "Idempotency-Key: used before with another body",
                field="Idempotency-Key",
            ) from None
        except QuotaExceeded as exc:
            raise _quota_problem(exc) from None
        finally:
            dispatcher.give_back(runtime, 0 if handed else slots)
        if created and row.state == "queued":
            dispatcher.queued_here(row, parsed.task)
        if wait:
            row = await waited(row, key, wait)
        location = f"/v1/tasks/{row.id}"
        ended = row.state not in ("queued", "running")
        return Response(
            task_json(row),
            200 if ended and wait else 202,
            headers={"Location": location},
            media_type="application/json",
        )

    @app.post(
        "/v1/batches",
        status_code=202,
        tags=["tasks"],
        openapi_extra=_body(
            "application/json",
            {
                "type": "object",
                "required": ["tasks"],
                "properties": {
                    "tasks": {"type": "array", "items": _TASK_BODY, "minItems": 1, "maxItems": 1000}
                },
            },
        ),
        responses={
            200: {"description": "All ended within wait", "content": {"application/json": {}}},
            **_problems(401, 403, 413, 422, 429, 503),
        },
    )
    async def submit_batch(
        request: Request,
        key: KeyDep,
        wait: float | None = Query(
            None, ge=0, le=settings.max_wait, description="seconds to wait for all the results"
        ),
        use_cache: Annotated[bool, Query()] = True,
    ) -> Response:
        """Queue many tasks at once (``{"tasks": [...]}``, at most ``MAX_BATCH``): all are
        stored, or none (a bad one is 422 naming ``tasks[i].field``). The tasks come back
        in order; with ``?wait=SECONDS``, with their results if they end in time."""
        _check_wait(wait, settings.max_wait)
        body = await _read_body(request, settings.max_body)
        document = _json_body(body)
        items = document.get("tasks") if isinstance(document, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise Problem(
                422,
                "Invalid Request",
                f"tasks: a list of 1 to {MAX_BATCH} tasks",
                field="tasks",
            )
        found = await find_modules(key, items)
        parsed = [
            _parse_task(item, config, found, f"tasks[{index}].") for index, item in enumerate(items)
        ]
        for index, item in enumerate(parsed):
            _check_caps(key, item, config, f"tasks[{index}].")
            await check_callback(item.callback_url, f"tasks[{index}].")
        await check_budget(key)
        new = [
            NewTask(
                runtime=item.runtime,
                task=item.record,
                callback_url=item.callback_url,
                body_sha256=hashlib.sha256(item.record).hexdigest(),
                use_cache=use_cache,
                module=item.module,
            )
            for item in parsed
        ]
        # Free slots here: those tasks are stored running here and handed over as parsed.
        wanted = Counter(item.runtime for item in parsed)
        slots = {name: dispatcher.take_slots(name, count) for name, count in wanted.items()}
        unused = dict(slots)
        runs = []
        for item in parsed:
            runs.append(unused[item.runtime] > 0)
            unused[item.runtime] -= runs[-1]
        try:
            rows = await store.run(
                store.add_tasks,
                key,
                new,
                max_active=key.max_active or settings.max_active_per_key,
                max_queued=settings.max_queued,
                run_as=dispatcher.owner,
                runs=runs,
            )
            for row, item in zip(rows, parsed, strict=True):
                if row.state == "running":
                    dispatcher.run_here(row, item.task)
                    slots[row.runtime] -= 1
        except QuotaExceeded as exc:
            raise _quota_problem(exc) from None
        finally:
            for name, count in slots.items():
                dispatcher.give_back(name, count)
        for row, item in zip(rows, parsed, strict=True):
            if row.state == "queued":
                dispatcher.queued_here(row, item.task)
        if wait:
            deadline = asyncio.get_running_loop().time() + wait
            finished: dict[str, TaskRow] = {}
            for row in rows:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                end = await dispatcher.wait(row.id, left)
                if end is not None:
                    finished[row.id] = end
            unknown = [row.id for row in rows if row.id not in finished]
            if unknown:
                finished.update(await store.run(store.tasks_by_id, unknown))
            rows = [finished.get(row.id, row) for row in rows]
        ended = all(row.state not in ("queued", "running") for row in rows)
        body = b'{"tasks":[' + b",".join(task_json(row) for row in rows) + b"]}"
        return Response(body, 200 if wait and ended else 202, media_type="application/json")

    @app.put(
        "/v1/modules/{sha256}",
        tags=["modules"],
        openapi_extra=_body("application/octet-stream", {"type": "string", "format": "binary"}),
        responses={
            201: {"description": "Stored", "content": {"application/json": {}}},
            **_problems(401, 413, 422),
        },
    )
    async def put_module(
        sha256: Annotated[str, Path(pattern="^[0-9a-f]{64}$")], request: Request, key: KeyDep
    ) -> JSONResponse:
        """Keep a WebAssembly module (the raw bytes as the body) under its SHA-256, so that
        tasks name it by ``wasm_module_sha256`` instead of carrying it."""
        if not _SHA256.fullmatch(sha256):
            raise Problem(422, "Invalid Request", "sha256: 64 lowercase hex digits", field="sha256")
        module = await _read_body(request, settings.max_body)
        if hashlib.sha256(module).hexdigest() != sha256:
            raise Problem(
                422,
                "Invalid Request",
                "the module's bytes do not have the SHA-256 its path names",
                field="sha256",
            )
        if module[:4] != b"\0asm":
            raise Problem(422, "Invalid Request", "not a WebAssembly module", field="body")
        created = await store.run(store.put_module, key, sha256, module)
        return JSONResponse(
            {"sha256": sha256, "size": len(module)},
            201 if created else 200,
            headers={"Location": f"/v1/modules/{sha256}"},
        )

    @app.get(
        "/v1/modules/{sha256}",
        tags=["modules"],
        response_class=Response,
        responses={**_binary("application/wasm", "The module"), **_problems(401, 404, 422)},
    )
    async def get_module(sha256: str, key: KeyDep) -> Response:
        """A module this key sent."""
        module = await store.run(store.module, key, sha256) if _SHA256.fullmatch(sha256) else None
        if module is None:
            raise Problem(404, "Not Found", "no such module")
        return Response(module, media_type="application/wasm")

    @app.get(
        "/v1/tasks/{task_id}/events",
        tags=["tasks"],
        response_class=StreamingResponse,
        responses={
            200: {"description": "Server-sent events", "content": {"text/event-stream": {}}},
            **_problems(401, 404, 422),
        },
    )
    async def task_events(task_id: str, key: KeyDep) -> StreamingResponse:
        """Server-sent events of the task's states (``event: state``), then its end
        (``event: end``, the task with its result); a comment every 15 s keeps it open."""
        row = await store.run(store.task, task_id, key)
        if row is None:
            raise _not_found()

        async def events() -> AsyncIterator[bytes]:
            last, quiet = None, 0.0
            while True:
                now = await store.run(store.task, task_id, key)
                if now is None:
                    yield b"event: end\ndata: null\n\n"
                    return
                if now.state != last:
                    last = now.state
                    quiet = 0.0
                    if now.state in ("queued", "running"):
                        data = json.dumps({"id": now.id, "state": now.state})
                        yield f"event: state\ndata: {data}\n\n".encode()
                    else:
                        yield b"event: end\ndata: " + task_json(now) + b"\n\n"
                        return
                await dispatcher.wait(task_id, POLL_EVENTS)
                quiet += POLL_EVENTS
                if quiet >= 15:
                    quiet = 0.0
                    yield b": still there\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/keys/me", tags=["keys"], responses=_problems(401, 422))
    async def key_me(key: KeyDep) -> dict[str, Any]:
        """The key that makes the request: its name, rights, and the secret that signs its
        webhooks (``X-Parity-Signature``)."""
        return {
            "name": key.name,
            "admin": key.admin,
            "max_active": key.max_active or settings.max_active_per_key,
            "webhook_secret": key.webhook_secret,
        }

    @app.get("/v1/tasks/{task_id}/deliveries", tags=["tasks"], responses=_problems(401, 404, 422))
    async def task_deliveries(task_id: str, key: KeyDep) -> dict[str, Any]:
        """The webhook deliveries of a task: state, attempts, last error."""
        row = await store.run(store.task, task_id, key)
        if row is None:
            raise _not_found()
        found = await store.run(store.deliveries_of, task_id)
        shown = ("url", "state", "attempts", "last_error")
        return {"deliveries": [{name: item[name] for name in shown} for item in found]}

    @app.get("/v1/tasks", tags=["tasks"], responses=_problems(401, 422))
    async def list_tasks(
        key: KeyDep,
        state: Annotated[
            str | None,
            Query(
                pattern=f"^({'|'.join(sorted(STATES))})$", description="only tasks in this state"
            ),
        ] = None,
        cursor: Annotated[
            str | None, Query(pattern=r"^[0-9]{1,18}$", description="next_cursor of the last page")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> dict[str, Any]:
        """The key's tasks (an admin key's: everyone's) in the order they were accepted."""
        if state is not None and state not in STATES:
            raise Problem(
                422,
                "Invalid Request",
                f"state: one of {', '.join(sorted(STATES))}",
                field="state",
            )
        after = 0
        if cursor is not None:
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
                raise Problem(
                    422, "Invalid Request", "cursor: a next_cursor this API gave", field="cursor"
                )
            after = int(cursor)
        rows = await store.run(store.list_tasks, key, state=state, after=after, limit=limit)
        return {
            "tasks": [task_view(row, with_result=False) for row in rows],
            "next_cursor": str(rows[-1].seq) if len(rows) == limit else None,
        }

    @app.get(
        "/v1/tasks/{task_id}",
        tags=["tasks"],
        response_class=Response,
        responses={
            200: {"description": "The task", "content": {"application/json": {"schema": _OBJECT}}},
            **_problems(401, 404, 422),
        },
    )
    async def get_task(
        task_id: str,
        key: KeyDep,
        wait: float | None = Query(
            None, ge=0, le=settings.max_wait, description="seconds to wait for the task to end"
        ),
    ) -> Response:
        """The task, and its result once it ended; ``?wait=SECONDS`` answers when it ends
        or when the time is up, whichever comes first."""
        _check_wait(wait, settings.max_wait)
        row = await store.run(store.task, task_id, key)
        if row is None:
            raise _not_found()
        if wait and row.state in ("queued", "running"):
            row = await waited(row, key, wait)
        return Response(task_json(row), media_type="application/json")

    @app.get(
        "/v1/tasks/{task_id}/files/{path:path}",
        tags=["tasks"],
        response_class=Response,
        responses={**_binary("application/octet-stream", "The file"), **_problems(401, 404, 422)},
    )
    async def get_file(task_id: str, path: str, key: KeyDep) -> Response:
        """One output file of an ended task, as ``Result.files`` holds it."""
        row = await store.run(store.task, task_id, key)
        if row is None:
            raise _not_found()
        files = json.loads(row.result).get("files", {}) if row.result else {}
        if path not in files:
            raise Problem(404, "Not Found", f"the task has no output file {path!r}")
        return Response(
            base64.b64decode(files[path]),
            media_type="application/octet-stream",
            headers={"Content-Disposition": "attachment"},
        )

    @app.post("/v1/tasks/{task_id}/cancel", tags=["tasks"], responses=_problems(401, 404, 422))
    async def cancel(task_id: str, key: KeyDep) -> dict[str, Any]:
        """A queued task never runs; a running one is stopped. An ended one stays as it is."""
        row = await store.run(store.cancel, task_id, key)
        if row is None:
            raise _not_found()
        if audit is not None:
            audit.record_later("task_cancelled", who=key.id, task_id=task_id, state=row.state)
        if row.state == "running":
            dispatcher.cancel(task_id)
            row = await waited(row, key, 10.0)
        return task_view(row)

    @app.delete(
        "/v1/tasks/{task_id}",
        status_code=204,
        tags=["tasks"],
        responses=_problems(401, 404, 409, 422),
    )
    async def delete(task_id: str, key: KeyDep) -> Response:
        """Forget a task and its result; a running task must be cancelled first."""
        done = await store.run(store.delete, task_id, key)
        if done is None:
            raise _not_found()
        if not done:
            raise Problem(409, "Conflict", "the task is running; cancel it first")
        return Response(status_code=204)

    return app


def _quota_problem(exc: QuotaExceeded) -> Problem:
    if exc.scope == "key":
        return Problem(
            429,
            "Too Many Requests",
            f"this key may have {exc.limit} tasks queued or running at once",
            headers={"Retry-After": "1"},
        )
    return Problem(
        503,
        "Service Unavailable",
        f"the queue is full ({exc.limit} tasks)",
        headers={"Retry-After": "5"},
    )


def _check_wait(wait: float | None, most: float) -> None:
    if wait is not None and wait > most:
        raise Problem(422, "Invalid Request", f"wait: at most {most:g} seconds", field="wait")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is known to be over ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise Problem(413, "Content Too Large", f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "Content Too Large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise Problem(422, "Invalid Request", f"the body is not JSON: {exc}") from None


@dataclass(frozen=True)
class Parsed:
    """A task from a request: its runtime, its record form (which names a module by hash),
    its callback URL, the task, and its module (sha256, bytes) to keep for the key."""

    runtime: str
    record: bytes
    callback_url: str | None
    task: Task
    module: tuple[str, bytes] | None


def _parse_task(
    document: Any, config: Config, modules: dict[str, bytes], where: str = ""
) -> Parsed:
    """A task from its record form (plus ``callback_url``, and ``wasm_module_sha256`` for a
    module sent before: ``modules`` holds those found); ``Problem`` 422 naming the field
    (``where`` prefixes it: ``tasks[3].``)."""

    def invalid(detail: str, field: str | None) -> Problem:
        named = f"{where}{field}" if field else (where.rstrip(".") or None)
        return Problem(422, "Invalid Request", f"{where}{detail}", field=named)

    if not isinstance(document, dict):
        raise invalid("a task is a JSON object: the Task's fields", None)
    document = dict(document)
    callback_url = document.pop("callback_url", None)
    if callback_url is not None:
        try:
            parts = urlsplit(callback_url) if isinstance(callback_url, str) else None
        except ValueError:  # "http://[::1", "http://[abc]/"
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or len(callback_url) > _MAX_URL
        ):
            raise invalid(
                "callback_url: an http or https URL of at most 2048 characters", "callback_url"
            )
    digest = document.pop("wasm_module_sha256", None)
    module = None
    if digest is not None:
        module = modules.get(digest) if isinstance(digest, str) else None
        if module is None:
            raise invalid(
                "wasm_module_sha256: no module of yours has that hash; PUT it to "
                "/v1/modules/{sha256} first",
                "wasm_module_sha256",
            )
        if document.get("wasm_module") is not None:
            raise invalid("give wasm_module or wasm_module_sha256, not both", "wasm_module")
    if document.get("wasm_file") is not None:
        raise invalid(
            "wasm_file: a path on the server is not yours to name; send the module's bytes "
            "as wasm_module (base64), or its hash as wasm_module_sha256",
            "wasm_file",
        )
    try:
        task = (
            task_from_document(document)
            if module is None
            else task_from_document(document, wasm_module=module)
        )
    except InvalidInput as exc:
        raise invalid(exc.message, exc.field) from None
    except (ValueError, TypeError) as exc:  # bad base64
        raise invalid(f"not base64: {exc}", None) from None
    runtime = task.runtime_name or config.default_runtime
    if runtime not in runtimes.names():
        raise invalid(f"runtime: one of {', '.join(runtimes.names())}, not {runtime!r}", "runtime")
    # The record is the task's fields as sent (task_from_document reads them back alike),
    # naming the module by hash: the store keeps each module once per key.
    kept = None
    record_form = {name: value for name, value in document.items() if name != "wasm_module"}
    if task.wasm_module is not None:
        if digest is None:
            digest = hashlib.sha256(task.wasm_module).hexdigest()
        kept = (digest, task.wasm_module)
        record_form["wasm_module_sha256"] = digest
    record = json.dumps(record_form, separators=(",", ":")).encode()
    return Parsed(runtime, record, callback_url, task, kept)


_shown: dict[str, Any] = {
    "memory": lambda value: format_size(int(value)),
    "disk": lambda value: format_size(int(value)),
    "timeout": lambda value: f"{value:g} s",
    "cpu": lambda value: f"{value:g} cores",
}


def _check_caps(key: Key, parsed: Parsed, config: Config, where: str = "") -> None:
    """403 naming the field if the task asks for more than its key may (a runtime, an image,
    a limit above the key's cap, network egress it was not given): asking again does not
    help, unlike a 429."""
    caps, task = key.caps, parsed.task

    def refuse(detail: str, field: str) -> Problem:
        return Problem(403, "Forbidden", f"{where}{detail}", field=f"{where}{field}")

    if task.network is not None:
        # A key grants no egress unless the operator gave it some (keys create --network).
        given = caps.get("network")
        if not given:
            raise refuse(
                "network: this key may not grant network egress (an operator gives it with "
                "parity-sandbox keys create --network)",
                "network",
            )
        if given != ["any"]:
            outside = AllowList.parse(task.network.allow).outside(AllowList.parse(given))
            if outside:
                raise refuse(
                    f"network.allow: this key may grant only {', '.join(given)}, not "
                    f"{', '.join(map(str, outside))}",
                    "network.allow",
                )
    if not caps:
        return

    allowed = caps.get("runtimes")
    if allowed and parsed.runtime not in allowed:
        raise refuse(
            f"runtime: this key may use {', '.join(allowed)}, not {parsed.runtime}", "runtime"
        )
    images = caps.get("images")
    if task.image is not None and images and not any(fnmatch(task.image, p) for p in images):
        raise refuse(f"image: this key may run only {', '.join(images)}", "image")
    limits = task.effective_limits(config.limits_for(parsed.runtime).merged(task.limits))
    for name in ("memory", "timeout", "cpu", "disk"):
        cap, value = caps.get(name), getattr(limits, name)
        if cap is not None and value is not None and value > cap:
            shown = _shown[name]
            raise refuse(
                f"limits.{name}: {shown(value)} is above this key's cap of {shown(cap)}",
                f"limits.{name}",
            )


def _module_hashes(documents: list[Any]) -> set[str]:
    """The ``wasm_module_sha256`` the tasks name."""
    return {
        document["wasm_module_sha256"]
        for document in documents
        if isinstance(document, dict) and isinstance(document.get("wasm_module_sha256"), str)
    }
