"""The HTTP service under load, as clients meet it: a real ``parity-sandbox serve`` process on
loopback, many concurrent clients (threads, one ``httpx.Client`` each), and real WASM tasks.

What must hold however the requests interleave: every accepted task ends once, with its own
output; the store holds exactly one task per accepted submission (none lost, none doubled);
a key over its quota gets 429 with ``Retry-After`` and nothing stored; nothing is left queued
or running.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import WasmFixtures
from service_server import Service

pytest.importorskip("fastapi")

#: Seconds a whole scenario may take before it counts as a hang.
DEADLINE = 80.0
#: Seconds one request may ask the server to wait for a task's end.
WAIT = 20
#: What every fifth submission asks for instead: under load it is mostly answered 202, so the
#: GET ?wait path is exercised too.
SHORT_WAIT = 0.2
#: Tasks per page of the list (several pages, so the cursor is exercised too).
PAGE = 250
#: The longest a client sleeps on a 429, whatever Retry-After says.
MOST_RETRY_AFTER = 2.0


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    server = Service(tmp_path / "state", tmp_path / "cache")
    server.state.mkdir()
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()


@dataclass
class Submission:
    """One task a client meant to run: what it sent and what the server said."""

    number: int
    stdin: bytes
    #: Status codes of every POST made for it (429s included), in order.
    posts: list[int] = field(default_factory=list)
    task_id: str | None = None
    view: dict[str, Any] | None = None


def echo_body(module: bytes, stdin: bytes) -> bytes:
    """The JSON body of an ``echo_stdin`` task; ``module`` is the start of the object, with
    the module's base64 in it, made once (clients do not encode 130 KB again for each task)."""
    return module + b',"stdin":"' + base64.b64encode(stdin) + b'"}'


def module_start(path: Path) -> bytes:
    return b'{"wasm_module":"' + base64.b64encode(path.read_bytes()) + b'"'


def run_to_end(client: httpx.Client, job: Submission, module: bytes, deadline: float) -> None:
    """Submit ``job`` (again after each 429, as Retry-After says), then wait for its end."""
    while True:
        assert time.monotonic() < deadline, f"task {job.number}: no answer but 429 in time"
        response = client.post(
            "/v1/tasks",
            params={"wait": SHORT_WAIT if job.number % 5 == 0 else WAIT},
            content=echo_body(module, job.stdin),
            headers={"Content-Type": "application/json"},
        )
        job.posts.append(response.status_code)
        if response.status_code != 429:
            break
        assert response.headers["content-type"] == "application/problem+json", response.text
        time.sleep(min(float(response.headers["retry-after"]), MOST_RETRY_AFTER))
    assert response.status_code in (200, 202), f"task {job.number}: {response.text}"
    view = response.json()
    job.task_id = view["id"]
    assert response.headers["location"] == f"/v1/tasks/{job.task_id}"
    while view["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"task {job.number} never ended: {view}"
        got = client.get(f"/v1/tasks/{job.task_id}", params={"wait": WAIT})
        assert got.status_code == 200, f"task {job.number}: {got.text}"
        view = got.json()
    job.view = view


def run_clients(
    service: Service, key: str, jobs: list[Submission], clients: int, module: bytes
) -> list[str]:
    """Run ``jobs`` from ``clients`` threads, each with its own connection, each job to its
    end; the failures, one line each (a client stops at its first)."""
    deadline = time.monotonic() + DEADLINE
    start = threading.Barrier(clients)

    def client_loop(mine: list[Submission]) -> str | None:
        try:
            with service.client(key) as client:
                start.wait(30)
                for job in mine:
                    run_to_end(client, job, module, deadline)
        except Exception as exc:  # noqa: BLE001 - reported with the others'
            start.abort()  # the others do not wait for this one at the start
            return f"{type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop, jobs[n::clients]) for n in range(clients)]
        outcomes = [future.result() for future in futures]
    return [outcome for outcome in outcomes if outcome is not None]


def stored_tasks(client: httpx.Client, state: str | None = None) -> list[dict[str, Any]]:
    """Every task of the key, through the paginated list."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": PAGE}
        if cursor is not None:
            params["cursor"] = cursor
        if state is not None:
            params["state"] = state
        response = client.get("/v1/tasks", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["tasks"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


def check_ended_once_each(service: Service, key: str, jobs: list[Submission]) -> None:
    """Every job succeeded with its own output, and the store holds exactly those tasks."""
    wrong, submitted = [], []
    for job in jobs:
        view = job.view
        assert view is not None and job.task_id is not None
        submitted.append(job.task_id)
        stdout = base64.b64decode(view["result"]["stdout"]) if view.get("result") else None
        if view["state"] != "succeeded" or stdout != job.stdin or view["attempts"] != 1:
            wrong.append((job.number, view["state"], view["attempts"], stdout, view["reason"]))
    assert not wrong, f"{len(wrong)} tasks ended wrong, such as {wrong[:5]}"
    assert len(set(submitted)) == len(jobs), "two submissions got one task id"
    with service.client(key) as client:
        started = time.monotonic()
        stored = stored_tasks(client)
        print(f"listed {len(stored)} tasks in {time.monotonic() - started:.2f} s")
        doubled = {i: n for i, n in Counter(task["id"] for task in stored).items() if n > 1}
        assert not doubled, f"the list shows tasks twice: {doubled}"
        ids = {task["id"] for task in stored}
        assert ids == set(submitted), (
            f"{len(stored)} tasks stored for {len(jobs)} accepted submissions; not stored: "
            f"{sorted(set(submitted) - ids)[:5]}, stored but never accepted: "
            f"{sorted(ids - set(submitted))[:5]}"
        )
        assert {task["state"] for task in stored} == {"succeeded"}
        for state in ("queued", "running"):
            assert stored_tasks(client, state) == [], f"tasks left {state}"


@pytest.mark.slow
def test_two_thousand_tasks_from_fifty_clients_each_end_once_with_their_output(
    service: Service, wasm: WasmFixtures
) -> None:
    key = service.make_key("load")
    service.start()
    module = module_start(wasm.echo_stdin)
    jobs = [Submission(n, b"task %d" % n) for n in range(2000)]
    failures = run_clients(service, key, jobs, 50, module)
    assert not failures, f"{len(failures)} clients failed: {failures[:5]}\n{service.log()[-5000:]}"
    answers = Counter(code for job in jobs for code in job.posts)
    print(f"answers to the {len(jobs)} submissions: {dict(answers)}")
    assert set(answers) <= {200, 202} and answers.total() == len(jobs), answers
    check_ended_once_each(service, key, jobs)


@pytest.mark.slow
def test_clients_over_a_keys_quota_retry_and_nothing_is_lost_or_doubled(
    service: Service, wasm: WasmFixtures
) -> None:
    key = service.make_key("quota", "--max-active", "5")
    service.start()
    module = module_start(wasm.echo_stdin)
    jobs = [Submission(n, b"quota %d" % n) for n in range(500)]
    failures = run_clients(service, key, jobs, 50, module)
    assert not failures, f"{len(failures)} clients failed: {failures[:5]}\n{service.log()[-5000:]}"
    answers = Counter(code for job in jobs for code in job.posts)
    print(f"answers to the {len(jobs)} submissions, retries included: {dict(answers)}")
    refused = answers[429]
    assert refused > 0, "50 clients on a key that may have 5 tasks were never refused"
    # Each job was accepted exactly once: its last POST, after its 429s.
    assert all(job.posts[-1] in (200, 202) and set(job.posts[:-1]) <= {429} for job in jobs)
    check_ended_once_each(service, key, jobs)
