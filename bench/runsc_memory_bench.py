"""What gVisor costs in memory: peak memory of the same tasks under runc and under runsc.

    .venv/bin/python bench/runsc_memory_bench.py [--runs N]

Needs the engine and test image of ``scripts/docker-setup.sh``, and makes (once, offline from
Debian's mirror, about a minute) ``parity-sandbox-bench/python:bookworm``: a ``debootstrap
--variant=minbase`` root with python3, imported with ``parity-sandbox image import``.

``Result.usage.peak_memory`` is the container cgroup's high-water mark; under runsc it includes
gVisor's own kernel. The ratio to runc of tiny tasks overstates the difference (image file
pages stay charged to the container that read them first): compare differences in MiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from parity_sandbox import Config, DockerExecutor, SandboxError, Task

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = "parity-sandbox-test/busybox:latest"
PYTHON = "parity-sandbox-bench/python:bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
LIMITS = {"memory": "2g", "pids": 512, "timeout": 120, "disk": "256m"}
MiB = 1 << 20

POOL = """
import multiprocessing as mp
def square(x):
    return x * x
if __name__ == "__main__":
    mp.set_start_method({method!r})
    with mp.Pool(8) as pool:
        print(sum(pool.map(square, range(1000))))
"""
# Children each touch TOUCH MiB of their own, all alive at once.
CHILDREN = """
import os, time
r, w = os.pipe()
kids = []
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        block = bytearray({touch} << 20)
        for at in range(0, len(block), 4096):
            block[at] = 1
        os.read(r, 1)
        os._exit(0)
    kids.append(pid)
time.sleep(2)
os.close(w)
print(sum(os.waitpid(pid, 0)[1] != 0 for pid in kids))
"""
# A parent holding BIG MiB; each child writes one byte every STRIDE KiB of what it inherited.
SPARSE_WRITES = """
import os, time
big = bytearray({big} << 20)
for at in range(0, len(big), 4096):
    big[at] = 1
r, w = os.pipe()
kids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        for at in range(0, len(big), {stride} << 10):
            big[at] = 2
        os.read(r, 1)
        os._exit(0)
    kids.append(pid)
time.sleep(2)
os.close(w)
for pid in kids:
    os.waitpid(pid, 0)
"""
# fork workers that only read a parent's list (reading bumps reference counts: writes).
SHARED_LIST = """
import multiprocessing as mp, random
DATA = [str(i) * 3 for i in range(2_000_000)]
def pick(seed):
    rng = random.Random(seed)
    return sum(len(DATA[rng.randrange(len(DATA))]) for _ in range(50))
if __name__ == "__main__":
    mp.set_start_method("fork")
    with mp.Pool(8) as pool:
        print(sum(pool.map(pick, range(1000))))
"""


def script(source: str) -> tuple[str, ...]:
    return ("python3", "/input/task.py", source)


WORKLOADS: list[tuple[str, str, tuple[str, ...]]] = [
    ("true (idle)", BUSYBOX, ("true",)),
    ("python3 -c pass", PYTHON, ("python3", "-c", "pass")),
    (
        "shell with 20 sleep children",
        BUSYBOX,
        ("sh", "-c", "for i in $(seq 20); do sleep 5 & done; wait"),
    ),
    ("Pool(8) fork, trivial map", PYTHON, script(POOL.format(method="fork"))),
    ("Pool(8) forkserver", PYTHON, script(POOL.format(method="forkserver"))),
    ("Pool(8) spawn", PYTHON, script(POOL.format(method="spawn"))),
    ("50 forked children, 4 MiB each", PYTHON, script(CHILDREN.format(n=50, touch=4))),
    (
        "parent 128 MiB, 8 children write 1 B / 2 MiB",
        PYTHON,
        script(SPARSE_WRITES.format(big=128, stride=2048)),
    ),
    ("Pool(8) fork over a 2M-string list", PYTHON, script(SHARED_LIST)),
]


def ensure_python_image(executor: DockerExecutor) -> None:
    """Make the Python image offline from Debian's packages, unless it exists."""
    if executor._api.images(name=PYTHON):
        return
    if shutil.which("debootstrap") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], check=True)
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as work:
        rootfs = Path(work) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3",
                "bookworm",
                str(rootfs),
                MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tar = Path(work) / "rootfs.tar"
        with tar.open("wb") as out:
            subprocess.run(["tar", "-C", str(rootfs), "-c", "."], check=True, stdout=out)
        executor.import_image(tar, PYTHON)


def peak(executor: DockerExecutor, image: str, command: tuple[str, ...], runtime: str) -> float:
    files = {}
    if command[:2] == ("python3", "/input/task.py"):  # a real file: spawn re-imports __main__
        files = {"task.py": command[2].encode()}
        command = command[:2]
    task = Task(image=image, command=command, input_files=files, oci_runtime=runtime, limits=LIMITS)
    try:
        result = executor.execute(task)
    except SandboxError as exc:
        sys.exit(f"{' '.join(command)} under {runtime}: {exc}")
    if not result.ok or result.usage.peak_memory is None:
        sys.exit(
            f"{' '.join(command)} under {runtime}: {result.status} {result.stderr_text[-300:]}"
        )
    return result.usage.peak_memory / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per workload and runtime")
    args = parser.parse_args()
    with DockerExecutor(Config(cache={"enabled": False})) as executor:
        ensure_python_image(executor)
        print("| workload | runc MiB | runsc MiB | runsc - runc |\n| --- | ---: | ---: | ---: |")
        for name, image, command in WORKLOADS:
            medians = {
                runtime: statistics.median(
                    peak(executor, image, command, runtime) for _ in range(args.runs)
                )
                for runtime in ("runc", "runsc")
            }
            print(
                f"| {name} | {medians['runc']:.1f} | {medians['runsc']:.1f} "
                f"| {medians['runsc'] - medians['runc']:+.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
