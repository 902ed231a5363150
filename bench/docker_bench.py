"""Docker runtime benchmark: the cold path against its peers, measured in the same run.

    .venv/bin/python bench/docker_bench.py            # prints the tables
    .venv/bin/python bench/docker_bench.py --write    # records them in bench/RESULTS-docker.md

Needs the engine and test image of ``scripts/docker-setup.sh``; makes ``bench/.venv`` with
epicbox from PyPI on first use.

1. Per-task latency of ``echo hi`` in the busybox test image: raw ``docker run --rm``, the docker
   SDK's ``containers.run``, epicbox's ``run`` (in its own venv), and parity-sandbox's
   ``execute`` (one fresh hardened container per task), under runc, and raw ``docker run`` and
   ours under runsc. Methods take turns in blocks so that drift on a noisy machine hits all.
2. Host memory of a parity-sandbox process while a task prints 1 GB with a 1 MiB output cap.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parity_sandbox import DockerExecutor

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
IMAGE = "parity-sandbox-test/busybox:latest"
PEER_VENV = BENCH / ".venv"
PEERS = ["epicbox==1.1.0", "llm-sandbox==0.3.46"]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


@functools.cache
def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    # pip is quick when everything is there; an older bench venv gains the newer peers
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
    return python


def raw_cli(runtime: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "--runtime",
                runtime,
                IMAGE,
                "echo",
                "hi",
            ],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - started)
    return times


def sdk(runs: int) -> list[float]:
    import docker

    client = docker.from_env()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        out = client.containers.run(IMAGE, ["echo", "hi"], remove=True, network_mode="none")
        times.append(time.perf_counter() - started)
        assert out == b"hi\n"
    return times


def epicbox(runs: int) -> list[float]:
    done = subprocess.run(
        [str(peer_python()), str(BENCH / "_epicbox_peer.py"), IMAGE, str(runs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [float(line) for line in done.stdout.split()]


def llm_sandbox(runtime: str) -> Callable[[int], list[float]]:
    def run(runs: int) -> list[float]:
        done = subprocess.run(
            [str(peer_python()), str(BENCH / "_llm_sandbox_peer.py"), IMAGE, runtime, str(runs)],
            capture_output=True,
            text=True,
            check=True,
        )
        return [float(line) for line in done.stdout.split()]

    return run


def ours(runtime: str, executor: DockerExecutor | None = None) -> Callable[[int], list[float]]:
    """Our cold path (``executor`` must have no warm pool; default: a new one)."""
    from parity_sandbox import DockerExecutor, Task

    executor = executor or DockerExecutor()
    task = Task(image=IMAGE, command=["echo", "hi"], oci_runtime=runtime)
    executor.execute(task)  # the derived image is made once per image: not part of a run

    def run(runs: int) -> list[float]:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            result = executor.execute(task)
            times.append(time.perf_counter() - started)
            assert result.stdout == b"hi\n" and not (result.runtime and result.runtime.warm)
        return times

    return run


def latency(rounds: int, block: int) -> list[str]:
    methods: dict[str, Callable[[int], list[float]]] = {
        "docker run (runc)": lambda n: raw_cli("runc", n),
        "docker SDK containers.run (runc)": sdk,
        "epicbox run (runc)": epicbox,
        "parity-sandbox (runc)": ours("runc"),
        "docker run (runsc)": lambda n: raw_cli("runsc", n),
        "parity-sandbox (runsc)": ours("runsc"),
    }
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        method(2)  # warm-up
    for _ in range(rounds):
        for name, method in methods.items():
            samples[name] += method(block)
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    lines = [
        "| method | p50 (ms) | p90 (ms) | p50 / epicbox | p50 / docker run (same runtime) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, values in samples.items():
        runtime = "runsc" if "runsc" in name else "runc"
        lines.append(
            f"| {name} | {p50[name] * 1e3:.0f} | {pct(values, 90) * 1e3:.0f} | "
            f"{p50[name] / p50['epicbox run (runc)']:.2f}x | "
            f"{p50[name] / p50[f'docker run ({runtime})']:.2f}x |"
        )
    ratio = p50["parity-sandbox (runc)"] / p50["epicbox run (runc)"]
    lines.append(
        f"\n{rounds} rounds of {block} runs per method. parity-sandbox's cold path (runc) takes "
        f"{ratio:.2f}x epicbox's time per task (target: <= 1.00x), with every hardened default "
        "on and the output streamed and capped."
    )
    return lines


FLOOD = """
import json, resource, sys
from parity_sandbox import DockerExecutor, Task
with DockerExecutor() as ex:
    ex.execute(Task(image=sys.argv[1], command=["true"]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = ex.execute(Task(image=sys.argv[1], command=["head", "-c", "1000000000", "/dev/zero"],
                             limits={"output": "1m", "timeout": "300s"}))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before": before * 1024, "after": after * 1024, "kept": len(result.stdout),
                  "truncated": result.stdout_truncated, "seconds": result.duration}))
"""


def flood() -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", FLOOD, IMAGE], capture_output=True, text=True, check=True
    )
    data = json.loads(done.stdout)
    growth = (data["after"] - data["before"]) / 2**20
    bound = 2 * 1 + 20
    return [
        "| output | cap | stdout kept | truncated | time (s) | peak RSS growth (MiB) "
        "| bound (MiB) |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        f"| 1 GB | 1 MiB | {data['kept']} | {data['truncated']} | {data['seconds']:.1f} | "
        f"{growth:.1f} | {bound} |",
        f"\nThe host process's peak RSS grew by {growth:.1f} MiB (bound: 2 x cap + 20 MiB = "
        f"{bound} MiB).",
    ]


def machine() -> str:
    import docker

    info = docker.from_env().info()
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Docker {info.get('ServerVersion')}, cgroup v"
        f"{info.get('CgroupVersion')}, runsc: {'runsc' in info.get('Runtimes', {})}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record in RESULTS-docker.md")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    options = parser.parse_args()
    rounds, block = (2, 5) if options.quick else (5, 10)
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sections = [
        ("Cold path, `echo hi` in busybox", latency(rounds, block)),
        ("Host memory while a task prints 1 GB", flood()),
    ]
    text = [f"Machine: {machine()}", f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    for title, lines in sections:
        text += ["", f"## {title}", "", *lines]
    report = "\n".join(text)
    print(report)
    if options.write:
        header = (
            "# Docker benchmark results\n\nRecorded by `.venv/bin/python bench/docker_bench.py "
            "--write`; ratios come from one run. epicbox 1.1.0 runs from PyPI in `bench/.venv` "
            "with a shim for urllib3 >= 2 (`bench/_epicbox_peer.py`).\n\n"
        )
        (BENCH / "RESULTS-docker.md").write_text(header + report + "\n")


if __name__ == "__main__":
    main()
