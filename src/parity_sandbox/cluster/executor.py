"""``RayExecutor``: the executor contract over a Ray cluster.

A task is prepared here (its files read once, its limits resolved under this executor's
configuration, its module hashed), so its spec hash is the one a local executor computes.
It then travels in chunks (``map`` sends up to ``CHUNK`` tasks in one call; ``execute`` and
``submit`` one) to the agent of a node that can run it (``parity_sandbox.cluster.agent``),
which runs it in that node's own executors. A module goes into Ray's object store once (by
its sha256) and reaches a node once; the agent keeps it.

This side owns what the cluster cannot be trusted with:

- **Placement.** A chunk goes to a live node that advertises what its tasks need (the
  runtime, the OCI runtime, GPUs: Ray resources the node was started with) and has room for
  their memory limits plus ``ray.overhead``, counted against the node's Ray ``memory``
  resource by this executor (the least loaded such node). A chunk that no live node could
  ever run fails at once with ``RuntimeUnavailable`` naming what is missing.
- **Deadlines.** The driver waits for a chunk no longer than its tasks' timeouts allow plus
  ``ray.grace``; a node that hangs (stopped, cut off, its raylet lost) gives ``timeout``
  results then, and the chunk is cancelled (the node's agent reaps what it left once it runs
  again).
- **Node loss.** A chunk whose node or agent was lost is run again on another node, up to
  ``ray.max_attempts`` runs in all; ``Result.attempts`` says how many it took. Each task's
  result is taken once: a chunk given up on is never read again.
- **The result cache.** Looked up and filled here, with this executor's cache (the Redis
  backend shares it between drivers).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import GetTimeoutError

from parity_sandbox._cache import ResultCache
from parity_sandbox._config import Config
from parity_sandbox._exceptions import (
    ExecutionError,
    InvalidInput,
    RuntimeUnavailable,
    SandboxError,
)
from parity_sandbox._executor import Cancelled, Executor, PreparedTask
from parity_sandbox._inputs import read_inputs
from parity_sandbox._models import ErrorInfo, Limits, Result, Status, Task
from parity_sandbox._units import format_size
from parity_sandbox.audit import AuditLog
from parity_sandbox.cluster import _ray
from parity_sandbox.cluster._ray import oci_resource, ray, runtime_resource
from parity_sandbox.cluster.agent import Outcome, start_agent
from parity_sandbox.metrics import Metrics
from parity_sandbox.runtimes import executor_class
from parity_sandbox.runtimes.wasm.modules import ModuleFiles

#: Most tasks ``map`` sends in one chunk.
CHUNK = 16
#: Tasks of one chunk a node is expected to run at once (its deadline and memory count so).
CHUNK_WIDTH = 4
#: Seconds between two looks at the cluster's nodes (and at a waiting caller's cancel).
NODES_TTL = 2.0
POLL = 0.25
#: Seconds a node where a chunk was lost is passed over while another can take its chunks.
LOST_TTL = 60.0
#: Seconds the driver waits for an agent to answer a question (not a task).
ASK_TIMEOUT = 10.0
#: Seconds an image reference's id, and a node's list of images, are trusted.
IMAGES_TTL = 10.0
#: Modules this executor keeps in the object store (the least recently used are dropped).
MODULE_REFS = 64


@dataclass(frozen=True)
class _Need:
    """What a task asks of a node: Ray resources, GPUs, memory (limit plus overhead)."""

    resources: tuple[tuple[str, float], ...]
    gpus: int
    memory: int
    #: A Docker task's image, by id: only nodes that have it can run it.
    image: str | None = None


@dataclass
class _Chunk:
    """Tasks sent together, and where they are."""

    items: list[tuple[int, PreparedTask]]
    need: _Need
    use_cache: bool
    attempts: int = 0
    #: The agent's answer to come (``None``: not sent, or waiting to be sent again).
    ref: Any = None
    #: The node it was sent to, and what it holds there.
    node: str | None = None
    memory: int = 0
    deadline: float = 0.0
    #: Nodes it was lost on (placed elsewhere while there is elsewhere).
    lost_on: set[str] = field(default_factory=set)
    #: Each task's result, by its index, once the chunk has ended.
    results: dict[int, Result] = field(default_factory=dict)
    #: The errors that kept tasks from running (their results stand for them too), by index.
    errors: dict[int, SandboxError] = field(default_factory=dict)


class RayExecutor(Executor):
    """Runs tasks on a Ray cluster, each inside a node's own executor (WASM or Docker).

    Args:
        address: the cluster's GCS address, ``HOST:PORT`` (default: ``config.ray.address``).
        config: resolves the tasks' limits here, and holds ``ray.max_attempts``,
            ``ray.grace``, ``ray.overhead`` and ``ray.token_file``.
        max_parallel: tasks in flight at once (default: two per CPU of the live nodes).

    Raises:
        RuntimeUnavailable: no address was given, or the cluster cannot be reached.
    """

    runtime_name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        config: Config | None = None,
        max_parallel: int | None = None,
        cache: ResultCache | None = None,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        settings = config if config is not None else Config()
        address = address or settings.ray.address
        if not address:
            raise RuntimeUnavailable(
                "a RayExecutor needs the cluster's address: give address= or set ray.address"
            )
        _ray.connect(address.removeprefix("ray://"), settings.ray.token_file)
        try:
            super().__init__(settings, cache=cache, audit=audit, metrics=metrics)
        except BaseException:
            _ray.disconnect()
            raise
        self.address = address
        self._width = max_parallel
        self._nodes: list[dict[str, Any]] = []
        self._nodes_at = 0.0
        self._nodes_lock = threading.Lock()
        self._modules: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._modules_lock = threading.Lock()
        #: Chunks in flight from every caller, cancelled by ``close()``.
        self._flying_refs: dict[int, Any] = {}
        self._flying_lock = threading.Lock()
        #: What this executor placed on each node (memory, GPUs, chunks), under ``_room``.
        self._room = threading.Condition()
        self._placed: dict[str, list[int]] = {}
        #: The agents' handles, by node id.
        self._agents: dict[str, Any] = {}
        self._module_files = ModuleFiles()
        self._limits: dict[str, Limits] = {}
        #: Nodes a chunk was lost on, and when: others are preferred for ``LOST_TTL``.
        self._lost_nodes: dict[str, float] = {}
        #: Images: the id each reference named when last asked, and each node's ids.
        self._image_refs: dict[str, tuple[str, float]] = {}
        self._node_images: dict[str, tuple[set[str], float]] = {}

    # -- the contract ------------------------------------------------------------------------

    def max_parallel(self) -> int:
        if self._width is not None:
            return max(1, self._width)
        cpus = sum(node["Resources"].get("CPU", 0) for node in self.nodes())
        return max(2, int(2 * cpus))

    def _prepare(self, task: Task) -> PreparedTask:
        """The task as a node will run it (``portable``): files read here, once; limits
        resolved under this executor's configuration (only those its runtime applies); the
        module named by its sha256, the image by its id."""
        runtime = task.runtime_name or self.config.default_runtime
        limits = task.effective_limits(self._base_limits(runtime).merged(task.limits))
        inputs = read_inputs(task)
        update: dict[str, object] = {"input_files": inputs, "limits": limits}
        module = None
        if task.image is None:
            module, program = self._module_files.load(task)
            update.update(wasm_module=None, wasm_file=None)
        else:
            program = update["image"] = self._image_id(task.image)
        sent = task.model_copy(update=update)
        return PreparedTask(
            task,
            runtime,
            limits,
            program,
            inputs,
            form=(sent, module),
            audit=self.audit,
            metrics=self.metrics,
        )

    def _base_limits(self, runtime: str) -> Limits:
        """The configuration's limits for ``runtime``, without those it does not apply."""
        limits = self._limits.get(runtime)
        if limits is None:
            unused = set(Limits.model_fields) - executor_class(runtime).applied_limits
            limits = self.config.limits_for(runtime).model_copy(update=dict.fromkeys(unused))
            self._limits[runtime] = limits
        return limits

    def _run(self, prepared: PreparedTask, cancel: threading.Event | None) -> Result:
        if not isinstance(prepared.form, tuple):
            raise InvalidInput(
                "task: prepared by another executor; prepare it with this one", field="task"
            )
        chunk = _Chunk([(0, prepared)], self._need(prepared), use_cache=False)
        while not self._settle(chunk, POLL):
            if cancel is not None and cancel.is_set():
                self._abandon(chunk)
                raise Cancelled("the task was cancelled")
        error = chunk.errors.get(0)
        if isinstance(error, InvalidInput | RuntimeUnavailable):
            raise error
        return prepared.recorded(chunk.results[0])

    def _keeps(self, result: Result) -> bool:
        # A result made here (a lost or silent node) has no runtime: it describes no run.
        return result.runtime is not None

    def map(
        self,
        tasks: Iterable[Task | PreparedTask],
        *,
        max_parallel: int | None = None,
        memory_budget: int | None = None,
        use_cache: bool = True,
    ) -> Generator[Result, None, None]:
        """Run many tasks over the cluster, yielding their results in order (see
        ``Executor.map``): sent in chunks of up to ``CHUNK`` tasks, ``max_parallel`` tasks in
        flight at once (default: two chunks per live node, at least ``max_parallel()``).
        ``memory_budget`` is not used: the nodes' memory is counted where they are placed."""
        self._check_open()
        if max_parallel is None:  # enough for two chunks on every node
            max_parallel = max(self.max_parallel(), 2 * CHUNK * len(self.nodes()))
        return self._map(iter(tasks), max(1, max_parallel), use_cache)

    def _close(self) -> None:
        with self._flying_lock:
            refs = list(self._flying_refs.values())
            self._flying_refs.clear()
        for ref in refs:
            _cancel(ref)
        _ray.disconnect()

    # -- the cluster --------------------------------------------------------------------------

    def nodes(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        """The cluster's live nodes as Ray describes them (``ray.nodes()``), looked up at
        most every ``NODES_TTL`` seconds unless ``fresh``."""
        with self._nodes_lock:
            now = time.monotonic()
            if fresh or now - self._nodes_at > NODES_TTL:
                self._nodes = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
                self._nodes_at = now
            return self._nodes

    def _need(self, prepared: PreparedTask) -> _Need:
        task = prepared.task
        resources = {runtime_resource(prepared.runtime): 1.0}
        if prepared.runtime == "docker":
            oci = task.oci_runtime or self.config.docker.oci_runtime
            resources[oci_resource(oci)] = 1.0
        gpus = 0 if task.gpus is None else 1 if task.gpus == "all" else task.gpus
        memory = (prepared.limits.memory or 0) + self.config.ray.overhead
        image = prepared.program if task.image is not None else None
        return _Need(tuple(sorted(resources.items())), gpus, memory, image)

    def _image_id(self, reference: str) -> str:
        """The id image ``reference`` names on the cluster's Docker nodes now (asked of one of
        them, remembered for ``IMAGES_TTL`` seconds), so that the spec hash names it."""
        if reference.startswith("sha256:"):
            return reference
        now = time.monotonic()
        known = self._image_refs.get(reference)
        if known is not None and now - known[1] < IMAGES_TTL:
            return known[0]
        docker = runtime_resource("docker")
        lost = self._recently_lost()
        nodes = [str(n["NodeID"]) for n in self.nodes(fresh=True) if docker in n["Resources"]]
        if not nodes:
            raise RuntimeUnavailable(
                f"no node of the Ray cluster at {self.address} runs Docker tasks"
            )
        # A node lately lost last: Ray may still list it while it cannot answer.
        nodes.sort(key=lambda node: node in lost)
        failures = []
        for node in nodes:
            try:
                outcome: Outcome = ray.get(
                    self._agent(node).image_id.remote(reference), timeout=ASK_TIMEOUT
                )
            except Exception as exc:  # noqa: BLE001 - that node cannot answer: ask another
                failures.append(f"{type(exc).__name__}")
                continue
            if "id" not in outcome:
                raise _error_of(outcome)
            image_id = str(outcome["id"])
            self._image_refs[reference] = (image_id, now)
            return image_id
        raise RuntimeUnavailable(
            f"no Docker node of the Ray cluster at {self.address} said what image "
            f"{reference} is ({', '.join(failures)})"
        )

    def _recently_lost(self) -> set[str]:
        """The nodes a chunk was lost on in the last ``LOST_TTL`` seconds."""
        now = time.monotonic()
        return {node for node, when in self._lost_nodes.items() if now - when < LOST_TTL}

    def _has_image(self, node_id: str, image: str) -> bool:
        """Whether node ``node_id`` has image ``image``: its list of images, asked again when
        it lacks the image and is older than a tenth of ``IMAGES_TTL``. A node lately lost is
        not asked (it may not answer)."""
        now = time.monotonic()
        known = self._node_images.get(node_id)
        if known is not None and (image in known[0] or now - known[1] < IMAGES_TTL / 10):
            return image in known[0]
        if node_id in self._recently_lost():
            return False
        try:
            ids = set(ray.get(self._agent(node_id).image_ids.remote(), timeout=ASK_TIMEOUT))
        except Exception:  # noqa: BLE001 - a node that cannot say has nothing to offer
            ids = set()
        self._node_images[node_id] = (ids, now)
        return image in ids

    def _check_feasible(self, need: _Need, memory: int) -> None:
        """Raise ``RuntimeUnavailable`` unless some live node has all that ``need`` asks
        (``memory`` being the chunk's), naming what no node has."""
        for fresh in (False, True):
            nodes = self.nodes(fresh=fresh)
            fitting = [node for node in nodes if _fits(node["Resources"], need, memory)]
            if need.image is not None and fitting:
                if any(self._has_image(str(node["NodeID"]), need.image) for node in fitting):
                    return
                raise RuntimeUnavailable(
                    f"no node of the Ray cluster at {self.address} that could run this task "
                    f"has its image {need.image}: import it there (parity-sandbox image import)"
                )
            if fitting:
                return
        missing = []
        for name, _ in need.resources:
            if not any(name in node["Resources"] for node in nodes):
                kind, _, what = name.removeprefix("psb_").partition("_")
                missing.append(
                    f"the {what} runtime" if kind == "runtime" else f"the {what} OCI runtime"
                )
        most_gpus = max((node["Resources"].get("GPU", 0) for node in nodes), default=0)
        if need.gpus > most_gpus:
            missing.append(f"{need.gpus} GPU(s) (the most a node has: {most_gpus:g})")
        most_memory = max((node["Resources"].get("memory", 0) for node in nodes), default=0)
        if memory > most_memory:
            missing.append(
                f"{format_size(memory)} of memory, its limit and the sandbox's overhead "
                f"(the most a node has: {format_size(int(most_memory))})"
            )
        what = "; ".join(missing) or "all of " + ", ".join(name for name, _ in need.resources)
        raise RuntimeUnavailable(
            f"no node of the Ray cluster at {self.address} ({len(nodes)} live) can run this "
            f"task: it needs {what}"
        )

    def _module_ref(self, sha: str, module: bytes) -> Any:
        with self._modules_lock:
            ref = self._modules.get(sha)
            if ref is None:
                ref = self._modules[sha] = ray.put(module)
                while len(self._modules) > MODULE_REFS:
                    self._modules.popitem(last=False)
            else:
                self._modules.move_to_end(sha)
            return ref

    # -- chunks -------------------------------------------------------------------------------

    def _send(self, chunk: _Chunk) -> bool:
        """Send ``chunk`` (again, after a lost node) to a node's agent; False when no node
        has room for it now. Raises ``RuntimeUnavailable`` when no live node could run it."""
        prepared = [item for _, item in chunk.items]
        width = min(len(prepared), CHUNK_WIDTH)
        memory = chunk.need.memory * width
        self._check_feasible(chunk.need, memory)
        node = self._place(chunk.need, memory, chunk.lost_on)
        if node is None:
            return False
        tasks, modules = [], {}
        for item in prepared:
            sent, module = item.form
            tasks.append((sent, None if module is None else item.program))
            if module is not None:
                modules[item.program] = [self._module_ref(item.program, module)]
        timeouts = sorted((item.limits.timeout or 0.0 for item in prepared), reverse=True)
        # The node runs ``width`` at a time: the longest tasks one after another, at worst.
        waits = sum(timeouts[i] for i in range(0, len(timeouts), width))
        chunk.attempts += 1
        chunk.node, chunk.memory = node, memory
        try:
            chunk.ref = self._agent(node).run.remote(tasks, modules, chunk.use_cache)
        except BaseException:
            self._release(chunk)
            raise
        chunk.deadline = time.monotonic() + waits + self.config.ray.grace
        with self._flying_lock:
            self._flying_refs[id(chunk)] = chunk.ref
        return True

    def _place(self, need: _Need, memory: int, lost_on: set[str]) -> str | None:
        """The least loaded live node that has what ``need`` asks and room for ``memory``
        (and its GPUs) now, reserved; ``None`` when none has room."""
        recent = self._recently_lost()
        for fresh in (False, True):
            nodes = [
                node for node in self.nodes(fresh=fresh) if _fits(node["Resources"], need, memory)
            ]
            if need.image is not None:
                nodes = [n for n in nodes if self._has_image(str(n["NodeID"]), need.image)]
            # Not where this chunk, or lately any, was lost (Ray may still list a dead node
            # as alive for a while): there only when nothing else (even a node that joined
            # since the last look) can take it.
            elsewhere = [node for node in nodes if node["NodeID"] not in lost_on | recent]
            if elsewhere:
                break
        with self._room:
            best: str | None = None
            load = math.inf
            for node in elsewhere or nodes:
                resources, node_id = node["Resources"], str(node["NodeID"])
                used_memory, used_gpus, chunks = self._placed.get(node_id, (0, 0, 0))
                if used_memory + memory > resources.get("memory", 0) and chunks:
                    continue
                if used_gpus + need.gpus > resources.get("GPU", 0):
                    continue
                share = chunks / max(1.0, resources.get("CPU", 1.0))
                if share < load:
                    best, load = node_id, share
            if best is None:
                return None
            used_memory, used_gpus, chunks = self._placed.get(best, (0, 0, 0))
            self._placed[best] = [used_memory + memory, used_gpus + need.gpus, chunks + 1]
            return best

    def _release(self, chunk: _Chunk) -> None:
        """Give back what ``chunk`` held on its node."""
        if chunk.node is None:
            return
        with self._room:
            placed = self._placed.get(chunk.node)
            if placed is not None:
                placed[0] -= chunk.memory
                placed[1] -= chunk.need.gpus
                placed[2] -= 1
                if placed[2] <= 0:
                    del self._placed[chunk.node]
            self._room.notify_all()
        chunk.node = None

    def _agent(self, node_id: str) -> Any:
        agent = self._agents.get(node_id)
        if agent is None:
            agent = self._agents[node_id] = start_agent(node_id)
        return agent

    def _settle(self, chunk: _Chunk, wait: float) -> bool:
        """Wait up to ``wait`` seconds for ``chunk``; True once its results are in (sent
        again meanwhile if its node was lost; timeouts if its deadline passed)."""
        if chunk.ref is None:  # not sent yet, or to be sent again: is there room now?
            try:
                sent = self._send(chunk)
            except RuntimeUnavailable as exc:
                for index, prepared in chunk.items:
                    if chunk.attempts == 0:  # nothing could ever run it
                        chunk.errors[index] = exc
                        chunk.results[index] = self._error_result(prepared.task, exc)
                    else:
                        message = self._lost_reason(chunk, f"not run again: {exc.message}")
                        chunk.results[index] = self._error(
                            prepared, "ExecutionError", message, chunk.attempts
                        )
                return True
            if not sent:
                with self._room:
                    self._room.wait(wait)
                return False
        left = chunk.deadline - time.monotonic()
        try:
            outcomes: list[Outcome] | None = ray.get(chunk.ref, timeout=max(0.0, min(wait, left)))
        except GetTimeoutError:
            outcomes = None
        except Exception as exc:  # noqa: BLE001 - the node or its agent was lost
            return self._lost(chunk, exc)
        if outcomes is not None:
            self._forget(chunk)
            for (index, prepared), outcome in zip(chunk.items, outcomes, strict=True):
                if "result" in outcome:
                    result: Result = outcome["result"]
                    chunk.results[index] = result.model_copy(update={"attempts": chunk.attempts})
                    continue
                error = _error_of(outcome)
                chunk.errors[index] = error
                chunk.results[index] = self._error_result(prepared.task, error).model_copy(
                    update={"attempts": chunk.attempts}
                )
            return True
        if time.monotonic() >= chunk.deadline:
            self._abandon(chunk)
            for index, prepared in chunk.items:
                chunk.results[index] = self._timed_out(prepared, chunk.attempts)
            return True
        return False

    def _lost(self, chunk: _Chunk, exc: Exception) -> bool:
        """``chunk``'s node or agent was lost: send it again (True: its tasks' error results
        are in, as no attempt is left)."""
        node = chunk.node
        self._forget(chunk)
        if node is not None:
            chunk.lost_on.add(node)
            self._lost_nodes[node] = time.monotonic()
            self._agents.pop(node, None)
            self.nodes(fresh=True)
        chunk.ref = None
        if chunk.attempts < self.config.ray.max_attempts:
            return False  # ``_settle`` sends it again
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0] if text else ''}"
        for index, prepared in chunk.items:
            chunk.results[index] = self._error(
                prepared, "ExecutionError", self._lost_reason(chunk, reason), chunk.attempts
            )
        return True

    def _lost_reason(self, chunk: _Chunk, reason: str) -> str:
        runs = chunk.attempts
        return f"the node running the task was lost ({runs} attempt{'s' * (runs != 1)}): {reason}"

    def _abandon(self, chunk: _Chunk) -> None:
        """Stop waiting for ``chunk``; ask Ray to cancel it (its node reaps the rest)."""
        ref = chunk.ref
        self._forget(chunk)
        if ref is not None:
            _cancel(ref)

    def _forget(self, chunk: _Chunk) -> None:
        with self._flying_lock:
            self._flying_refs.pop(id(chunk), None)
        self._release(chunk)

    # -- results -------------------------------------------------------------------------------

    def _timed_out(self, prepared: PreparedTask, attempts: int) -> Result:
        task = prepared.task
        return Result(
            status=Status.TIMEOUT,
            error=ErrorInfo(
                type="ExecutionTimeout",
                message=(
                    f"the node running the task did not answer within its timeout "
                    f"({prepared.limits.timeout:g} s) and {self.config.ray.grace:g} s of grace"
                ),
            ),
            task_id=task.id,
            labels=task.labels,
            attempts=attempts,
        )

    @staticmethod
    def _error(prepared: PreparedTask, kind: str, message: str, attempts: int = 0) -> Result:
        task = prepared.task
        return Result(
            status=Status.ERROR,
            error=ErrorInfo(type=kind, message=message),
            task_id=task.id,
            labels=task.labels,
            attempts=attempts,
        )

    # -- map ----------------------------------------------------------------------------------

    def _map(
        self, tasks: Iterator[Task | PreparedTask], width: int, use_cache: bool
    ) -> Generator[Result, None, None]:
        size = max(1, min(CHUNK, width // max(1, len(self.nodes()))))
        ready: dict[int, Result] = {}
        flying: list[_Chunk] = []
        group: list[tuple[int, PreparedTask]] = []
        group_need: _Need | None = None
        numbered = enumerate(tasks)
        exhausted = False
        done = 0

        def flush() -> None:
            nonlocal group, group_need
            if not group:
                return
            assert group_need is not None
            flying.append(_Chunk(group, group_need, use_cache=False))
            group, group_need = [], None

        try:
            while True:
                while not exhausted and sum(len(c.items) for c in flying) + len(group) < width:
                    try:
                        index, item = next(numbered)
                    except StopIteration:
                        exhausted = True
                        break
                    prepared = self._ready(item, index, ready, use_cache)
                    if prepared is None:
                        continue
                    need = self._need(prepared)
                    if group_need is not None and need != group_need:
                        flush()
                    group.append((index, prepared))
                    group_need = need
                    if len(group) >= size:
                        flush()
                if exhausted or sum(len(c.items) for c in flying) + len(group) >= width:
                    flush()
                while done in ready:
                    yield ready.pop(done)
                    done += 1
                if not flying:
                    if exhausted and not group:
                        return
                    continue
                sent = [chunk for chunk in flying if chunk.ref is not None]
                finished: list[Any] = []
                if sent:
                    soonest = min(chunk.deadline for chunk in sent) - time.monotonic()
                    finished, _ = ray.wait(
                        [chunk.ref for chunk in sent],
                        num_returns=1,
                        timeout=max(0.0, min(POLL, soonest)),
                    )
                else:  # all wait for room on a node
                    with self._room:
                        self._room.wait(POLL)
                for chunk in list(flying):
                    waiting = chunk.ref is not None and chunk.ref not in finished
                    if waiting and time.monotonic() < chunk.deadline:
                        continue
                    if not self._settle(chunk, 0.0):
                        continue  # no room for it yet, or to be sent again
                    flying.remove(chunk)
                    for index, prepared in chunk.items:
                        ready[index] = self._ended(prepared, chunk.results[index], use_cache)
        finally:
            for chunk in flying:
                self._abandon(chunk)

    def _ready(
        self, item: Task | PreparedTask, index: int, ready: dict[int, Result], use_cache: bool
    ) -> PreparedTask | None:
        """``item`` prepared here, or ``None`` when its result is in ``ready`` already (from
        the cache, or the error that kept it from being prepared)."""
        try:
            prepared = item if isinstance(item, PreparedTask) else self.prepare(item)
        except SandboxError as exc:
            ready[index] = self._error_result(item if isinstance(item, Task) else None, exc)
            return None
        if not isinstance(prepared.form, tuple):
            foreign = InvalidInput(
                "task: prepared by another executor; prepare it with this one", field="task"
            )
            ready[index] = self._error_result(prepared.task, foreign)
            return None
        if use_cache and self.cache is not None and prepared.cacheable:
            hit = self._from_cache(prepared)
            if hit is not None:
                ready[index] = hit
                return None
        return prepared

    def _ended(self, prepared: PreparedTask, result: Result, use_cache: bool) -> Result:
        """A result that came back: counted, audited, and cached where it may be."""
        if prepared.cacheable and result.spec_hash is None and result.runtime is not None:
            result = result.model_copy(update={"spec_hash": prepared.spec_hash})
        if use_cache and self.cache is not None and prepared.cacheable and self._keeps(result):
            self.cache.put(prepared.spec_hash, result)
        return prepared.recorded(result)


def _fits(resources: dict[str, float], need: _Need, memory: int) -> bool:
    return (
        all(resources.get(name, 0) >= amount for name, amount in need.resources)
        and resources.get("GPU", 0) >= need.gpus
        and resources.get("memory", 0) >= memory
    )


def _cancel(ref: Any) -> None:
    # Done already, or its node is gone: nothing to stop.
    with contextlib.suppress(Exception):
        ray.cancel(ref, recursive=True)


_ERRORS: dict[str, type[SandboxError]] = {
    "InvalidInput": InvalidInput,
    "RuntimeUnavailable": RuntimeUnavailable,
}


def _error_of(outcome: Outcome) -> SandboxError:
    """The error an agent's outcome reports, as the library raises it."""
    kind = _ERRORS.get(outcome["error"])
    message = str(outcome.get("message") or "the task could not run")
    if kind is InvalidInput:
        return InvalidInput(message, field=outcome.get("field"))
    if kind is RuntimeUnavailable:
        return RuntimeUnavailable(message)
    return ExecutionError(f"{outcome['error']}: {message}")
