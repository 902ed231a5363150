"""HTTP service benchmark: the API against the library it wraps, measured in the same run.

    .venv/bin/python bench/service_bench.py            # prints the tables
    .venv/bin/python bench/service_bench.py --quick    # fewer runs (a smoke run)

Starts its own ``parity-sandbox serve`` on loopback (a temporary state directory and cache, a
key made with ``parity-sandbox keys create``), SQLite store, default settings.

1. API overhead, per task: a WASM hello world (``examples/build/hello.wasm``, sent as
   ``wasm_module``) through ``POST /v1/tasks?wait=10``, one client, one request at a time,
   against ``WasmExecutor.execute`` of the same task in this process; ``GET /healthz`` shows
   what an HTTP round trip alone costs. The methods take turns in blocks, after a warm-up.
   Request bodies are encoded once: the client's JSON encoding is not what is measured.
2. Throughput: the same task from 16 concurrent clients (threads, one connection each), one
   task per request (``?wait=30``, then ``GET ?wait`` for a 202), against the library's
   ``execute_many`` in this process; with the server process's CPU time per task.

Targets: API p50 <= 2 ms above the library's; >= 500 tasks/s from 16 clients on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

import wasm_bench
from parity_sandbox import Config, Task, WasmExecutor

HELLO = wasm_bench.HELLO
CLI = [sys.executable, "-m", "parity_sandbox.cli"]
#: Latency and overhead targets (see the module's docstring).
MOST_OVERHEAD_MS = 2.0
LEAST_RATE = 500.0
CLIENTS = 16
Sampler = Callable[[int], list[float]]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


class Server:
    """A ``parity-sandbox serve`` process with its own state and cache, and one key."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
        self.env["PARITY_SANDBOX_SERVICE_STATE_DIR"] = str(root / "state")
        self.env["XDG_CACHE_HOME"] = str(root / "cache")
        made = subprocess.run(
            [*CLI, "keys", "create", "bench"], capture_output=True, env=self.env, check=True
        )
        self.key = made.stdout.decode().strip()
        self.log = root / "serve.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120
        )

    def cpu_seconds(self) -> float:
        """CPU time of the server process (all its threads; not its WASM workers)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="service-bench-") as tmp:
        running = Server(Path(tmp))
        try:
            yield running
        finally:
            running.stop()
            if "Traceback" in running.log.read_text():
                print(f"The server logged a traceback:\n{running.log.read_text()}")


def body(module: bytes) -> bytes:
    return b'{"wasm_module":"' + base64.b64encode(module) + b'"}'


JSON = {"Content-Type": "application/json"}


def submit_and_wait(client: httpx.Client, content: bytes, wait: float) -> dict[str, object]:
    """One task through the API, to its end: POST ?wait, then GET ?wait for a 202."""
    response = client.post("/v1/tasks", params={"wait": wait}, content=content, headers=JSON)
    if response.status_code not in (200, 202):
        raise SystemExit(f"POST /v1/tasks: {response.status_code} {response.text}")
    view: dict[str, object] = response.json()
    while view["state"] in ("queued", "running"):
        got = client.get(f"/v1/tasks/{view['id']}", params={"wait": wait})
        if got.status_code != 200:
            raise SystemExit(f"GET /v1/tasks/{view['id']}: {got.status_code} {got.text}")
        view = got.json()
    return view


def overhead(service: Server, rounds: int, block: int) -> list[str]:
    module = HELLO.read_bytes()
    task = Task(wasm_module=module)
    content = body(module)
    expected = base64.b64encode(b"hello, world\n").decode()

    with (
        tempfile.TemporaryDirectory() as cache,
        WasmExecutor(Config(cache_dir=Path(cache))) as executor,
        service.client() as client,
    ):

        def library(runs: int) -> list[float]:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                result = executor.execute(task)
                times.append(time.perf_counter() - started)
                assert result.stdout == b"hello, world\n", result
            return times

        def api(runs: int) -> list[float]:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                view = submit_and_wait(client, content, 10)
                times.append(time.perf_counter() - started)
                result = view["result"]
                assert isinstance(result, dict) and result["stdout"] == expected, view
            return times

        def healthz(runs: int) -> list[float]:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                client.get("/healthz").raise_for_status()
                times.append(time.perf_counter() - started)
            return times

        library_name = "library `WasmExecutor.execute` (same task, this process)"
        api_name = "API `POST /v1/tasks?wait=10` (one client, sequential)"
        methods: dict[str, Sampler] = {
            library_name: library,
            api_name: api,
            "HTTP round trip alone (`GET /healthz`)": healthz,
        }
        for method in methods.values():
            method(max(20, block // 2))  # warm-up: workers, compiled module, connections
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(rounds):
            for name, method in methods.items():
                samples[name] += method(block)
    p50 = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    p90 = {name: pct(values, 90) * 1e3 for name, values in samples.items()}
    lines = [
        "| method | p50 (ms) | p90 (ms) | p50 - library p50 (ms) | p50 / library p50 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in samples:
        lines.append(
            f"| {name} | {p50[name]:.2f} | {p90[name]:.2f} | "
            f"{p50[name] - p50[library_name]:+.2f} | {p50[name] / p50[library_name]:.2f}x |"
        )
    extra = p50[api_name] - p50[library_name]
    met = "met" if extra <= MOST_OVERHEAD_MS else "NOT met"
    lines += [
        "",
        f"Module {HELLO.name}, {len(module) / 1024:.0f} KiB ({len(content) / 1024:.0f} KiB as "
        f"a request body). {rounds} rounds of {block} runs per method, taking turns.",
        f"Target: API p50 <= {MOST_OVERHEAD_MS:g} ms above the library's: {extra:+.2f} ms, {met}.",
    ]
    return lines


def api_rate(service: Server, count: int, clients: int) -> tuple[float, float, dict[int, int]]:
    """Tasks/s of ``count`` hello worlds from ``clients`` threads, the server's CPU seconds
    per task, and the status codes of the submissions."""
    content = body(HELLO.read_bytes())
    left = iter(range(count))
    lock = threading.Lock()
    codes: dict[int, int] = {}
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with service.client() as client:
            submit_and_wait(client, content, 30)  # its connection, open
            start.wait()
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                response = client.post(
                    "/v1/tasks", params={"wait": 30}, content=content, headers=JSON
                )
                with lock:
                    codes[response.status_code] = codes.get(response.status_code, 0) + 1
                view = response.json()
                while view["state"] in ("queued", "running"):
                    view = client.get(f"/v1/tasks/{view['id']}", params={"wait": 30}).json()
                if view["state"] != "succeeded":
                    raise SystemExit(f"a task ended {view['state']}: {view}")

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop) for _ in range(clients)]
        start.wait()
        cpu, started = service.cpu_seconds(), time.perf_counter()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
        cpu = service.cpu_seconds() - cpu
    return count / elapsed, cpu / count, codes


def throughput(service: Server, count: int) -> list[str]:
    task = Task(wasm_module=HELLO.read_bytes())
    with tempfile.TemporaryDirectory() as cache, WasmExecutor(Config(cache_dir=Path(cache))) as ex:
        ex.execute_many([task] * 50)
        started = time.perf_counter()
        results = ex.execute_many([task] * count)
        library = count / (time.perf_counter() - started)
        assert all(result.stdout == b"hello, world\n" for result in results)
        parallel = ex.max_parallel()
    rate, cpu_per_task, codes = api_rate(service, count, CLIENTS)
    met = "met" if rate >= LEAST_RATE else "NOT met"
    answers = ", ".join(f"{n} x {code}" for code, n in sorted(codes.items()))
    return [
        "| method | tasks/s | / library | server CPU per task (ms) |",
        "| --- | ---: | ---: | ---: |",
        f"| library `execute_many` (this process, {parallel} at once) | {library:.1f} | "
        "1.00x | - |",
        f"| API, {CLIENTS} clients, one task per request | {rate:.1f} | {rate / library:.2f}x | "
        f"{cpu_per_task * 1e3:.1f} |",
        "",
        f"{count} tasks each; the submissions were answered {answers}. Server CPU: the "
        f"`serve` process's own (its WASM workers not included); the clients share the "
        f"{len(os.sched_getaffinity(0))} cores with it.",
        f"Target: >= {LEAST_RATE:g} tasks/s from {CLIENTS} clients: {rate:.1f}, {met}.",
    ]


def sections(service: Server, quick: bool) -> Iterator[tuple[str, list[str]]]:
    rounds, block = (2, 50) if quick else (5, 100)
    yield "API overhead, per task: WASM hello world", overhead(service, rounds, block)
    yield "Throughput: WASM hello world", throughput(service, 300 if quick else 2000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    options = parser.parse_args()
    if not HELLO.is_file():
        raise SystemExit(f"{HELLO} is missing: run `bash scripts/bootstrap.sh` first")
    print(f"Machine: {wasm_bench.machine()}")
    print(f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with server() as service:
        for title, lines in sections(service, options.quick):
            print("\n".join(["", f"## {title}", "", *lines]), flush=True)


if __name__ == "__main__":
    main()
