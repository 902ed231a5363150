"""Monitoring benchmark: what metrics cost a task, measured in the same run.

    .venv/bin/python bench/monitoring_bench.py            # WASM and Docker cold
    .venv/bin/python bench/monitoring_bench.py --quick    # fewer runs (a smoke run)
    .venv/bin/python bench/monitoring_bench.py --no-docker

Two executors of each runtime live side by side, one with metrics (``metrics=Metrics()``) and
one without, and take turns in short blocks (a noisy machine's drift hits both alike):

1. Per-task latency of a WASM hello world (``examples/build/hello.wasm``, compiled module
   cached), ``execute`` one at a time; also with the audit log on (``fsync: batch``), for
   information.
2. Per-task latency of a cold Docker task (``echo hi`` in the test image, runc, no warm pool).

Targets: metrics on costs the WASM p50 <= 5% and the Docker cold p50 <= 2%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasm_bench
from parity_sandbox import AuditLog, Config, DockerExecutor, Executor, Task, WasmExecutor
from parity_sandbox.metrics import Metrics

HELLO = wasm_bench.HELLO
IMAGE = "parity-sandbox-test/busybox:latest"
WASM_TARGET = 0.05
DOCKER_TARGET = 0.02


def timed(executor: Executor, task: Task, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        executor.execute(task)
        times.append(time.perf_counter() - started)
    return times


def interleaved(
    executors: dict[str, Executor], task: Task, rounds: int, block: int
) -> dict[str, list[float]]:
    """Each executor runs ``block`` tasks in turn, ``rounds`` times (after a warm-up)."""
    for executor in executors.values():
        timed(executor, task, max(1, block // 4))
    times: dict[str, list[float]] = {name: [] for name in executors}
    for round_ in range(rounds):
        # alternate who goes first: the first of a pair may pay for the other's cleanup
        order = list(executors.items())
        for name, executor in order if round_ % 2 == 0 else reversed(order):
            times[name] += timed(executor, task, block)
    return times


def table(times: dict[str, list[float]], unit: float, unit_name: str) -> list[str]:
    base = statistics.median(times["off"])
    lines = [
        f"| monitoring | tasks | p50 ({unit_name}) | p90 ({unit_name}) | p50 vs off |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, values in times.items():
        p50 = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[8]
        lines.append(
            f"| {name} | {len(values)} | {p50 / unit:.3f} | {p90 / unit:.3f} | {p50 / base:.3f} |"
        )
    return lines


def verdict(times: dict[str, list[float]], target: float) -> str:
    ratio = statistics.median(times["metrics"]) / statistics.median(times["off"])
    met = "met" if ratio - 1 <= target else "NOT met"
    return f"Target: metrics p50 <= {1 + target:.2f}x off: {ratio:.3f}x, {met}."


def wasm_section(rounds: int, block: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="monitoring-bench-") as tmp:
        config = Config(cache_dir=Path(tmp), cache={"enabled": False})
        audit = AuditLog(Path(tmp) / "audit.log", fsync="batch")
        with (
            WasmExecutor(config, workers=1) as off,
            WasmExecutor(config, workers=1, metrics=Metrics()) as on,
            WasmExecutor(config, workers=1, metrics=Metrics(), audit=audit) as audited,
            audit,
        ):
            executors: dict[str, Executor] = {"off": off, "metrics": on, "metrics+audit": audited}
            times = interleaved(executors, Task(wasm_file=HELLO), rounds, block)
    return [*table(times, 1e-6, "us"), "", verdict(times, WASM_TARGET)]


def docker_section(rounds: int, block: int) -> list[str]:
    config = Config(cache={"enabled": False}, docker={"pool": {"enabled": False}})
    make: Callable[..., DockerExecutor] = DockerExecutor
    with make(config) as off, make(config, metrics=Metrics()) as on:
        executors: dict[str, Executor] = {"off": off, "metrics": on}
        task = Task(image=IMAGE, command=("echo", "hi"))
        times = interleaved(executors, task, rounds, block)
        off.drain()
        on.drain()
    return [*table(times, 1e-3, "ms"), "", verdict(times, DOCKER_TARGET)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    parser.add_argument("--no-docker", action="store_true", help="WASM only")
    options = parser.parse_args()
    if not HELLO.is_file():
        raise SystemExit(f"{HELLO} is missing: run `bash scripts/bootstrap.sh` first")
    print(f"Machine: {wasm_bench.machine()}")
    print(f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    wasm_rounds, wasm_block = (4, 100) if options.quick else (20, 200)
    print("\n## Per task: WASM hello world\n")
    print("\n".join(wasm_section(wasm_rounds, wasm_block)), flush=True)
    if not options.no_docker:
        docker_rounds, docker_block = (4, 3) if options.quick else (20, 5)
        print("\n## Per task: Docker cold (runc, echo hi)\n")
        print("\n".join(docker_section(docker_rounds, docker_block)), flush=True)


if __name__ == "__main__":
    main()
