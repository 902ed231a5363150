"""The node agent: how a chunk of tasks reaches a node's own executors.

``NodeAgent`` is one long-lived, detached actor per node (named by the node's id, pinned to
it). It owns the node's executors (WASM workers, Docker with its warm pools), keeps the
modules sent to it by their sha256, and reaps what a lost run left (Docker containers past
their deadline, or whose owner died) every ``REAP_EVERY`` seconds and when it starts.

The driver (``RayExecutor``) calls ``run`` with a chunk: its tasks as prepared there (limits
resolved, files embedded, the module left out and named by its sha256) and a map of the
modules' object refs; each task comes back as an outcome: its ``Result``, or the error that
kept it from running (type, message, field). Tasks never run in the agent's own process: its
executors run them in their sandboxes (a WASM worker process, a container), exactly as
locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

from parity_sandbox._config import Config, load_config
from parity_sandbox._exceptions import SandboxError
from parity_sandbox._executor import Executor
from parity_sandbox._models import Task
from parity_sandbox.cluster._ray import NAMESPACE, RUNTIME_PREFIX, agent_name, ray
from parity_sandbox.runtimes import executor_class

#: Seconds between two reaps of a node's leftovers.
REAP_EVERY = 10.0
#: Bytes of modules an agent keeps in memory (the least recently used go first).
MODULE_BYTES = 512 * 1024 * 1024

Outcome = dict[str, Any]
logger = logging.getLogger(__name__)


class NodeAgent:
    """The node's executors and its module store; methods are called by ``relay`` (``run``)
    and by the driver (``describe``, ``reap``)."""

    def __init__(self, config_json: str | None = None) -> None:
        self.config = Config.model_validate_json(config_json) if config_json else load_config()
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self._executors: dict[str, Executor] = {}
        self._making = threading.Lock()
        self._modules: OrderedDict[str, bytes] = OrderedDict()
        self._module_bytes = 0
        self._stopping = threading.Event()
        #: Tasks this agent was given.
        self.tasks = 0
        #: Set once the executors of the runtimes this node offers are made (a first task
        #: then does not wait for a Docker executor's start inside its own deadline).
        self._warm = threading.Event()
        threading.Thread(target=self._warm_up, name="parity-sandbox-warm", daemon=True).start()
        self._reaper = threading.Thread(
            target=self._reap_loop, name="parity-sandbox-reaper", daemon=True
        )
        self._reaper.start()

    # -- called by the relay and the driver ------------------------------------------------

    async def run(
        self, tasks: list[tuple[Task, str | None]], modules: dict[str, list[Any]], use_cache: bool
    ) -> list[Outcome]:
        """Run a chunk of tasks here, all at once (each executor admits them as it can), and
        return their outcomes in order. Each task comes with its module's sha256 (``None``:
        a Docker task), and ``modules`` holds the refs of those this node may not have."""
        self.tasks += len(tasks)
        for sha, (ref,) in modules.items():
            if sha not in self._modules:
                self._keep_module(sha, await ref)
        if len(tasks) == 1:
            return [await self._one(*tasks[0], use_cache)]
        return list(await asyncio.gather(*(self._one(*each, use_cache) for each in tasks)))

    def describe(self) -> dict[str, Any]:
        """This node: its id, the agent's process, the runtimes it has made (once the
        executors of those it offers are made, or a minute has passed)."""
        self._warm.wait(60)
        return {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "executors": sorted(self._executors),
            "modules": len(self._modules),
            "tasks": self.tasks,
        }

    def image_id(self, reference: str) -> Outcome:
        """The id of image ``reference`` on this node (``{"id": ...}``), or the error."""
        try:
            docker: Any = self._executor("docker")
            return {"id": docker.image_id(reference)}
        except SandboxError as exc:
            return {"error": type(exc).__name__, "message": exc.message, "field": _field(exc)}

    def image_ids(self) -> list[str]:
        """The ids of the images this node's Docker host has (none without Docker)."""
        try:
            docker: Any = self._executor("docker")
            return sorted(docker.image_ids())
        except SandboxError:
            return []

    def reap(self) -> int:
        """Remove what lost runs left on this node now; how many things were removed."""
        removed = 0
        for name in ("docker",):
            executor = self._executors.get(name)
            if executor is not None and not executor.closed:
                reaper = getattr(executor, "reap", None)
                if reaper is not None:
                    with contextlib.suppress(SandboxError):
                        removed += int(reaper())
        return removed

    def close(self) -> None:
        """Stop the reaper and close the executors (``node stop`` calls it first)."""
        self._stopping.set()
        with self._making:
            executors, self._executors = self._executors, {}
        for executor in executors.values():
            with contextlib.suppress(SandboxError):
                executor.close()

    # -- the work ----------------------------------------------------------------------------

    async def _one(self, task: Task, sha: str | None, use_cache: bool) -> Outcome:
        try:
            if sha is not None:
                task = task.model_copy(update={"wasm_module": self._module(sha)})
            runtime = task.runtime_name or self.config.default_runtime
            executor = self._executors.get(runtime)
            if executor is None:
                executor = await asyncio.to_thread(self._executor, runtime)
            if executor.prepares_on_loop:
                prepared = executor.prepare(task)
            else:
                prepared = await asyncio.to_thread(executor.prepare, task)
            result = await executor.execute_async(prepared, use_cache=use_cache)
        except SandboxError as exc:
            if exc.result is None:
                return {
                    "error": type(exc).__name__,
                    "message": exc.message,
                    "field": getattr(exc, "field", None),
                }
            result = exc.result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("a task failed in the agent")
            return {"error": "ExecutionError", "message": f"{type(exc).__name__}: {exc}"}
        if result.runtime is not None:
            result = result.model_copy(
                update={"runtime": result.runtime.model_copy(update={"node": self.node_id})}
            )
        return {"result": result}

    def _executor(self, runtime: str) -> Executor:
        with self._making:
            executor = self._executors.get(runtime)
            if executor is None:
                executor = self._executors[runtime] = executor_class(runtime)(self.config)
            return executor

    def _module(self, sha: str) -> bytes:
        module = self._modules.get(sha)
        if module is None:  # pragma: no cover - the relay sends every module its chunk names
            raise SandboxError(f"wasm_module: module {sha} was not sent to this node")
        self._modules.move_to_end(sha)
        return module

    def _keep_module(self, sha: str, module: bytes) -> None:
        if hashlib.sha256(module).hexdigest() != sha:
            raise SandboxError(f"wasm_module: the module sent as {sha} has another hash")
        self._modules[sha] = module
        self._module_bytes += len(module)
        while self._module_bytes > MODULE_BYTES and len(self._modules) > 1:
            _, dropped = self._modules.popitem(last=False)
            self._module_bytes -= len(dropped)

    def _warm_up(self) -> None:
        """Make the executors of the runtimes this node offers (its ``psb_runtime_*``)."""
        try:
            nodes = ray.nodes()  # type: ignore[no-untyped-call]
            mine = [node for node in nodes if node["NodeID"] == self.node_id]
            offered: dict[str, float] = mine[0].get("Resources", {}) if mine else {}
            for name in sorted(offered):
                if name.startswith(RUNTIME_PREFIX) and not self._stopping.is_set():
                    with contextlib.suppress(SandboxError):
                        self._executor(name.removeprefix(RUNTIME_PREFIX))
        finally:
            self._warm.set()

    def _reap_loop(self) -> None:
        while True:
            self.reap()
            if self._stopping.wait(REAP_EVERY):
                return


def _field(exc: SandboxError) -> str | None:
    field: str | None = getattr(exc, "field", None)
    return field


_agents: dict[str, Any] = {}


def local_agent(config_json: str | None = None) -> Any:
    """The handle of this node's agent, started here (pinned to this node, detached) if the
    node has none yet."""
    node_id = ray.get_runtime_context().get_node_id()
    handle = _agents.get(node_id)
    if handle is None:
        handle = _agents[node_id] = start_agent(node_id, config_json)
    return handle


def start_agent(node_id: str, config_json: str | None = None) -> Any:
    """The agent of node ``node_id``: the one running, or a new one pinned to that node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(NodeAgent)
    return actor.options(
        name=agent_name(node_id),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=1000,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(config_json)
