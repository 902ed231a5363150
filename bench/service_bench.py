"""HTTP service benchmark: the API against the library it wraps, measured in the same run.

    .venv/bin/python bench/service_bench.py            # prints the tables
    .venv/bin/python bench/service_bench.py --quick    # fewer runs (a smoke run)

Starts its own ``parity-sandbox serve`` on loopback (a temporary state directory and cache, a
key made with ``parity-sandbox keys create``), SQLite store, default settings.

1. API overhead, per task: a WASM hello world (``examples/build/hello.wasm``) through
   ``POST /v1/tasks?wait=10``, one client, one request at a time, against
   ``WasmExecutor.execute`` of the same task in this process. The task names its module by
   hash (``wasm_module_sha256``, the module PUT once: how a client sends a module it runs
   often); a second row sends the module in every request (``wasm_module``, base64).
   ``GET /healthz`` shows what an HTTP round trip alone costs. The methods take turns in
   blocks, after a warm-up. Request bodies are encoded once: the client's JSON encoding is
   not what is measured.
2. Throughput: the same task from 16 concurrent clients (threads, one connection each), one
   task per request (``?wait=30``, then ``GET ?wait`` for a 202), and in batches of 100
   (``POST /v1/batches?wait=30``, 4 clients), against the library's ``execute_many`` in
   this process; with the server process's CPU time per task.

Targets: API p50 <= 2 ms above the library's; >= 500 tasks/s from 16 clients, and >= 2,000
tasks/s through ``/v1/batches``, on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
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
LEAST_BATCH_RATE = 2000.0
CLIENTS = 16
#: Seconds the paused library row idles before each call (about one API round trip).
PAUSE = 0.003
BATCH = 100
BATCH_CLIENTS = 4
Sampler = Callable[[int], list[float]]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


class Server:
    """A ``parity-sandbox serve`` process with its own state and cache, and one key."""

    def __init__(self, root: Path, *, audit: bool = False) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_SANDBOX_")}
        self.env["PARITY_SANDBOX_SERVICE_STATE_DIR"] = str(root / "state")
        self.env["XDG_CACHE_HOME"] = str(root / "cache")
        if audit:  # the service's audit log: written on its own thread, synced per batch
            self.env["PARITY_SANDBOX_AUDIT_PATH"] = str(root / "state" / "audit.log")
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
def server(audit: bool = False) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="service-bench-") as tmp:
        running = Server(Path(tmp), audit=audit)
        try:
            yield running
        finally:
            running.stop()
            if "Traceback" in running.log.read_text():
                print(f"The server logged a traceback:\n{running.log.read_text()}")


def body(module: bytes) -> bytes:
    """A task that carries its module (base64)."""
    return b'{"wasm_module":"' + base64.b64encode(module) + b'"}'


def by_hash(service: Server, module: bytes) -> bytes:
    """A task that names its module by hash (the module PUT to the server first)."""
    digest = hashlib.sha256(module).hexdigest()
    with service.client() as client:
        client.put(f"/v1/modules/{digest}", content=module).raise_for_status()
    return b'{"wasm_module_sha256":"' + digest.encode() + b'"}'


JSON = {"Content-Type": "application/json"}
HELLO_OUT = base64.b64encode(b"hello, world\n").decode()


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
    result = view["result"]
    if view["state"] != "succeeded" or not isinstance(result, dict):
        raise SystemExit(f"a task ended {view['state']}: {view}")
    if result["stdout"] != HELLO_OUT:
        raise SystemExit(f"a task wrote {result['stdout']!r}")
    return view


def overhead(service: Server, rounds: int, block: int) -> list[str]:
    module = HELLO.read_bytes()
    task = Task(wasm_module=module)
    named, carried = by_hash(service, module), body(module)

    with (
        tempfile.TemporaryDirectory() as cache,
        WasmExecutor(Config(cache_dir=Path(cache))) as executor,
        service.client() as client,
    ):

        def library(runs: int, pause: float = 0.0) -> list[float]:
            times = []
            for _ in range(runs):
                if pause:
                    time.sleep(pause)
                started = time.perf_counter()
                result = executor.execute(task)
                times.append(time.perf_counter() - started)
                assert result.stdout == b"hello, world\n", result
            return times

        def library_paused(runs: int) -> list[float]:
            return library(runs, PAUSE)

        def api(content: bytes) -> Sampler:
            def sample(runs: int) -> list[float]:
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    submit_and_wait(client, content, 10)
                    times.append(time.perf_counter() - started)
                return times

            return sample

        def healthz(runs: int) -> list[float]:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                client.get("/healthz").raise_for_status()
                times.append(time.perf_counter() - started)
            return times

        library_name = "library `WasmExecutor.execute` (same task, this process)"
        api_name = "API `POST /v1/tasks?wait=10`, module by hash (one client, sequential)"
        methods: dict[str, Sampler] = {
            library_name: library,
            api_name: api(named),
            "API, the module in every request (base64)": api(carried),
            "HTTP round trip alone (`GET /healthz`)": healthz,
            f"library, {PAUSE * 1e3:g} ms idle before each call (as between API requests)": (
                library_paused
            ),
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
        f"Module {HELLO.name}, {len(module) / 1024:.0f} KiB ({len(carried) / 1024:.0f} KiB as "
        f"a request body when carried). {rounds} rounds of {block} runs per method, taking "
        "turns.",
        f"Target: API p50 <= {MOST_OVERHEAD_MS:g} ms above the library's: {extra:+.2f} ms, {met}.",
        "The last row: the same library call after the machine idled a moment, as the worker "
        "does between API requests (waking an idle CPU is part of the API's time).",
    ]
    return lines


def run_clients(clients: int, work: Callable[[httpx.Client], int], service: Server) -> float:
    """Seconds for ``clients`` threads, each with its own connection, to call ``work`` until
    it returns 0 (``work`` returns how many tasks it ended)."""
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with service.client() as client:
            client.get("/healthz").raise_for_status()  # its connection, open
            start.wait()
            while work(client):
                pass

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop) for _ in range(clients)]
        start.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        return time.perf_counter() - started


def api_rate(service: Server, content: bytes, count: int) -> tuple[float, float, dict[int, int]]:
    """Tasks/s of ``count`` hello worlds from ``CLIENTS`` threads, one task per request, the
    server's CPU seconds per task, and the status codes of the submissions."""
    left = iter(range(count))
    lock = threading.Lock()
    codes: dict[int, int] = {}

    def one(client: httpx.Client) -> int:
        with lock:
            if next(left, None) is None:
                return 0
        response = client.post("/v1/tasks", params={"wait": 30}, content=content, headers=JSON)
        with lock:
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
        view = response.json()
        while view["state"] in ("queued", "running"):
            view = client.get(f"/v1/tasks/{view['id']}", params={"wait": 30}).json()
        if view["state"] != "succeeded" or view["result"]["stdout"] != HELLO_OUT:
            raise SystemExit(f"a task ended {view['state']}: {view}")
        return 1

    cpu = service.cpu_seconds()
    elapsed = run_clients(CLIENTS, one, service)
    return count / elapsed, (service.cpu_seconds() - cpu) / count, codes


def batch_rate(service: Server, content: bytes, count: int) -> tuple[float, float]:
    """Tasks/s of ``count`` hello worlds in batches of ``BATCH`` from ``BATCH_CLIENTS``
    threads, and the server's CPU seconds per task."""
    batches = iter(range(count // BATCH))
    lock = threading.Lock()
    batch = b'{"tasks":[' + b",".join([content] * BATCH) + b"]}"

    def one(client: httpx.Client) -> int:
        with lock:
            if next(batches, None) is None:
                return 0
        response = client.post("/v1/batches", params={"wait": 30}, content=batch, headers=JSON)
        if response.status_code != 200:
            raise SystemExit(f"POST /v1/batches: {response.status_code} {response.text[:500]}")
        views = response.json()["tasks"]
        bad = [view for view in views if view["state"] != "succeeded"]
        if len(views) != BATCH or bad or views[0]["result"]["stdout"] != HELLO_OUT:
            raise SystemExit(f"a batch came back with {len(views)} tasks, {bad[:1]}")
        return BATCH

    cpu = service.cpu_seconds()
    elapsed = run_clients(BATCH_CLIENTS, one, service)
    done = count // BATCH * BATCH
    return done / elapsed, (service.cpu_seconds() - cpu) / done


def throughput(service: Server, count: int) -> list[str]:
    module = HELLO.read_bytes()
    task = Task(wasm_module=module)
    with tempfile.TemporaryDirectory() as cache, WasmExecutor(Config(cache_dir=Path(cache))) as ex:
        ex.execute_many([task] * 50)
        started = time.perf_counter()
        results = ex.execute_many([task] * count)
        library = count / (time.perf_counter() - started)
        assert all(result.stdout == b"hello, world\n" for result in results)
        parallel = ex.max_parallel()
    named = by_hash(service, module)
    batch_rate(service, named, BATCH * BATCH_CLIENTS)  # warm-up
    rate, cpu_per_task, codes = api_rate(service, named, count)
    batched, cpu_per_batched = batch_rate(service, named, count)
    met = "met" if rate >= LEAST_RATE else "NOT met"
    met_batched = "met" if batched >= LEAST_BATCH_RATE else "NOT met"
    answers = ", ".join(f"{n} x {code}" for code, n in sorted(codes.items()))
    return [
        "| method | tasks/s | / library | server CPU per task (ms) |",
        "| --- | ---: | ---: | ---: |",
        f"| library `execute_many` (this process, {parallel} at once) | {library:.1f} | "
        "1.00x | - |",
        f"| API, {CLIENTS} clients, one task per request | {rate:.1f} | {rate / library:.2f}x | "
        f"{cpu_per_task * 1e3:.2f} |",
        f"| API, {BATCH_CLIENTS} clients, `/v1/batches` of {BATCH} | {batched:.1f} | "
        f"{batched / library:.2f}x | {cpu_per_batched * 1e3:.2f} |",
        "",
        f"{count} tasks each, naming the module by hash; the single submissions were answered "
        f"{answers}. Server CPU: the `serve` process's own (its WASM workers not included); "
        f"the clients share the {len(os.sched_getaffinity(0))} cores with it.",
        f"Target: >= {LEAST_RATE:g} tasks/s from {CLIENTS} clients: {rate:.1f}, {met}.",
        f"Target: >= {LEAST_BATCH_RATE:g} tasks/s through batches: {batched:.1f}, {met_batched}.",
    ]


def sections(service: Server, quick: bool) -> Iterator[tuple[str, list[str]]]:
    rounds, block = (2, 50) if quick else (5, 100)
    yield "API overhead, per task: WASM hello world", overhead(service, rounds, block)
    yield "Throughput: WASM hello world", throughput(service, 300 if quick else 2000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    parser.add_argument(
        "--audit", action="store_true", help="the server writes an audit log (audit.path set)"
    )
    options = parser.parse_args()
    if not HELLO.is_file():
        raise SystemExit(f"{HELLO} is missing: run `bash scripts/bootstrap.sh` first")
    print(f"Machine: {wasm_bench.machine()}")
    print(f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with server(options.audit) as service:
        for title, lines in sections(service, options.quick):
            print("\n".join(["", f"## {title}", "", *lines]), flush=True)


if __name__ == "__main__":
    main()
