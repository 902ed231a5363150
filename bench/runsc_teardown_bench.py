"""How long gVisor takes to let go of a sandbox after a fork bomb: the background removal of
each task's container, timed (``drain``), over a dozen runs under runsc.

    .venv/bin/python bench/runsc_teardown_bench.py

Needs the engine and test image of ``scripts/docker-setup.sh``. Add load (two busy loops) to
see the slow tail more often.
"""

from __future__ import annotations

import statistics
import time

from parity_sandbox import Config, DockerExecutor, Task

IMAGE = "parity-sandbox-test/busybox"


def main() -> None:
    bomb = Task(
        image=IMAGE,
        command=["probe", "forkbomb"],
        oci_runtime="runsc",
        limits={"pids": 64, "timeout": 5},
    )
    drains = []
    with DockerExecutor(Config(cache={"enabled": False})) as executor:
        for _ in range(12):
            executor.execute(bomb)
            started = time.monotonic()
            assert executor.drain(200), "a container was not removed within 200 s"
            drains.append(time.monotonic() - started)
    print("| runs | median drain (s) | worst (s) | over 10 s |")
    print("| ---: | ---: | ---: | ---: |")
    slow = sum(1 for d in drains if d > 10)
    print(f"| {len(drains)} | {statistics.median(drains):.1f} | {max(drains):.1f} | {slow} |")


if __name__ == "__main__":
    main()
