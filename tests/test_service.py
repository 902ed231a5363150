"""The HTTP service, as a client meets it: a real ``parity-sandbox serve`` process on loopback,
keys made with the CLI, requests through httpx, tasks run by the real runtimes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import TEST_IMAGE, WasmFixtures
from postgres import PostgresServer, empty_database
from service_server import CLI, Service, module_task, running_service

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory) as server:
        yield server


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


def test_the_remote_executor_raises_what_a_local_one_raises(
    service: Service, wasm: WasmFixtures
) -> None:
    from parity_sandbox import (
        ExecutionTimeout,
        InvalidInput,
        RemoteExecutor,
        RuntimeUnavailable,
        Task,
    )

    with RemoteExecutor(service.url, service.keys["alice"]) as remote:
        with pytest.raises(ExecutionTimeout) as timed_out:
            remote.execute(Task(wasm_file=wasm.print_then_loop, limits={"timeout": "1s"}))
        assert timed_out.value.result is not None
        assert timed_out.value.result.stdout == b"started\n"  # the partial output
        with pytest.raises(InvalidInput, match="memory"):
            remote.execute(Task(wasm_file=wasm.hello, limits={"memory": "5g"}))
        assert remote.execute(Task(wasm_file=wasm.hello)).stdout == b"hello\n"
    with (
        RemoteExecutor(service.url, "psk_wrong") as stranger,
        pytest.raises(RuntimeUnavailable, match="refused the API key"),
    ):
        stranger.execute(Task(wasm_file=wasm.hello))


def test_the_cli_runs_on_a_service(service: Service, wasm: WasmFixtures, tmp_path: Path) -> None:
    env = {**service.env, "PARITY_SANDBOX_API_KEY": service.keys["alice"]}

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*CLI, *args], capture_output=True, env=env, timeout=120, check=False)

    done = cli("run", "--remote", service.url, str(wasm.exit_code), "--", "7")
    assert (done.returncode, done.stderr) == (7, b"bye\n"), done.stderr
    lines = tmp_path / "tasks.jsonl"
    lines.write_text(
        "\n".join(
            json.dumps(module_task(wasm.echo_stdin, stdin=base64.b64encode(b"%d" % n).decode()))
            for n in range(3)
        )
        + "\n"
    )
    done = cli("run-batch", "--remote", service.url, str(lines))
    assert done.returncode == 0, done.stderr
    said = [base64.b64decode(json.loads(line)["stdout"]) for line in done.stdout.splitlines()]
    assert said == [b"0", b"1", b"2"]
    env.pop("PARITY_SANDBOX_API_KEY")
    done = cli("run", "--remote", service.url, str(wasm.hello))
    assert done.returncode != 0 and b"API key" in done.stderr and b"Traceback" not in done.stderr


def test_two_servers_share_a_postgresql_store_and_survive_a_kill(
    tmp_path: Path, wasm: WasmFixtures, postgres_server: PostgresServer
) -> None:
    """Two servers on one store each take their share; when one is killed, the other runs
    what it held (once its lease ran out) and everything ends exactly once."""
    servers = [Service(tmp_path / f"state{n}", tmp_path / "cache") for n in range(2)]
    for server in servers:
        server.state.mkdir()
        server.extra_env = {
            "PARITY_SANDBOX_SERVICE_DATABASE_URL": postgres_server.url,
            "PARITY_SANDBOX_SERVICE_LEASE": "2s",
            "PARITY_SANDBOX_SERVICE_CONCURRENCY": "2",
        }
    key = servers[0].make_key("grace")
    for server in servers:
        server.start()
    try:
        with servers[0].client(key) as client:
            sleepers = [
                client.post("/v1/tasks", json=module_task(wasm.sleep, args=["2"])).json()
                for _ in range(4)
            ]
            echoes = [
                client.post(
                    "/v1/tasks",
                    json=module_task(wasm.echo_stdin, stdin=base64.b64encode(b"%d" % n).decode()),
                ).json()
                for n in range(30)
            ]
            deadline = time.monotonic() + 20
            while not all(
                client.get(f"/v1/tasks/{t['id']}").json()["state"] != "queued" for t in sleepers
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        servers[1].stop(signal.SIGKILL)  # with whatever it held
        with servers[0].client(key) as client:
            views = [
                client.get(f"/v1/tasks/{task['id']}", params={"wait": 60}).json()
                for task in [*sleepers, *echoes]
            ]
        assert [view["state"] for view in views] == ["succeeded"] * 34, views
        said = [base64.b64decode(result_of(view)["stdout"]) for view in views[4:]]
        assert said == [b"%d" % n for n in range(30)]
        assert {view["attempts"] for view in views} <= {1, 2}
        assert any(view["attempts"] == 2 for view in views[:4])  # the killed one's, again
    finally:
        for server in servers:
            server.stop()
        empty_database(postgres_server.url)  # for the next test on the server


@pytest.mark.docker
def test_a_killed_servers_containers_are_reaped_and_its_task_runs_again(
    tmp_path: Path, docker_executor: Any
) -> None:
    from parity_sandbox.runtimes.docker import host as docker_host

    server = Service(tmp_path / "state", tmp_path / "cache")
    server.state.mkdir()
    key = server.make_key("heidi")
    server.start()
    assert server.process is not None
    pid = server.process.pid
    task = {"image": TEST_IMAGE, "command": ["sh", "-c", "sleep 3; echo done"]}
    try:
        with server.client(key) as client:
            view = client.post("/v1/tasks", json=task).json()
            deadline = time.monotonic() + 60
            while client.get(f"/v1/tasks/{view['id']}").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        api = docker_executor._api
        managed = {"label": f"{docker_host.MANAGED}=true"}

        def theirs() -> list[str]:
            found = api.containers(all=True, filters=managed)
            return [c["Id"] for c in found if f":{pid}:" in c["Labels"][docker_host.OWNER]]

        deadline = time.monotonic() + 30
        while not theirs():  # the task's container exists before it is sent
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.stop(signal.SIGKILL)
        assert theirs()  # left behind by the kill
        server.start()
        with server.client(key) as client:
            done = client.get(f"/v1/tasks/{view['id']}", params={"wait": 60}).json()
        assert done["state"] == "succeeded" and done["attempts"] == 2, done
        assert base64.b64decode(result_of(done)["stdout"]) == b"done\n"
        assert theirs() == []  # reaped by the new server
    finally:
        server.stop()


def test_a_batch_is_stored_whole_and_answered_in_order(
    service: Service, wasm: WasmFixtures
) -> None:
    tasks = [
        module_task(wasm.echo_stdin, stdin=base64.b64encode(b"%d" % n).decode()) for n in range(25)
    ]
    with service.client(service.keys["bob"]) as client:
        response = client.post("/v1/batches?wait=30", json={"tasks": tasks})
        assert response.status_code == 200, response.text
        views = response.json()["tasks"]
        said = [base64.b64decode(result_of(view)["stdout"]) for view in views]
        assert said == [b"%d" % n for n in range(25)]
        # one bad task: the whole batch is refused, naming it, and nothing is stored
        before = len(client.get("/v1/tasks", params={"limit": 1000}).json()["tasks"])
        bad = [*tasks[:3], {"wasm_module": tasks[0]["wasm_module"], "limits": {"memory": "x"}}]
        is_problem(client.post("/v1/batches", json={"tasks": bad}), 422, "tasks[3].limits.memory")
        is_problem(client.post("/v1/batches", json={"tasks": []}), 422, "tasks")
        is_problem(client.post("/v1/batches", json={"tasks": [1]}), 422, "tasks[0]")
        after = len(client.get("/v1/tasks", params={"limit": 1000}).json()["tasks"])
        assert after == before


def unique_module(path: Path) -> bytes:
    """The module at ``path`` with a custom section of random bytes: a module no test sent."""
    payload = b"\x05nonce" + os.urandom(16)
    return path.read_bytes() + b"\x00" + bytes([len(payload)]) + payload


def test_a_module_is_sent_once_and_named_by_its_hash(service: Service, wasm: WasmFixtures) -> None:
    module = unique_module(wasm.echo_stdin)
    digest = hashlib.sha256(module).hexdigest()
    with service.client(service.keys["alice"]) as alice:
        is_problem(alice.get(f"/v1/modules/{digest}"), 404)
        assert alice.put(f"/v1/modules/{digest}", content=module).status_code == 201
        assert alice.put(f"/v1/modules/{digest}", content=module).status_code == 200
        assert alice.get(f"/v1/modules/{digest}").content == module
        stdin = base64.b64encode(b"by hash").decode()
        task = {"wasm_module_sha256": digest, "stdin": stdin}
        view = alice.post("/v1/tasks?wait=20", json=task).json()
        assert base64.b64decode(result_of(view)["stdout"]) == b"by hash"
        # bytes that do not match their hash, a bad hash, not a module: refused
        wrong = hashlib.sha256(b"other").hexdigest()
        is_problem(alice.put(f"/v1/modules/{wrong}", content=module), 422, "sha256")
        is_problem(alice.put("/v1/modules/xyz", content=module), 422, "sha256")
        text = b"not wasm"
        is_problem(alice.put(f"/v1/modules/{hashlib.sha256(text).hexdigest()}", content=text), 422)
    with service.client(service.keys["bob"]) as bob:  # another tenant's module: unknown
        is_problem(bob.get(f"/v1/modules/{digest}"), 404)
        is_problem(
            bob.post("/v1/tasks", json={"wasm_module_sha256": digest}), 422, "wasm_module_sha256"
        )


def test_a_module_sent_in_a_task_is_kept_once_by_its_hash(
    service: Service, wasm: WasmFixtures
) -> None:
    module = unique_module(wasm.echo_stdin)
    digest = hashlib.sha256(module).hexdigest()
    task = {"wasm_module": base64.b64encode(module).decode(), "stdin": "aGk="}
    with service.client(service.keys["alice"]) as alice:
        queued = [alice.post("/v1/tasks", json=task).json() for _ in range(3)]
        for view in queued:
            ended = alice.get(f"/v1/tasks/{view['id']}", params={"wait": 20}).json()
            assert base64.b64decode(result_of(ended)["stdout"]) == b"hi"
        # the task rows name it by hash; the key can fetch it, and send tasks by its hash
        assert alice.get(f"/v1/modules/{digest}").content == module
        assert alice.put(f"/v1/modules/{digest}", content=module).status_code == 200
        by_hash = alice.post("/v1/tasks?wait=20", json={"wasm_module_sha256": digest}).json()
        assert by_hash["state"] == "succeeded"
    with service.client(service.keys["bob"]) as bob:  # still alice's alone
        is_problem(bob.get(f"/v1/modules/{digest}"), 404)
    rows = service.database_rows("SELECT length(task) FROM tasks")
    assert rows and max(row[0] for row in rows) < len(module)


def test_events_follow_a_task_to_its_end(service: Service, wasm: WasmFixtures) -> None:
    with service.client(service.keys["alice"]) as client:
        view = client.post("/v1/tasks", json=module_task(wasm.sleep, args=["1"])).json()
        events = []
        with client.stream("GET", f"/v1/tasks/{view['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
        states = [data["state"] for name, data in events]
        assert states[-1] == "succeeded" and events[-1][0] == "end"
        assert (
            "running" in states
            and base64.b64decode(result_of(events[-1][1])["stdout"]) == b"woke\n"
        )
    with service.client(service.keys["bob"]) as bob:
        is_problem(bob.get(f"/v1/tasks/{view['id']}/events"), 404)


def test_a_key_grants_network_egress_only_as_its_operator_allows(service: Service) -> None:
    granted = {
        "image": TEST_IMAGE,
        "command": ["true"],
        "oci_runtime": "runc",
        "network": {"allow": ["localhost:8080", "127.0.0.1/32:8080"]},
    }
    with service.client(service.keys["alice"]) as alice:  # a key is given no egress by default
        is_problem(alice.post("/v1/tasks", json=granted), 403, "network")
    narrow = service.make_key(
        "nora", "--network", "localhost:8080", "--network", "127.0.0.1/32:8080"
    )
    with service.client(narrow) as nora:
        wider = {**granted, "network": {"allow": ["localhost:9090"]}}
        is_problem(nora.post("/v1/tasks", json=wider), 403, "network.allow")
        view = nora.post("/v1/tasks?wait=30", json=granted).json()
        assert view["state"] == "succeeded", view
    bad = service.cli("keys", "create", "nemo", "--network", "not a grant")
    assert bad.returncode != 0 and b"--network" in bad.stderr


def test_a_key_is_held_to_its_caps_and_its_daily_cpu_budget(
    service: Service, wasm: WasmFixtures
) -> None:
    key = service.make_key(
        "kim",
        "--max-memory",
        "64m",
        "--max-timeout",
        "5s",
        "--runtime",
        "wasm",
        "--cpu-seconds-per-day",
        "0.000001",
    )
    with service.client(key) as client:
        over = module_task(wasm.hello, limits={"memory": "128m"})
        is_problem(client.post("/v1/tasks", json=over), 403, "limits.memory")
        # unset, the timeout is the service's default (10 s here): above the cap of 5 s
        capped = module_task(wasm.hello, limits={"memory": "64m"})
        is_problem(client.post("/v1/tasks", json=capped), 403, "limits.timeout")
        docker = {"image": TEST_IMAGE, "command": ["true"]}
        is_problem(client.post("/v1/tasks", json=docker), 403, "runtime")
        ok = module_task(wasm.hello, limits={"memory": "64m", "timeout": "1s"})
        batch = {"tasks": [ok, over]}
        is_problem(client.post("/v1/batches", json=batch), 403, "tasks[1].limits.memory")
        within = module_task(wasm.hello, limits={"memory": "64m", "timeout": "5s"})
        first = client.post("/v1/tasks?wait=20", json=within)
        assert first.status_code == 200 and first.json()["state"] == "succeeded"
        spent = client.post("/v1/tasks", json=within)  # today's CPU seconds are used up
        is_problem(spent, 429)
        assert 0 < int(spent.headers["retry-after"]) <= 86401
