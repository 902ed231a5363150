"""Webhooks from a real server to a receiver on loopback: signed, retried until taken, kept in
the store across a kill, and never sent to a private address unless the operator allows it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import WasmFixtures
from service_server import Service, free_port

pytest.importorskip("fastapi")


class Receiver:
    """An HTTP server on loopback that answers 500 to its first ``fail`` requests."""

    def __init__(self, port: int, fail: int = 0) -> None:
        self.port = port
        self.fail = fail
        self.got: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                failing = len(receiver.got) <= receiver.fail
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def named_url(self) -> str:
        """The receiver by name."""
        return f"http://localhost:{self.port}/hook"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"{len(self.got)} of {count} deliveries came"
            time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Service]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "sandbox:\n  service:\n    webhooks: {allow_private: true, retry_base: 0.3s}\n"
    )
    made = Service(tmp_path / "state", tmp_path / "cache")
    made.state.mkdir()
    made.extra_env = {"PARITY_SANDBOX_CONFIG": str(config)}
    made.make_key("ivan")
    made.start()
    try:
        yield made
    finally:
        made.stop()


def task_with_callback(wasm: WasmFixtures, url: str) -> dict[str, Any]:
    return {
        "wasm_module": base64.b64encode(wasm.hello.read_bytes()).decode(),
        "callback_url": url,
    }


def verify(secret: str, headers: dict[str, str], body: bytes) -> None:
    fields = dict(part.split("=", 1) for part in headers["x-parity-signature"].split(","))
    assert abs(time.time() - int(fields["t"])) < 60
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(fields["v1"], expected.hexdigest())


def test_a_webhook_is_signed_and_retried_until_taken(server: Service, wasm: WasmFixtures) -> None:
    receiver = Receiver(free_port(), fail=2)
    try:
        with server.client(server.keys["ivan"]) as client:
            secret = client.get("/v1/keys/me").json()["webhook_secret"]
            view = client.post(
                "/v1/tasks?wait=20", json=task_with_callback(wasm, receiver.url)
            ).json()
            assert view["state"] == "succeeded"
            receiver.wait_for(3)
            time.sleep(0.5)
            assert len(receiver.got) == 3  # taken on the third: no more
            for headers, body in receiver.got:
                verify(secret, headers, body)
            sent = json.loads(receiver.got[-1][1])
            assert sent["id"] == view["id"] and sent["state"] == "succeeded"
            assert base64.b64decode(sent["result"]["stdout"]) == b"hello\n"
            # a forged signature does not verify
            with pytest.raises(AssertionError):
                verify("not-the-secret", *receiver.got[-1])
            deadline = time.monotonic() + 10
            while True:
                (delivery,) = client.get(f"/v1/tasks/{view['id']}/deliveries").json()["deliveries"]
                if delivery["state"] == "delivered" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert (delivery["state"], delivery["attempts"]) == ("delivered", 3), delivery
    finally:
        receiver.close()


def test_a_webhook_goes_to_the_address_that_was_checked(
    server: Service, wasm: WasmFixtures
) -> None:
    """The delivery connects to an address the server resolved and checked itself (not to
    the name, which could resolve elsewhere a moment later), naming the host in ``Host``."""
    receiver = Receiver(free_port())
    try:
        with server.client(server.keys["ivan"]) as client:
            task = task_with_callback(wasm, receiver.named_url)
            assert client.post("/v1/tasks?wait=20", json=task).json()["state"] == "succeeded"
            receiver.wait_for(1)
        headers, _body = receiver.got[0]
        assert headers["host"] == f"localhost:{receiver.port}"
    finally:
        receiver.close()


def test_a_pending_webhook_is_sent_after_a_restart(server: Service, wasm: WasmFixtures) -> None:
    port = free_port()  # nobody listens there yet: every attempt fails
    with server.client(server.keys["ivan"]) as client:
        url = f"http://127.0.0.1:{port}/hook"
        view = client.post("/v1/tasks?wait=20", json=task_with_callback(wasm, url)).json()
        deadline = time.monotonic() + 20
        while not client.get(f"/v1/tasks/{view['id']}/deliveries").json()["deliveries"][0][
            "attempts"
        ]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    server.stop(signal.SIGKILL)
    receiver = Receiver(port)
    try:
        server.start()
        receiver.wait_for(1)
        assert receiver.got[0][0]["x-parity-event"] == "task.ended"
    finally:
        receiver.close()


def test_private_callbacks_are_refused_by_default(tmp_path: Path, wasm: WasmFixtures) -> None:
    made = Service(tmp_path / "state", tmp_path / "cache")
    made.state.mkdir()
    key = made.make_key("judy")
    made.start()
    try:
        with made.client(key) as client:
            for url in (
                "http://127.0.0.1:9/x",
                "http://localhost/x",
                "http://10.1.2.3/x",
                "http://169.254.169.254/latest/meta-data",
                "http://[::1]/x",
            ):
                response = client.post("/v1/tasks", json=task_with_callback(wasm, url))
                assert response.status_code == 422, (url, response.text)
                assert response.json()["field"] == "callback_url"
                assert "allow_private" in response.json()["detail"]
            assert client.get("/v1/tasks").json()["tasks"] == []  # nothing stored
    finally:
        made.stop()


def test_a_pinned_url_keeps_all_but_the_host() -> None:
    from parity_sandbox.service.webhooks import pinned

    v4, v6 = ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8::7")
    assert pinned("https://hooks.example.org/a?b=1", v4) == "https://203.0.113.7:443/a?b=1"
    assert pinned("http://u:p@example.org:8080/x", v6) == "http://u:p@[2001:db8::7]:8080/x"
    assert pinned("http://example.org/", v4) == "http://203.0.113.7:80/"
