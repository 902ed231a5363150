"""The HTTP service, as a client meets it: a real ``parity-sandbox serve`` process on loopback,
keys made with the CLI, requests through httpx, tasks run by the real runtimes."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import TEST_IMAGE, WasmFixtures

pytest.importorskip("fastapi")

CLI = [sys.executable, "-m", "parity_sandbox.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A server process and what it needs: its state directory, its keys, its address."""

    state: Path
    cache: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
        environ["PARITY_SANDBOX_SERVICE_STATE_DIR"] = str(self.state)
        environ["XDG_CACHE_HOME"] = str(self.cache)
        environ["PARITY_SANDBOX_TIMEOUT"] = "10s"
        return environ

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*CLI, *args], capture_output=True, env=self.env, timeout=60, check=False
        )

    def make_key(self, name: str, *extra: str) -> str:
        done = self.cli("keys", "create", name, *extra)
        assert done.returncode == 0, done.stderr
        self.keys[name] = done.stdout.decode().strip()
        return self.keys[name]

    def start(self) -> None:
        log = (self.state / "serve.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become ready: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        path = self.state / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    server = Service(tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("cache"))
    server.make_key("alice")
    server.make_key("bob")
    server.make_key("root", "--admin")
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()


def module_task(path: Path, **fields: Any) -> dict[str, Any]:
    return {"wasm_module": base64.b64encode(path.read_bytes()).decode(), **fields}


def result_of(view: dict[str, Any]) -> dict[str, Any]:
    assert view["result"] is not None, view
    result: dict[str, Any] = view["result"]
    return result


def is_problem(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["detail"]
    if field is not None:
        assert body.get("field") == field, body


def test_a_task_runs_and_its_result_comes_back(service: Service, wasm: WasmFixtures) -> None:
    with service.client(service.keys["alice"]) as client:
        task = module_task(wasm.echo_stdin, stdin=base64.b64encode(b"api").decode())
        response = client.post("/v1/tasks?wait=20", json=task)
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["state"] == "succeeded" and view["attempts"] == 1
        assert base64.b64decode(result_of(view)["stdout"]) == b"api"
        assert response.headers["location"] == f"/v1/tasks/{view['id']}"
        # the same, read back; and in the key's list
        again = client.get(f"/v1/tasks/{view['id']}").json()
        assert again == view
        listed = client.get("/v1/tasks", params={"state": "succeeded"}).json()
        assert view["id"] in [task["id"] for task in listed["tasks"]]


def test_without_wait_the_task_is_accepted_then_ends(service: Service, wasm: WasmFixtures) -> None:
    with service.client(service.keys["alice"]) as client:
        response = client.post("/v1/tasks", json=module_task(wasm.write_outputs))
        assert response.status_code == 202, response.text
        location = response.headers["location"]
        deadline = time.monotonic() + 30
        while (view := client.get(location).json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
        assert view["state"] == "succeeded", view
        # an output file, alone; a path that is not one of them is 404, never a host file
        got = client.get(f"{location}/files/out/result.txt")
        assert got.status_code == 200 and got.content == b"result 42\n"
        for path in ("out/evil", "../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "out"):
            is_problem(client.get(f"{location}/files/{path}"), 404)


def test_keys_are_checked_and_tenants_see_only_their_own(
    service: Service, wasm: WasmFixtures
) -> None:
    with service.client(service.keys["alice"]) as alice:
        task_id = alice.post("/v1/tasks?wait=20", json=module_task(wasm.hello)).json()["id"]
    for key in (None, "psk_wrong", "x" * 10_000):
        with service.client(key) as stranger:
            is_problem(stranger.get(f"/v1/tasks/{task_id}"), 401)
            is_problem(stranger.post("/v1/tasks", json=module_task(wasm.hello)), 401)
    with httpx.Client(base_url=service.url, headers={"X-API-Key": service.keys["alice"]}) as c:
        assert c.get(f"/v1/tasks/{task_id}").status_code == 200
    with service.client(service.keys["bob"]) as bob:
        theirs = bob.get(f"/v1/tasks/{task_id}")
        unknown = bob.get(f"/v1/tasks/{'0' * 32}")
        is_problem(theirs, 404)
        assert theirs.json() == unknown.json()  # no hint that the task exists
        is_problem(bob.get(f"/v1/tasks/{task_id}/files/out/x"), 404)
        is_problem(bob.post(f"/v1/tasks/{task_id}/cancel"), 404)
        is_problem(bob.delete(f"/v1/tasks/{task_id}"), 404)
        assert task_id not in [t["id"] for t in bob.get("/v1/tasks").json()["tasks"]]
    with service.client(service.keys["root"]) as admin:
        assert admin.get(f"/v1/tasks/{task_id}").status_code == 200
    # a key revoked while the server runs is refused at once
    key = service.make_key("carol")
    with service.client(key) as carol:
        assert carol.get("/v1/tasks").status_code == 200
        assert service.cli("keys", "revoke", "carol").returncode == 0
        is_problem(carol.get("/v1/tasks"), 401)


def test_an_idempotency_key_never_runs_a_task_twice(service: Service, wasm: WasmFixtures) -> None:
    body = module_task(wasm.hello, args=["once"])
    headers = {"Idempotency-Key": "order-17"}
    with service.client(service.keys["alice"]) as client:
        first = client.post("/v1/tasks?wait=20", json=body, headers=headers).json()
        second = client.post("/v1/tasks?wait=20", json=body, headers=headers).json()
        assert first["id"] == second["id"] and second["attempts"] == 1
        other = client.post("/v1/tasks", json=module_task(wasm.hello), headers=headers)
        is_problem(other, 409, "Idempotency-Key")
    with service.client(service.keys["bob"]) as bob:  # keys are per tenant
        theirs = bob.post("/v1/tasks?wait=20", json=body, headers=headers).json()
        assert theirs["id"] != first["id"]


def test_a_queued_or_running_task_can_be_cancelled(service: Service, wasm: WasmFixtures) -> None:
    with service.client(service.keys["alice"]) as client:
        view = client.post("/v1/tasks", json=module_task(wasm.sleep, args=["30"])).json()
        deadline = time.monotonic() + 20
        while client.get(f"/v1/tasks/{view['id']}").json()["state"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        cancelled = client.post(f"/v1/tasks/{view['id']}/cancel").json()
        assert cancelled["state"] == "cancelled", cancelled
        assert time.monotonic() - started < 10
        # an ended task can be deleted; then it is gone
        assert client.delete(f"/v1/tasks/{view['id']}").status_code == 204
        is_problem(client.get(f"/v1/tasks/{view['id']}"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"wasm_module": "!!!"}', None),
        (b'{"wasm_module": "AGFzbQEAAAA=", "limits": {"memory": "lots"}}', "limits.memory"),
        (b'{"wasm_module": "AGFzbQEAAAA=", "nonsense": 1}', "nonsense"),
        (b'{"wasm_file": "/etc/passwd"}', "wasm_file"),
        (b'{"wasm_module": "AGFzbQEAAAA=", "callback_url": "file:///etc/passwd"}', "callback_url"),
        (b'{"wasm_module": "AGFzbQEAAAA=", "runtime": "nowhere"}', "runtime"),
    ],
)
def test_hostile_bodies_get_a_problem_and_store_nothing(
    service: Service, body: bytes, field: str | None
) -> None:
    with service.client(service.keys["bob"]) as client:
        before = len(client.get("/v1/tasks").json()["tasks"])
        response = client.post("/v1/tasks", content=body)
        is_problem(response, 422, field)
        assert "Traceback" not in response.text
        assert len(client.get("/v1/tasks").json()["tasks"]) == before
        assert client.get("/healthz").status_code == 200


def test_hostile_requests_get_a_problem(service: Service) -> None:
    with service.client(service.keys["bob"]) as client:
        huge = b'{"stdin": "' + b"A" * (65 << 20) + b'"}'
        is_problem(client.post("/v1/tasks", content=huge), 413)
        is_problem(client.post("/v1/tasks?wait=1e9", content=b"{}"), 422, "wait")
        is_problem(client.post("/v1/tasks?wait=-1", content=b"{}"), 422, "wait")
        is_problem(client.get("/v1/tasks?cursor=-5"), 422, "cursor")
        is_problem(client.get("/v1/tasks?limit=0"), 422, "limit")
        is_problem(client.get("/v1/tasks?state=sideways"), 422, "state")
        bad_key = {"Idempotency-Key": "x" * 300}
        is_problem(client.post("/v1/tasks", content=b"{}", headers=bad_key), 422)
        is_problem(client.get("/v1/nowhere"), 404)
        assert client.get("/readyz").status_code == 200


def test_the_list_is_paged_by_cursor(service: Service, wasm: WasmFixtures) -> None:
    key = service.make_key("dave")
    with service.client(key) as client:
        ids = [
            client.post("/v1/tasks", json=module_task(wasm.hello)).json()["id"] for _ in range(5)
        ]
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/tasks", params=params).json()
            seen += [task["id"] for task in page["tasks"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids


def test_a_key_over_its_quota_gets_429_and_nothing_is_lost(
    service: Service, wasm: WasmFixtures
) -> None:
    key = service.make_key("erin", "--max-active", "2")
    with service.client(key) as client:
        sleepers = [
            client.post("/v1/tasks", json=module_task(wasm.sleep, args=["30"])) for _ in range(2)
        ]
        assert [r.status_code for r in sleepers] == [202, 202]
        over = client.post("/v1/tasks", json=module_task(wasm.hello))
        is_problem(over, 429)
        assert int(over.headers["retry-after"]) >= 1
        for response in sleepers:
            client.post(f"{response.headers['location']}/cancel")
        assert client.post("/v1/tasks?wait=20", json=module_task(wasm.hello)).status_code == 200


def test_the_api_describes_itself_and_its_runtimes(service: Service) -> None:
    schema = httpx.get(f"{service.url}/openapi.json").json()
    assert "/v1/tasks" in schema["paths"] and "/v1/tasks/{task_id}/cancel" in schema["paths"]
    with service.client(service.keys["alice"]) as client:
        found = client.get("/v1/runtimes").json()
        by_name = {entry["name"]: entry for entry in found["runtimes"]}
        assert by_name["wasm"]["ok"] is True and found["default"] == "wasm"


def test_a_killed_server_loses_no_accepted_task(tmp_path: Path, wasm: WasmFixtures) -> None:
    server = Service(tmp_path / "state", tmp_path / "cache")
    server.state.mkdir()
    key = server.make_key("frank")
    server.start()
    try:
        with server.client(key) as client:
            running = client.post("/v1/tasks", json=module_task(wasm.sleep, args=["2"])).json()
            queued = [
                client.post(
                    "/v1/tasks",
                    json=module_task(wasm.echo_stdin, stdin=base64.b64encode(b"%d" % n).decode()),
                ).json()
                for n in range(20)
            ]
            deadline = time.monotonic() + 20
            while client.get(f"/v1/tasks/{running['id']}").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
        server.stop(signal.SIGKILL)
        # a second server on the same store while the first one is still there is refused
        server.start()
        with server.client(key) as client:
            deadline = time.monotonic() + 60
            views = []
            for task in [running, *queued]:
                while (view := client.get(f"/v1/tasks/{task['id']}").json())["state"] in (
                    "queued",
                    "running",
                ):
                    assert time.monotonic() < deadline, view
                    time.sleep(0.05)
                views.append(view)
        assert all(view["state"] == "succeeded" for view in views), views
        assert views[0]["attempts"] == 2  # it ran again, and says so
        outputs = [base64.b64decode(result_of(view)["stdout"]) for view in views[1:]]
        assert outputs == [b"%d" % n for n in range(20)]
    finally:
        server.stop()


def test_a_second_server_on_one_sqlite_store_is_refused(service: Service) -> None:
    other = Service(service.state, service.cache)
    done = subprocess.run(
        [*CLI, "serve", "--port", str(other.port)],
        env=other.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert b"another parity-sandbox serve uses the store" in done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.docker
def test_a_docker_task_runs_through_the_api(service: Service) -> None:
    if os.environ.get("PARITY_TEST_DOCKER") != "required":
        pytest.importorskip("docker")
    task = {"image": TEST_IMAGE, "command": ["sh", "-c", "echo from docker; exit 3"]}
    with service.client(service.keys["alice"]) as client:
        view = client.post("/v1/tasks?wait=60", json=task).json()
    assert view["state"] == "failed", json.dumps(view)[:2000]
    result = result_of(view)
    assert result["exit_code"] == 3 and base64.b64decode(result["stdout"]) == b"from docker\n"
    assert result["runtime"]["name"] == "docker"
