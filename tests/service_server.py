"""A real ``parity-sandbox serve`` process for tests: its own state directory, keys made with
the CLI, a free port on loopback; started, killed and restarted as a test needs."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

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
    #: More environment for the server and the CLI (PARITY_SANDBOX_SERVICE_*, say).
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
        environ["PARITY_SANDBOX_SERVICE_STATE_DIR"] = str(self.state)
        environ["XDG_CACHE_HOME"] = str(self.cache)
        environ["PARITY_SANDBOX_TIMEOUT"] = "10s"
        environ.update(self.extra_env)
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

    def database_rows(self, query: str) -> list[tuple[Any, ...]]:
        """Rows of ``query`` on the server's SQLite store (read-only, beside the server)."""
        uri = f"file:{self.state / 'service.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            return connection.execute(query).fetchall()

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@contextlib.contextmanager
def running_service(
    tmp_path_factory: Any, extra_env: dict[str, str] | None = None
) -> Iterator[Service]:
    """A started server with the keys ``alice``, ``bob`` and ``root`` (admin); stopped after,
    and its log must then hold no traceback."""
    state = tmp_path_factory.mktemp("state")
    server = Service(state, tmp_path_factory.mktemp("cache"))
    server.extra_env.update({k: v.format(state=state) for k, v in (extra_env or {}).items()})
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
    """A task in record form whose module travels with it (base64)."""
    return {"wasm_module": base64.b64encode(path.read_bytes()).decode(), **fields}
