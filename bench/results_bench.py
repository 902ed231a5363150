"""What hashing and the result cache cost, measured in one run.

    .venv/bin/python bench/results_bench.py [--redis redis://127.0.0.1:PORT/0]

1. A deterministic hello-world task: run (cache off) against a hit in the SQLite cache, and in
   Redis when ``--redis`` names a server (start one: ``redis-server --port 6390 --save ''``).
2. ``Task.spec_hash`` of a task with 1 MiB of stdin and 10 input files of 100 KiB.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from parity_sandbox import Config, Task, WasmExecutor, spec_hash

HELLO = Path(__file__).resolve().parent.parent / "examples" / "build" / "hello.wasm"


def timed(action: Callable[[], object], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), statistics.quantiles(times, n=10)[8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="a Redis URL, to measure that backend too")
    parser.add_argument("--runs", type=int, default=300)
    options = parser.parse_args()
    task = Task(wasm_file=HELLO, deterministic=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        configs = {
            "run (cache off)": Config(cache_dir=work, cache={"enabled": False}),
            "SQLite cache hit": Config(cache_dir=work, cache={"path": Path(work) / "r.sqlite3"}),
        }
        if options.redis:
            configs["Redis cache hit"] = Config(
                cache_dir=work, cache={"backend": "redis", "redis_url": options.redis}
            )
        for name, config in configs.items():
            with WasmExecutor(config) as executor:
                executor.execute(task)  # warm: compiled module, and the entry stored
                p50, p90 = timed(partial(executor.execute, task), options.runs)
                rows.append((name, p50, p90))
    base = rows[0][1]
    print("| what | p50 (us) | p90 (us) | p50 / run |")
    print("| --- | ---: | ---: | ---: |")
    for name, p50, p90 in rows:
        print(f"| {name} | {p50 * 1e6:.0f} | {p90 * 1e6:.0f} | {p50 / base:.2f}x |")
    heavy = Task(
        wasm_module=HELLO.read_bytes(),
        stdin=b"x" * (1 << 20),
        input_files={f"f{i}": bytes(100 << 10) for i in range(10)},
    )
    p50, p90 = timed(lambda: spec_hash(heavy), 50)
    print(f"\nspec_hash of a task with 1 MiB stdin and 10 x 100 KiB inputs: p50 {p50 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
