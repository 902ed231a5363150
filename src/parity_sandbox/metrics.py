"""Metrics: what executors and the service count, for Prometheus (extra ``[monitoring]``).

A :class:`Metrics` holds a ``prometheus_client`` registry and the metrics below. An executor
fills one when it is given one (``metrics=``) or when ``config.metrics.enabled`` is true (then
the process's own, :meth:`Metrics.default`); ``executor.metrics`` is it, ``None`` when metrics
are off, and then ``prometheus_client`` is never imported. Results are counted where they are
made (``PreparedTask.result``, and cache hits where they are returned), so every runtime's
are counted alike; a few hooks add what no result carries (pools, the cache, reaps).

Names (all counters end in ``_total``; ``runtime`` is ``wasm`` or ``docker``, ``oci_runtime``
is ``runc``, ``runsc`` or ``none``)::

    parity_sandbox_tasks_total{runtime,oci_runtime,status}    task ends (cache hits too)
    parity_sandbox_task_duration_seconds{runtime,oci_runtime} runs (not cache hits)
    parity_sandbox_queue_wait_seconds{runtime}                accepted -> started
    parity_sandbox_limit_hits_total{runtime,limit}
    parity_sandbox_security_events_total{runtime,kind}        Result.events, and refusals
    parity_sandbox_cache_hits_total{runtime}, parity_sandbox_cache_misses_total{runtime}
    parity_sandbox_cache_damaged_total{what}                  entry | file, set aside
    parity_sandbox_warm_pool_hits_total{runtime}, ..._warm_pool_misses_total{runtime}
    parity_sandbox_warm_pool_size{runtime}                    warm containers waiting now
    parity_sandbox_worker_restarts_total{runtime}             WASM workers replaced
    parity_sandbox_leftovers_reaped_total{runtime}            containers, volumes, roots
    parity_sandbox_runtime_errors_total{runtime}              the daemon lost or refusing;
                                                              WASM workers dying at start
    parity_sandbox_runtime_up{runtime}                        1 usable, 0 not (set where known)
    # the service (parity-sandbox serve) adds:
    parity_sandbox_service_tasks{state}                       queued, running (whole store)
    parity_sandbox_service_queue_limit                        service.max_queued
    parity_sandbox_service_key_tasks{key,state}               per key name, at each scrape
    parity_sandbox_key_security_events_total{key,kind}        per key name
    parity_sandbox_key_cpu_seconds_total{key}

Several processes: WASM workers report nothing (the parent sees every result). The service is
one process. For several processes of one's own (batch runs side by side), set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory *before* they start: ``prometheus_client``
then keeps every value in a file per process there, each process uses its one
``Metrics.default()``, and :meth:`Metrics.exposition` (``parity-sandbox metrics serve --dir``)
adds them up. Gauges there are summed over live processes (``livesum``; call
``prometheus_client.multiprocess.mark_process_dead(pid)`` for a process that died); the warm
pool's size is read at scrape time and so is not shared between processes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parity_sandbox._models import Result

#: The environment variable of ``prometheus_client``'s multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "parity_sandbox_"
#: Seconds: a WASM hello world takes about a millisecond, a cold container about a second.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
MONITORING_HINT = "metrics need the [monitoring] extra: pip install 'parity-sandbox[monitoring]'"

_default: Metrics | None = None
_default_lock = threading.Lock()


class Metrics:
    """The metrics of one process (or of whoever shares this object), in their own registry.

    Thread-safe. Every method that counts is cheap (a dict lookup and an addition under
    ``prometheus_client``'s lock).

    Raises:
        RuntimeUnavailable: ``prometheus_client`` is not installed.
    """

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            from parity_sandbox._exceptions import RuntimeUnavailable

            raise RuntimeUnavailable(f"{MONITORING_HINT} ({exc})") from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        registry = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return prom.Counter(PREFIX + name, doc, labels, registry=registry)

        self.tasks = counter(
            "tasks", "Tasks that ended, by how.", ("runtime", "oci_runtime", "status")
        )
        self.duration = prom.Histogram(
            PREFIX + "task_duration_seconds",
            "Seconds a task ran (cache hits excluded).",
            ("runtime", "oci_runtime"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = prom.Histogram(
            PREFIX + "queue_wait_seconds",
            "Seconds from a task's acceptance to its start.",
            ("runtime",),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.limit_hits = counter("limit_hits", "Tasks stopped at a limit.", ("runtime", "limit"))
        self.events = counter(
            "security_events", "Security events of tasks, by kind.", ("runtime", "kind")
        )
        self.cache_hits = counter("cache_hits", "Results served from the cache.", ("runtime",))
        self.cache_misses = counter(
            "cache_misses", "Cache lookups that found nothing.", ("runtime",)
        )
        self.cache_damaged = counter(
            "cache_damaged", "Damaged cache entries or files, set aside.", ("what",)
        )
        self.pool_hits = counter(
            "warm_pool_hits", "Tasks that found a warm container.", ("runtime",)
        )
        self.pool_misses = counter(
            "warm_pool_misses", "Tasks that found no warm container.", ("runtime",)
        )
        self.worker_restarts = counter(
            "worker_restarts", "Worker processes replaced (killed or died).", ("runtime",)
        )
        self.reaped = counter(
            "leftovers_reaped", "Leftovers of crashed runs that were removed.", ("runtime",)
        )
        self.runtime_errors = counter(
            "runtime_errors", "Tasks that met an unavailable runtime (daemon errors).", ("runtime",)
        )
        self.runtime_up = prom.Gauge(
            PREFIX + "runtime_up",
            "Whether a runtime is usable (1) or not (0).",
            ("runtime",),
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.key_events = counter(
            "key_security_events", "Security events of an API key's tasks.", ("key", "kind")
        )
        self.key_cpu = counter("key_cpu_seconds", "CPU seconds of an API key's tasks.", ("key",))
        self._service: tuple[Any, Any, Any] | None = None
        #: (runtime, OCI runtime, status) -> the children of tasks, duration and queue wait.
        self._children: dict[tuple[str, str, Any], tuple[Any, Any, Any]] = {}
        #: Sources of the warm pools' sizes, read at each scrape.
        self._pools: list[_PoolSource] = []
        registry.register(_PoolSize(self))

    @classmethod
    def default(cls) -> Metrics:
        """The process's own ``Metrics``, made on first use (what ``metrics.enabled`` uses)."""
        global _default
        with _default_lock:
            if _default is None:
                _default = cls()
            return _default

    # -- what executors count --------------------------------------------------------------

    def ended(self, result: Result, runtime: str, waited: float | None = None) -> None:
        """A task's end: its status, its run's duration, the limit it hit, its events; and
        ``waited``, the seconds between its acceptance and its start."""
        info = result.runtime
        oci = (info.oci_runtime if info is not None else None) or "none"
        key = (runtime, oci, result.status)
        children = self._children.get(key)
        if children is None:  # labels() costs more than the counting: done once per key
            children = self._children[key] = (
                self.tasks.labels(runtime, oci, result.status.value),
                self.duration.labels(runtime, oci),
                self.queue_wait.labels(runtime),
            )
        tasks, duration, queue_wait = children
        tasks.inc()
        if not result.cached:
            duration.observe(result.duration)
            if waited is not None:
                queue_wait.observe(waited if waited > 0.0 else 0.0)
        if result.limit is not None:
            self.limit_hits.labels(runtime, result.limit).inc()
        for event in result.events:
            self.events.labels(runtime, event.kind.value).inc()

    def rejected(self, runtime: str) -> None:
        """A task refused before it ran (an ``input_rejected`` event without a result)."""
        self.events.labels(runtime, "input_rejected").inc()

    def cache_lookup(self, runtime: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(runtime).inc()

    def damaged(self, what: str) -> None:
        """The result cache set a damaged ``entry`` or ``file`` aside."""
        self.cache_damaged.labels(what).inc()

    def warm_pool_lookup(self, runtime: str, hit: bool) -> None:
        (self.pool_hits if hit else self.pool_misses).labels(runtime).inc()

    def watch_warm_pool(self, runtime: str, size: Callable[[], int]) -> None:
        """Report ``size()`` as the warm pool's size at each scrape (while ``size`` lives)."""
        self._pools.append(_PoolSource(runtime, size))

    def worker_restarted(self, runtime: str) -> None:
        self.worker_restarts.labels(runtime).inc()

    def leftovers(self, runtime: str, count: int) -> None:
        self.reaped.labels(runtime).inc(count)

    def runtime_error(self, runtime: str) -> None:
        self.runtime_errors.labels(runtime).inc()

    def set_runtime_up(self, runtime: str, up: bool) -> None:
        self.runtime_up.labels(runtime).set(1 if up else 0)

    # -- what the service counts -----------------------------------------------------------

    def key_ended(self, key: str, result: Result) -> None:
        """A service task of the key named ``key`` ended with ``result``."""
        for event in result.events:
            self.key_events.labels(key, event.kind.value).inc()
        if result.usage.cpu_time:
            self.key_cpu.labels(key).inc(result.usage.cpu_time)

    def service_state(
        self, *, queued: int, running: int, limit: int, per_key: Mapping[tuple[str, str], int]
    ) -> None:
        """The service's queue now: tasks queued and running (all keys), its limit, and
        ``per_key[(key name, state)]``."""
        prom = self._prom
        if self._service is None:
            self._service = (
                prom.Gauge(
                    PREFIX + "service_tasks",
                    "Tasks queued or running in the service's store.",
                    ("state",),
                    registry=self.registry,
                    multiprocess_mode="livemax",
                ),
                prom.Gauge(
                    PREFIX + "service_queue_limit",
                    "Tasks the service takes queued and running at once (service.max_queued).",
                    registry=self.registry,
                    multiprocess_mode="livemax",
                ),
                prom.Gauge(
                    PREFIX + "service_key_tasks",
                    "Tasks queued or running per API key.",
                    ("key", "state"),
                    registry=self.registry,
                    multiprocess_mode="livemax",
                ),
            )
        tasks, queue_limit, keys = self._service
        tasks.labels("queued").set(queued)
        tasks.labels("running").set(running)
        queue_limit.set(limit)
        keys.clear()  # a key with nothing active any more drops out
        for (key, state), count in per_key.items():
            keys.labels(key, state).set(count)

    # -- reading them ----------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type; in multiprocess mode
        (``PROMETHEUS_MULTIPROC_DIR``), summed over every process that wrote there."""
        prom = self._prom
        if os.environ.get(MULTIPROC_ENV):
            return multiprocess_exposition(os.environ[MULTIPROC_ENV])
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def value(self, name: str, **labels: str) -> float:
        """The value of the sample ``name`` (full name, ``_total`` included) with ``labels``
        (0 if there is none): for tests and library users who read a count."""
        found = self.registry.get_sample_value(name, labels)
        return float(found) if found is not None else 0.0


def multiprocess_exposition(directory: str) -> tuple[bytes, str]:
    """The metrics every process wrote to ``directory`` (multiprocess mode), added up, in
    Prometheus' text format, and its content type."""
    try:
        import prometheus_client as prom
        from prometheus_client import multiprocess
    except ImportError as exc:
        from parity_sandbox._exceptions import RuntimeUnavailable

        raise RuntimeUnavailable(f"{MONITORING_HINT} ({exc})") from exc
    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


class _PoolSource:
    """A warm pool's size, as a callable held weakly through this object."""

    def __init__(self, runtime: str, size: Callable[[], int]) -> None:
        self.runtime = runtime
        # A bound method is held weakly: the pool (and its executor) may go away.
        self._size: Callable[[], Callable[[], int] | None] = (
            weakref.WeakMethod(size) if hasattr(size, "__self__") else lambda: size
        )

    def read(self) -> int | None:
        size = self._size()
        return None if size is None else size()


class _PoolSize:
    """A collector: the warm pools' sizes, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = weakref.ref(metrics)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            PREFIX + "warm_pool_size", "Warm containers waiting for tasks.", labels=("runtime",)
        )
        metrics = self._metrics()
        totals: dict[str, int] = {}
        for source in list(metrics._pools) if metrics is not None else []:
            size = source.read()
            if size is None:  # its pool is gone
                assert metrics is not None
                with contextlib.suppress(ValueError):  # another scrape got there first
                    metrics._pools.remove(source)
            else:
                totals[source.runtime] = totals.get(source.runtime, 0) + size
        for runtime, total in sorted(totals.items()):
            family.add_metric((runtime,), total)
        yield family
