"""What a WASM worker process pays to import its code: time, peak RSS, heavy modules loaded.

    .venv/bin/python bench/worker_import_bench.py                  # this tree's worker
    PYTHONPATH=OTHER/src .venv/bin/python bench/worker_import_bench.py MODULE   # another's

Each measurement runs in a fresh interpreter; the median of a few is printed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

PROBE = """
import importlib, json, resource, sys, time
started = time.perf_counter()
importlib.import_module(sys.argv[1])
took = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
heavy = sorted(m for m in ("pydantic", "yaml", "sqlite3", "docker") if m in sys.modules)
print(json.dumps({"ms": took * 1e3, "rss": rss, "heavy": heavy}))
"""


def main() -> None:
    module = sys.argv[1] if len(sys.argv) > 1 else "parity_sandbox.runtimes.wasm.worker"
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", PROBE, module], capture_output=True, check=True, text=True
            ).stdout
        )
        for _ in range(5)
    ]
    print(f"| module | import (ms, median of {len(runs)}) | peak RSS (MiB) | heavy modules |")
    print("| --- | ---: | ---: | --- |")
    ms = statistics.median(run["ms"] for run in runs)
    rss = statistics.median(run["rss"] for run in runs)
    print(f"| `{module}` | {ms:.0f} | {rss:.1f} | {', '.join(runs[0]['heavy']) or 'none'} |")


if __name__ == "__main__":
    main()
