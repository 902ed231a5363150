"""Configuration: the ``Config`` model and the one place YAML is read.

The seed's file is accepted exactly as written::

    sandbox:
      default_runtime: "docker" # or "wasm"
      docker: {memory_limit: "512m", cpu_limit: "1.0", network_mode: "none", privileged: false}
      wasm: {memory_limit: "128m", stack_size: "1m", timeout: "5m"}

Limits set at the top level apply to every runtime; a runtime's section overrides them; a task's
own ``limits`` override both. Environment variables override the file:
``PARITY_SANDBOX_<KEY>`` for a top-level key and ``PARITY_SANDBOX_<RUNTIME>_<KEY>`` for a section
key (for example ``PARITY_SANDBOX_WASM_MEMORY_LIMIT=64m``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from parity_sandbox import runtimes
from parity_sandbox._egress import parse_grants
from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._models import (
    Cores,
    FileSize,
    Fuel,
    InputSize,
    Limits,
    OpenFiles,
    OutputFiles,
    OutputSize,
    Pids,
    Seconds,
    Size,
    StackSize,
    _Model,
    renamed,
)
from parity_sandbox._units import format_size

ENV_PREFIX = "PARITY_SANDBOX_"
CONFIG_ENV = "PARITY_SANDBOX_CONFIG"
MAX_CONFIG_BYTES = 1 << 20

#: Limits that apply when neither the configuration nor the task sets one.
DEFAULT_LIMITS = Limits(
    memory="256m",
    cpu=1.0,
    pids=256,
    disk="64m",
    output="1m",
    timeout="30s",
    stack_size="1m",
)

#: A runtime's name: one of the registry's (``parity_sandbox.runtimes``).
Runtime = str
#: Keys that were renamed, by section: still read (with a DeprecationWarning), from files and
#: from PARITY_SANDBOX_* variables.
_RENAMED = {"docker": {"runtime": "oci_runtime"}}


class _LimitSettings(_Model):
    """Limit keys as the configuration file spells them."""

    memory_limit: Size | None = None
    cpu_limit: Cores | None = None
    pids_limit: Pids | None = None
    disk_limit: Size | None = None
    output_limit: OutputSize | None = None
    timeout: Seconds | None = None
    fuel: Fuel | None = None
    stack_size: StackSize | None = None
    open_files_limit: OpenFiles | None = None
    file_size_limit: FileSize | None = None
    output_files_limit: OutputFiles | None = None
    input_limit: InputSize | None = None

    def limits(self) -> Limits:
        """These settings as a :class:`Limits` (unset keys stay ``None``)."""
        return Limits(
            memory=self.memory_limit,
            cpu=self.cpu_limit,
            pids=self.pids_limit,
            disk=self.disk_limit,
            output=self.output_limit,
            timeout=self.timeout,
            fuel=self.fuel,
            stack_size=self.stack_size,
            open_files=self.open_files_limit,
            file_size=self.file_size_limit,
            output_files=self.output_files_limit,
            input=self.input_limit,
        )


class PoolProfile(_Model):
    """A kind of task to keep warm containers for from the executor's start."""

    image: str
    #: ``runc`` or ``runsc``; default: ``docker.oci_runtime``.
    oci_runtime: Literal["runc", "runsc"] | None = None
    #: ``UID[:GID]``, as a task's ``user``.
    user: str | None = None
    #: The limits of the profile's tasks, over the configured defaults (as a task's ``limits``).
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="before")
    @classmethod
    def _old_spellings(cls, data: Any) -> Any:
        return renamed(data, _RENAMED["docker"], "docker.pool.profiles")


class EgressSettings(_Model):
    """``docker.network``: what network egress tasks may be granted (``Task.network``)."""

    #: ``false``: no task is granted egress, whatever it asks (its task is refused).
    enabled: bool = True
    #: What any task may be granted, as grants (see ``Task.network``): a task's grants must
    #: each lie within one of these. ``None``: any name, and addresses only by the task's
    #: own address grants (names must still resolve to public addresses).
    allow: tuple[str, ...] | None = None
    #: Connections one task may open, and bytes its connections may carry, in all.
    max_connections: int = Field(default=256, ge=1, le=100_000)
    max_bytes: Size = 1 << 30
    #: Where the /30 networks of tasks' veths come from: private, and routed nowhere else
    #: on this host (each task's proxy listens on its veth's host address).
    subnet: str = "10.232.0.0/16"

    @field_validator("subnet")
    @classmethod
    def _private_subnet(cls, value: str) -> str:
        network = ipaddress.IPv4Network(value, strict=True)
        if not network.is_private or network.prefixlen > 28:
            raise ValueError("a private IPv4 network of /28 or wider, like 10.232.0.0/16")
        return str(network)

    @field_validator("allow")
    @classmethod
    def _grants(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        return tuple(str(grant) for grant in parse_grants(value))


class PoolSettings(_Model):
    """``docker.pool``: containers made and started ahead of demand, one task each.

    A task whose profile (image, OCI runtime, user, resolved limits) has warm containers takes
    one, runs, and that container is destroyed, never reused. A task whose profile has none
    runs on the cold path, and (while the pool is enabled) its profile gets warm containers for
    the tasks that follow. ``pool: true`` is short for ``pool: {enabled: true}``.
    """

    enabled: bool = False
    #: Warm containers kept per profile while it is idle (0: an idle profile drains away).
    min: int = Field(default=1, ge=0, le=64)
    #: The most warm containers a busy profile keeps.
    max: int = Field(default=4, ge=1, le=256)
    #: The most warm containers of all profiles together (profiles come from tasks, which
    #: strangers may vary at will); the least recently used profile gives way.
    max_total: int = Field(default=16, ge=1, le=1024)
    #: A warm container unused this long is replaced (or removed, beyond ``min``).
    idle_timeout: Seconds = 300.0
    #: Profiles warmed when the executor starts; others are warmed after their first task.
    profiles: tuple[PoolProfile, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: object) -> object:
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0"}:
            return {"enabled": value.strip().lower() in {"true", "1"}}
        return value

    @model_validator(mode="after")
    def _bounds(self) -> PoolSettings:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


class DockerSettings(_LimitSettings):
    """The ``docker`` section (operator settings; a task cannot change these)."""

    #: The Docker host (``unix:///...``, ``tcp://...``); default: ``$DOCKER_HOST`` or the socket.
    base_url: str | None = None
    #: The OCI runtime of tasks that do not choose: ``runc``, or ``runsc`` for gVisor.
    oci_runtime: Literal["runc", "runsc"] = "runc"
    #: ``never`` (the default: an image must already be on the host), ``if-missing``, ``always``.
    pull_policy: Literal["never", "if-missing", "always"] = "never"
    #: When set, only images whose reference matches one of these ``fnmatch`` patterns run.
    allowed_images: tuple[str, ...] | None = None
    #: Containers never get a network; ``none`` is the only accepted value.
    network_mode: Literal["none"] = "none"
    #: A privileged container is no sandbox; it takes ``allow_privileged`` as well.
    privileged: bool = False
    allow_privileged: bool = False
    #: Whether a task may run as UID 0 (``user: "0"``); without capabilities, but still root.
    allow_root: bool = False
    #: Throttles of the disk that holds the images (blkio, where the kernel has it).
    disk_read_bps: Size | None = None
    disk_write_bps: Size | None = None
    disk_read_iops: Annotated[int, Field(ge=1, le=10**7)] | None = None
    disk_write_iops: Annotated[int, Field(ge=1, le=10**7)] | None = None
    #: Warm containers (see :class:`PoolSettings`); off by default.
    pool: PoolSettings = Field(default_factory=PoolSettings)
    #: Network egress by allow-list (see :class:`EgressSettings`).
    network: EgressSettings = Field(default_factory=EgressSettings)

    @model_validator(mode="before")
    @classmethod
    def _old_spellings(cls, data: Any) -> Any:
        return renamed(data, _RENAMED["docker"], "docker")

    @field_validator("allowed_images", mode="before")
    @classmethod
    def _patterns(cls, value: object) -> object:
        if isinstance(value, str):  # from an environment variable: comma-separated
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _privileged(self) -> DockerSettings:
        if self.privileged and not self.allow_privileged:
            raise ValueError(
                "privileged containers are refused; set privileged: false (an operator who "
                "accepts a container with full host access also sets allow_privileged: true)"
            )
        return self


class RuntimeSettings(_LimitSettings):
    """The section of a runtime registered beside the package's own: its limits."""


class WasmSettings(_LimitSettings):
    """The ``wasm`` section."""

    #: Worker processes that run WebAssembly tasks in parallel (default: one per core).
    workers: int | None = Field(default=None, ge=1, le=256)


class CacheSettings(_Model):
    """The ``cache`` section: the result cache of deterministic and cacheable tasks."""

    enabled: bool = True
    backend: Literal["sqlite", "redis"] = "sqlite"
    #: The SQLite file (default: ``<cache_dir>/results.sqlite3``).
    path: Path | None = None
    #: The Redis server, for ``backend: redis`` (``redis://127.0.0.1:6379/0``).
    redis_url: str | None = None
    #: How long an entry is served after it was written.
    ttl: Seconds = 7 * 24 * 3600.0
    #: The bound on the entries' total size; the oldest go first.
    max_bytes: Size = 1 << 30

    @model_validator(mode="after")
    def _redis_has_url(self) -> CacheSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url (redis://HOST:PORT/DB)")
        return self


class AuditSettings(_Model):
    """The ``audit`` section: the tamper-evident audit log (``parity_sandbox.audit``).

    Off unless ``path`` or ``sink`` is set. Each executor then writes one entry per task end.
    """

    #: The JSON-lines file entries are appended to (hash-chained; see ``parity_sandbox.audit``).
    path: Path | None = None
    #: ``entry``: each entry is on disk before the task's result is returned; ``batch``: the
    #: file is synced at most every ``fsync_interval`` (a crash of the machine, not of the
    #: process, can lose the entries of that interval).
    fsync: Literal["entry", "batch"] = "entry"
    fsync_interval: Seconds = 1.0
    #: Past this size the file is renamed ``PATH.<seq of its last entry>`` and a new one
    #: continues the chain; unset: never rotated.
    rotate_bytes: Size | None = None
    #: Also send every entry to ``stdout`` or ``syslog`` (an external copy of the chain).
    sink: Literal["none", "stdout", "syslog"] = "none"

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.sink != "none"


class MetricsSettings(_Model):
    """The ``metrics`` section: Prometheus metrics (``parity_sandbox.metrics``, extra
    ``[monitoring]``)."""

    #: Count into the process's metrics (``Metrics.default()``). Unset: off for the library
    #: and the CLI, on for ``serve`` where ``prometheus_client`` is installed.
    enabled: bool | None = None


class WebhookSettings(_Model):
    """``service.webhooks``: how an ended task's result is posted to its ``callback_url``."""

    #: Deliver to addresses that are loopback, private, link-local or otherwise not public
    #: (refused by default: a callback must not make the server probe its own network).
    allow_private: bool = False
    #: Attempts before a delivery is given up (each failure waits twice as long as the last).
    max_attempts: int = Field(default=8, ge=1, le=100)
    #: The wait after the first failure.
    retry_base: Seconds = 1.0
    #: How long one attempt may take.
    timeout: Seconds = 10.0


def check_backend(value: str) -> str:
    """``value`` if it names a service backend (``local``, ``ray://HOST:PORT``); else
    ``ValueError``."""
    if value == "local":
        return value
    host, _, port = value.removeprefix("ray://").rpartition(":")
    if not value.startswith("ray://") or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"local, or ray://HOST:PORT for a Ray cluster (got {value!r})")
    return value


class ServiceSettings(_Model):
    """The ``service`` section: ``parity-sandbox serve`` (the HTTP API, extra ``[service]``)."""

    #: Where it listens; loopback unless the operator says otherwise.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: The store: ``sqlite:///PATH`` (default: ``<state_dir>/service.sqlite3``) or
    #: ``postgresql+psycopg://USER@HOST/DB``.
    database_url: str | None = None
    #: Where a SQLite store and the server's lock live (default:
    #: ``$XDG_STATE_HOME/parity-sandbox``, else ``~/.local/state/parity-sandbox``).
    state_dir: Path | None = None
    #: The largest request body; a larger one is refused (413) before it is read whole.
    max_body: Size = 64 << 20
    #: The longest ``?wait=`` a request may ask for.
    max_wait: Seconds = 60.0
    #: Tasks queued and running, all keys together; beyond it, 503 with ``Retry-After``.
    max_queued: int = Field(default=10_000, ge=1, le=10_000_000)
    #: Tasks queued and running per key, unless the key says otherwise (429 beyond it).
    max_active_per_key: int = Field(default=1_000, ge=1, le=10_000_000)
    #: Tasks run at once, all runtimes together; unset: per runtime, as many as its executor
    #: takes in flight (``Executor.max_in_flight``).
    concurrency: int | None = Field(default=None, ge=1, le=4096)
    #: What becomes of a task that was running when its server died: run it again (``retry``,
    #: up to ``max_attempts`` runs in all) or mark it ``lost``.
    on_restart: Literal["retry", "lost"] = "retry"
    max_attempts: int = Field(default=3, ge=1, le=100)
    #: How long a server holds a running task without renewing it; a task whose server has
    #: not renewed it for this long (it died) is recovered by another server.
    lease: Seconds = 30.0
    #: Serve ``GET /metrics`` to anyone who can reach the server; otherwise only to admin keys.
    metrics_open: bool = False
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    #: Where its tasks run: ``local`` (this host's executors) or ``ray://HOST:PORT`` (a Ray
    #: cluster, through ``RayExecutor``; extra ``[ray]``).
    backend: str = "local"

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        return check_backend(value)

    @field_validator("lease")
    @classmethod
    def _lease(cls, value: float) -> float:
        if value < 1:
            raise ValueError("at least 1 s: a server renews its leases every sixth of it")
        return value

    def resolved_state_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """``state_dir``, or ``$XDG_STATE_HOME/parity-sandbox`` (``~/.local/state`` by default)."""
        if self.state_dir is not None:
            return self.state_dir
        env = os.environ if environ is None else environ
        home = Path(env.get("HOME") or Path.home())
        base = env.get("XDG_STATE_HOME") or str(home / ".local" / "state")
        return Path(base) / "parity-sandbox"

    def resolved_database_url(self, environ: Mapping[str, str] | None = None) -> str:
        """``database_url``, or the SQLite file in the state directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_state_dir(environ) / 'service.sqlite3'}"


class RaySettings(_Model):
    """The ``ray`` section: running tasks on a Ray cluster (``RayExecutor``, extra ``[ray]``)."""

    #: The cluster's GCS address (``HOST:PORT``) when none is given to the executor.
    address: str | None = None
    #: Runs of a task whose node was lost (died, or its raylet did) before it is an error.
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 2
    #: Seconds past a task's timeout the driver waits for its node before it gives up.
    grace: Annotated[float, Field(gt=0, le=3600)] = 5.0
    #: Memory a node reserves for a task beyond its memory limit (the sandbox's own).
    overhead: Size = 64 * 1024 * 1024
    #: The file that holds the cluster's token (default: ``$RAY_AUTH_TOKEN_PATH`` or Ray's
    #: ``~/.ray/auth_token``).
    token_file: Path | None = None


class Config(_LimitSettings):
    """Effective configuration of an executor.

    Every argument is optional; ``Config(memory_limit="128m", timeout=timedelta(minutes=1))``
    sets defaults for all runtimes.
    """

    default_runtime: Runtime = "wasm"
    docker: DockerSettings = Field(default_factory=DockerSettings)
    wasm: WasmSettings = Field(default_factory=WasmSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    #: Where compiled modules are kept between processes (default: the user cache dir).
    cache_dir: Path | None = None
    #: The sections of runtimes registered beside the package's own (``sandbox: {NAME:
    #: {memory_limit: ...}}`` in a file, ``PARITY_SANDBOX_NAME_<KEY>``): their limits.
    runtimes: dict[str, RuntimeSettings] = Field(default_factory=dict)
    #: Fields whose entries a document spells at the top (``sandbox.NAME``, not
    #: ``sandbox.runtimes.NAME``): error messages name them so.
    folded_fields: ClassVar[frozenset[str]] = frozenset({"runtimes"})

    @model_validator(mode="before")
    @classmethod
    def _runtime_sections(cls, data: Any) -> Any:
        """A registered runtime's section is read as its name spells it, like ``wasm``."""
        if not isinstance(data, dict):
            return data
        named = [key for key in data if key not in cls.model_fields and key in runtimes.names()]
        if not named:
            return data
        data = dict(data)
        sections = dict(data.get("runtimes") or {})
        for name in named:
            sections[name] = data.pop(name)
        data["runtimes"] = sections
        return data

    @field_validator("default_runtime")
    @classmethod
    def _registered(cls, value: str) -> str:
        known = runtimes.names()
        if value not in known:
            raise ValueError(f"{value!r} is not a runtime; choose one of {', '.join(known)}")
        return value

    def limits_for(self, runtime: Runtime) -> Limits:
        """The default limits of tasks on ``runtime``: built-ins, then top level, then its
        section (``wasm``, ``docker``; a registered runtime without a section has none)."""
        limits = DEFAULT_LIMITS.merged(self.limits())
        section: _LimitSettings | None = (
            self.docker
            if runtime == "docker"
            else self.wasm
            if runtime == "wasm"
            else self.runtimes.get(runtime)
        )
        return limits.merged(section.limits()) if section is not None else limits

    def resolved_cache_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """``cache_dir``, or ``$XDG_CACHE_HOME/parity-sandbox`` (``~/.cache`` by default)."""
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ if environ is None else environ
        base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
        return Path(base) / "parity-sandbox"

    def to_document(self) -> dict[str, Any]:
        """The effective configuration as the file would spell it, with resolved limits."""
        document: dict[str, Any] = {
            "default_runtime": self.default_runtime,
            "cache_dir": str(self.resolved_cache_dir()),
        }
        for runtime in runtimes.names():
            limits = self.limits_for(runtime)
            section: dict[str, Any] = {
                "memory_limit": format_size(limits.memory or 0),
                "cpu_limit": limits.cpu,
                "pids_limit": limits.pids,
                "disk_limit": format_size(limits.disk or 0),
                "output_limit": format_size(limits.output or 0),
                "timeout": f"{limits.timeout:g}s",
                "fuel": limits.fuel,
                "stack_size": format_size(limits.stack_size or 0),
                "file_size_limit": format_size(
                    limits.file_size if limits.file_size is not None else limits.disk or 0
                ),
                "output_files_limit": limits.output_files_or_default,
                "input_limit": format_size(limits.input_or_default),
            }
            if runtime == "docker":
                section["open_files_limit"] = limits.open_files_or_default
            if runtime == "wasm":
                section["workers"] = self.wasm.workers or os.cpu_count() or 1
            else:
                section.update(
                    self.docker.model_dump(mode="json", exclude=set(_LimitSettings.model_fields))
                )
            document[runtime] = section
        document["cache"] = self.cache.model_dump(mode="json")
        document["cache"]["path"] = str(self.result_cache_path())
        document["service"] = self.service.model_dump(mode="json")
        document["service"]["state_dir"] = str(self.service.resolved_state_dir())
        document["audit"] = self.audit.model_dump(mode="json")
        document["metrics"] = self.metrics.model_dump(mode="json")
        document["ray"] = self.ray.model_dump(mode="json")
        return {"sandbox": document}

    def result_cache_path(self, environ: Mapping[str, str] | None = None) -> Path:
        """The SQLite file of the result cache."""
        return self.cache.path or self.resolved_cache_dir(environ) / "results.sqlite3"


_SECTIONS: dict[str, type[_Model]] = {
    "docker": DockerSettings,
    "wasm": WasmSettings,
    "cache": CacheSettings,
    "service": ServiceSettings,
    "audit": AuditSettings,
    "metrics": MetricsSettings,
    "ray": RaySettings,
}


#: ``PARITY_SANDBOX_*`` variables that are not configuration keys: the config file's path, more
#: runtimes, and the API key of ``RemoteExecutor`` (a secret, never shown by ``config show``).
_NOT_CONFIG = frozenset({CONFIG_ENV, runtimes.RUNTIMES_ENV, "PARITY_SANDBOX_API_KEY"})


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Config keys set by ``PARITY_SANDBOX_*`` variables, and which variable set each."""
    overrides: dict[str, Any] = {}
    origin: dict[str, str] = {}
    top_keys = set(Config.model_fields) - set(_SECTIONS) - {"runtimes"}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_CONFIG:
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        section, _, sub = key.partition("_")
        model = _SECTIONS.get(section) or (RuntimeSettings if section in runtimes.names() else None)
        known = set(model.model_fields) if model is not None else set()
        if sub in known or sub in _RENAMED.get(section, {}):
            overrides.setdefault(section, {})[sub] = value
            origin[f"{section}.{sub}"] = name
        elif key in top_keys:
            overrides[key] = value
            origin[key] = name
        else:
            raise InvalidInput(
                f"environment variable {name} names no configuration key; top-level keys: "
                f"{', '.join(sorted(top_keys))}; section keys: PARITY_SANDBOX_WASM_<KEY>, "
                "PARITY_SANDBOX_DOCKER_<KEY>, PARITY_SANDBOX_CACHE_<KEY>, "
                "PARITY_SANDBOX_SERVICE_<KEY>, PARITY_SANDBOX_AUDIT_<KEY>, "
                "PARITY_SANDBOX_METRICS_<KEY>",
                field=name,
            )
    return overrides, origin


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(
            f"cannot read config file {path}: {exc.strerror}", field="config"
        ) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidInput(f"config file {path} is larger than 1 MiB", field="config")
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"config file {path} is not valid YAML: {exc}", field="config") from exc
    if document is None:
        return {}
    if isinstance(document, dict) and set(document) == {"sandbox"}:
        document = document["sandbox"] or {}
    if not isinstance(document, dict):
        raise InvalidInput(
            f"config file {path} must hold a mapping under the key 'sandbox'", field="config"
        )
    return document


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Load the configuration from ``path`` (or ``$PARITY_SANDBOX_CONFIG``) and the environment.

    Args:
        path: a YAML file; when ``None``, ``PARITY_SANDBOX_CONFIG`` names it, if set.
        environ: the environment to read (default ``os.environ``); tests pass their own.

    Raises:
        InvalidInput: the file cannot be read, or a key or value is not accepted; the message
            names the key, the value and the accepted form.
    """
    env = os.environ if environ is None else environ
    file_path = path if path is not None else env.get(CONFIG_ENV)
    document = _read_file(Path(file_path)) if file_path else {}
    overrides, origin = _env_overrides(env)
    for key, value in overrides.items():
        if isinstance(value, dict):  # a section's keys
            section = document.get(key) or {}
            if not isinstance(section, dict):
                raise InvalidInput(f"sandbox.{key}: must be a mapping", field=f"sandbox.{key}")
            document[key] = {**section, **value}
        else:
            document[key] = value
    try:
        return Config.from_document(document, prefix="sandbox")
    except InvalidInput as error:
        for key, variable in origin.items():
            if error.field == f"sandbox.{key}":
                raise InvalidInput(
                    f"{error.message} [set by {variable}]", field=error.field
                ) from None
        raise
