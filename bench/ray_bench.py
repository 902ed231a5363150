"""Distributed execution: what running a task on a Ray cluster costs over running it here, and
what node kills cost a ``map``. Each figure against its baseline, measured in the same run.

    .venv/bin/python bench/ray_bench.py            # the tables
    .venv/bin/python bench/ray_bench.py --quick    # fewer tasks, fewer kills

A three-node cluster on loopback (``node start``: the head and two workers, WASM, one CPU
each, every node with its own temp dir and ports) on this host's cores:

1. Per-task overhead: WASM hello world, ``execute`` one at a time, on a local
   ``WasmExecutor`` and on the ``RayExecutor``, in turns; p50 of each and the difference.
   Target: <= 5 ms.
2. Throughput: 2,000 WASM tasks through ``map``, locally and over the cluster (the same cores:
   the overhead is what is measured); tasks/s of each and the share. Target: >= 0.5x. Also
   how many times the module went into the object store (target: once).
3. Faults: a ``map`` of WASM tasks while a fresh node is started and then SIGKILLed, 20 times
   in a row; tasks lost (no correct result), duplicated (more results than tasks, or a result
   out of place), and run twice (``attempts == 2``). Target: 0 lost, 0 duplicated.

Needs nothing but the ``ray`` extra; sends nothing off this host.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from secrets import token_hex

from parity_sandbox import Config, Result, Task, WasmExecutor
from parity_sandbox.cluster import node as nodes
from parity_sandbox.cluster.executor import RayExecutor

HELLO = Path(__file__).parent.parent / "examples" / "build" / "hello.wasm"
MOST_OVERHEAD_MS = 5.0
LEAST_SHARE = 0.5


def free_base() -> int:
    for _ in range(200):
        base = random.randrange(30000, 59000, 100)
        try:
            for port in range(base, base + 100):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        token = root / "token"
        token.write_text(token_hex(32))
        self.config = Config(cache={"enabled": False}, ray={"token_file": token, "grace": 5})
        self.base = free_base()
        self.address = f"127.0.0.1:{self.base}"
        self.state = root / "state"
        self.pids: dict[str, int] = {}

    def add(self, name: str, *, head: bool = False) -> None:
        started = nodes.start(
            self.address,
            head=head,
            name=name,
            temp_dir=self.root / name,
            state_dir=self.state,
            config=self.config,
            num_cpus=1,
            ports_from=self.base if head else free_base(),
            runtimes=("wasm",),
        )
        self.pids[name] = started.pid

    def kill(self, name: str) -> None:
        for pid in nodes.processes(self.pids.pop(name)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        nodes.stop(self.state, name)

    def close(self) -> None:
        nodes.stop(self.state)


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def overhead(local: WasmExecutor, remote: RayExecutor, module: bytes, runs: int) -> None:
    task = Task(wasm_module=module, args=["bench"])
    for executor in (local, remote):
        for _ in range(20):
            executor.execute(task)
    here: list[float] = []
    there: list[float] = []
    for _ in range(runs):
        for executor, samples in ((local, here), (remote, there)):
            started = time.perf_counter()
            executor.execute(task)
            samples.append(time.perf_counter() - started)
    added = p50_ms(there) - p50_ms(here)
    verdict = "met" if added <= MOST_OVERHEAD_MS else "NOT met"
    print("\n## Per-task overhead (WASM hello, execute, p50)\n")
    print("| executor | p50 |\n| --- | ---: |")
    print(f"| WasmExecutor (local) | {p50_ms(here):.2f} ms |")
    print(f"| RayExecutor (3 nodes) | {p50_ms(there):.2f} ms |")
    print(f"| added | {added:+.2f} ms (target <= {MOST_OVERHEAD_MS:g} ms: {verdict}) |")


def throughput(local: WasmExecutor, remote: RayExecutor, module: bytes, count: int) -> None:
    def tasks() -> list[Task]:
        return [Task(wasm_module=module, args=[str(i)]) for i in range(count)]

    rates = {}
    for name, executor in (("local", local), ("ray", remote)):
        list(executor.map(tasks()[:300], use_cache=False))  # every node's workers warm
        batch = tasks()
        started = time.perf_counter()
        results = list(executor.map(batch, use_cache=False))
        took = time.perf_counter() - started
        wrong = sum(r.stdout != f"hello, {i}\n".encode() for i, r in enumerate(results))
        assert not wrong, f"{wrong} wrong results from {name}"
        rates[name] = count / took
    share = rates["ray"] / rates["local"]
    verdict = "met" if share >= LEAST_SHARE else "NOT met"
    print(f"\n## Throughput ({count} WASM hello tasks through map)\n")
    print("| executor | tasks/s |\n| --- | ---: |")
    print(f"| WasmExecutor (local) | {rates['local']:.0f} |")
    print(f"| RayExecutor (3 nodes) | {rates['ray']:.0f} |")
    print(f"| share | {share:.2f}x (target >= {LEAST_SHARE}x: {verdict}) |")
    print(f"\nThe module went into the object store {len(remote._modules)} time(s).")


def faults(cluster: Cluster, remote: RayExecutor, module: bytes, kills: int) -> None:
    done = threading.Event()
    killed: list[float] = []

    def killer() -> None:
        try:
            for k in range(kills):
                name = f"k{k}"
                cluster.add(name)
                time.sleep(1.5)  # it takes tasks
                killed.append(time.monotonic())
                cluster.kill(name)
        finally:
            done.set()

    def tasks() -> Iterator[Task]:
        for i in itertools.count():
            if done.is_set():
                return
            yield Task(wasm_module=module, args=[str(i)])

    thread = threading.Thread(target=killer)
    started = time.monotonic()
    thread.start()
    results: list[Result] = list(remote.map(tasks(), use_cache=False))
    thread.join()
    took = time.monotonic() - started
    lost = sum(r.stdout != f"hello, {i}\n".encode() for i, r in enumerate(results))
    seen = [r.stdout for r in results]
    duplicated = len(seen) - len(set(seen))
    twice = sum(r.attempts == 2 for r in results)
    verdict = "met" if lost == duplicated == 0 else "NOT met"
    print(f"\n## Faults ({len(killed)} node kills in a row during one map)\n")
    print("| figure | value |\n| --- | ---: |")
    print(f"| tasks | {len(results)} in {took:.0f} s |")
    print(f"| lost | {lost} |")
    print(f"| duplicated | {duplicated} |")
    print(f"| run again on another node (attempts == 2) | {twice} |")
    print(f"\nTarget: 0 lost, 0 duplicated: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and kills")
    quick = parser.parse_args().quick
    module = HELLO.read_bytes()
    root = Path(tempfile.mkdtemp(prefix="psbray-", dir="/tmp"))
    cluster = Cluster(root)
    try:
        started = time.monotonic()
        cluster.add("head", head=True)
        cluster.add("w1")
        cluster.add("w2")
        print(f"# Ray bench: 3 nodes on loopback, up in {time.monotonic() - started:.1f} s")
        with (
            WasmExecutor(Config(cache={"enabled": False})) as local,
            RayExecutor(cluster.address, config=cluster.config) as remote,
        ):
            overhead(local, remote, module, 100 if quick else 300)
            throughput(local, remote, module, 500 if quick else 2000)
            faults(cluster, remote, module, 3 if quick else 20)
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
