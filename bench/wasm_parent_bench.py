"""The WASM executor's parent-side cost: CPU per task in ``map`` and ``execute`` (the parent's
own, workers excluded) and ``map`` throughput at widths 1 and 2, hello world.

    .venv/bin/python bench/wasm_parent_bench.py
    PYTHONPATH=OTHER/src .venv/bin/python bench/wasm_parent_bench.py   # another tree

For an A/B of two trees, run the two alternately a few times and compare medians: this
machine's speed drifts by tens of percent within minutes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from parity_sandbox import Config, Task, WasmExecutor

HELLO = Path(__file__).resolve().parent.parent / "examples" / "build" / "hello.wasm"


def main() -> None:
    hello = Task(wasm_file=HELLO)
    with tempfile.TemporaryDirectory() as cache, WasmExecutor(Config(cache_dir=Path(cache))) as ex:
        ex.execute_many([hello] * 100)
        cpu_map = []
        for _ in range(5):
            started = time.process_time()
            ex.execute_many([hello] * 1000, max_parallel=1)
            cpu_map.append((time.process_time() - started) / 1000)
        cpu_execute = []
        for _ in range(3):
            started = time.process_time()
            for _ in range(300):
                ex.execute(hello)
            cpu_execute.append((time.process_time() - started) / 300)
        rates = {}
        for width in (1, 2):
            samples = []
            for _ in range(3):
                started = time.perf_counter()
                ex.execute_many([hello] * 2000, max_parallel=width)
                samples.append(2000 / (time.perf_counter() - started))
            rates[width] = statistics.median(samples)
    print("| parent CPU per task, map (us) | execute (us) | map width 1 (tasks/s) | width 2 |")
    print("| ---: | ---: | ---: | ---: |")
    print(
        f"| {statistics.median(cpu_map) * 1e6:.0f} | {statistics.median(cpu_execute) * 1e6:.0f}"
        f" | {rates[1]:.0f} | {rates[2]:.0f} |"
    )


if __name__ == "__main__":
    main()
