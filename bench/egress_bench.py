"""Network egress: what a grant costs a Docker task's cold start, and what the egress proxy
costs a download. Both measured against their baseline in the same run, in turns.

    .venv/bin/python bench/egress_bench.py            # the tables
    .venv/bin/python bench/egress_bench.py --quick    # fewer runs

1. Cold start under runc, then under runsc: ``true`` in a fresh container (no warm pool),
   without a grant and with one (a veth and proxy made and removed per task; under runsc also
   the pause container that holds the namespace); p50 of each and the difference. Target
   (runc): <= 60 ms added; under runsc the figure is reported, with no target.
2. Proxy throughput: one 100 MB download from an origin on loopback, through an
   ``EgressProxy`` (plain HTTP) and straight from the origin; MB/s of each. Target: the proxy
   keeps >= 50% of the direct rate.

Needs root and the engine and test image of ``scripts/docker-setup.sh``. Sends nothing off
this host: the origin and the proxy listen on loopback.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from parity_sandbox import Config, DockerExecutor, Task
from parity_sandbox._egress import AllowList
from parity_sandbox._proxy import EgressProxy

IMAGE = "parity-sandbox-test/busybox"
MOST_ADDED_MS = 60.0
LEAST_SHARE = 0.5
SIZE = 100 * 1024 * 1024
_BLOCK = b"x" * (1 << 20)


class Origin:
    """An HTTP server on loopback whose every GET answers ``SIZE`` bytes."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(SIZE))
                self.end_headers()
                for _ in range(SIZE // len(_BLOCK)):
                    self.wfile.write(_BLOCK)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def download(port: int, head: bytes) -> float:
    """Seconds to send ``head`` to ``port`` on loopback and read the answer to its end."""
    started = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(1 << 20):
            got += len(data)
    elapsed = time.perf_counter() - started
    assert got > SIZE, f"only {got} bytes came"
    return elapsed


def throughput(rounds: int) -> list[str]:
    origin = Origin()
    proxy = EgressProxy(AllowList.parse([f"127.0.0.1/32:{origin.port}"]), max_bytes=1 << 40)
    proxy_port = proxy.start("127.0.0.1")
    url = f"http://127.0.0.1:{origin.port}/data"
    direct_head = f"GET /data HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    proxied_head = f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    direct, proxied = [], []
    try:
        for _ in range(rounds):
            direct.append(download(origin.port, direct_head))
            proxied.append(download(proxy_port, proxied_head))
    finally:
        proxy.close()
        origin.server.shutdown()
    mb = SIZE / 1e6
    rate_direct = mb / statistics.median(direct)
    rate_proxied = mb / statistics.median(proxied)
    share = rate_proxied / rate_direct
    met = "met" if share >= LEAST_SHARE else "NOT met"
    return [
        "| download of 100 MB | median MB/s | / direct |",
        "| --- | ---: | ---: |",
        f"| straight from the origin | {rate_direct:.0f} | 1.00x |",
        f"| through the egress proxy | {rate_proxied:.0f} | {share:.2f}x |",
        "",
        f"{rounds} downloads each, in turns, on loopback.",
        f"Target: the proxy keeps >= {LEAST_SHARE:.0%} of the direct rate: {share:.0%}, {met}.",
    ]


def cold_start(rounds: int, runtime: str) -> list[str]:
    plain = Task(image=IMAGE, command=["true"], oci_runtime=runtime)
    granted = Task(
        image=IMAGE,
        command=["true"],
        oci_runtime=runtime,
        network={"allow": ["data.example.org:443"]},
    )
    times: dict[str, list[float]] = {"without a grant": [], "with a grant": []}
    with DockerExecutor(Config(cache={"enabled": False})) as executor:
        for task in (plain, granted):  # warm-up: images, the egress table and loop
            executor.execute(task)
        for _ in range(rounds):
            for name, task in (("without a grant", plain), ("with a grant", granted)):
                started = time.perf_counter()
                assert executor.execute(task).ok
                times[name].append(time.perf_counter() - started)
    p50 = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    added = p50["with a grant"] - p50["without a grant"]
    if runtime == "runc":
        met = "met" if added <= MOST_ADDED_MS else "NOT met"
        target = f"Target: <= {MOST_ADDED_MS:g} ms added: {met}."
    else:
        target = (
            "No target under runsc: a grant adds a pause container (runc) that holds the "
            "namespace, started before the sandbox, and gVisor's network stack."
        )
    return [
        f"| {runtime} cold start of `true` | p50 (ms) |",
        "| --- | ---: |",
        *(f"| {name} | {value:.1f} |" for name, value in p50.items()),
        "",
        f"{rounds} runs each, in turns. Added by a grant: {added:+.1f} ms.",
        target,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    quick = parser.parse_args().quick
    for runtime in ("runc", "runsc"):
        lines = cold_start(5 if quick else 20, runtime)
        print("\n".join([f"## Cold start ({runtime})", "", *lines, ""]), flush=True)
    print("\n".join(["## Proxy throughput", "", *throughput(2 if quick else 5)]))


if __name__ == "__main__":
    main()
