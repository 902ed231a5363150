"""Runs in the bench venv: times one llm-sandbox session (open, ``echo hi``, close) per task.

    bench/.venv/bin/python bench/_llm_sandbox_peer.py IMAGE RUNTIME RUNS

llm-sandbox 0.3.46 by default readies a Python venv and pip inside each container, which busybox
lacks, so environment setup is skipped; the image has no command, so one that waits is given;
close stops with the default signal and a 10 s grace that ``sh``/``sleep`` as PID 1 ignore, so
the container is made to stop with SIGKILL. A local image is used as-is (never pulled or removed).
"""

from __future__ import annotations

import sys
import time

import docker
from llm_sandbox import SandboxSession

image, runtime, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = docker.from_env()  # one client for all runs, as epicbox keeps one
container_options = {
    "command": ["sleep", "2147483647"],
    "runtime": runtime,
    "network_mode": "none",
    "stop_signal": "SIGKILL",
}
for _ in range(runs):
    started = time.perf_counter()
    with SandboxSession(
        client=client,
        image=image,
        keep_template=True,
        skip_environment_setup=True,
        runtime_configs=dict(container_options),
    ) as session:
        result = session.execute_command("echo hi")
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0 and result.stdout == "hi\n", result
    print(f"{elapsed:.6f}", flush=True)
