"""``parity-sandbox serve``: open and migrate the store, recover what a dead server left, and
run the API under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import parity_sandbox
from parity_sandbox._config import Config
from parity_sandbox._exceptions import RuntimeUnavailable
from parity_sandbox.audit import AuditLog, canonical
from parity_sandbox.metrics import Metrics
from parity_sandbox.service.store import Store

log = logging.getLogger("parity_sandbox.service")


def open_store(config: Config) -> Store:
    """The configured store, its schema made or upgraded to this version's."""
    store = Store(config.service.resolved_database_url(), lease=config.service.lease)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


@contextlib.contextmanager
def sole_server(store: Store, config: Config) -> Iterator[None]:
    """For a SQLite store: hold its lock, so that a second server on the same file refuses to
    start (PostgreSQL stores are shared by design)."""
    if not store.sqlite:
        yield
        return
    state_dir = config.service.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = Path(store.url.database or state_dir / "service.sqlite3")
    lock = os.open(f"{database}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeUnavailable(
                f"another parity-sandbox serve uses the store {database}; stop it, or give "
                "this one its own service.state_dir (or a PostgreSQL database_url)"
            ) from None
        yield
    finally:
        os.close(lock)


def open_audit_log(config: Config) -> AuditLog | None:
    """The service's audit log, if ``config.audit`` asks for one: its entries written on a
    thread of its own (the event loop never waits for the disk), synced per batch unless
    ``audit.fsync`` says otherwise."""
    settings = config.audit
    if not settings.enabled:
        return None
    if "fsync" not in settings.model_fields_set:
        settings = settings.model_copy(update={"fsync": "batch"})
    return AuditLog.from_settings(settings, background=True)


def open_metrics(config: Config) -> Metrics | None:
    """The service's metrics: on unless ``metrics.enabled`` is false; left unset, only where
    ``prometheus_client`` is installed (extra ``[monitoring]``)."""
    enabled = config.metrics.enabled
    if enabled is False:
        return None
    try:
        return Metrics.default()
    except RuntimeUnavailable:
        if enabled:
            raise
        log.warning("no metrics: prometheus_client is not installed ([monitoring] extra)")
        return None


def config_fingerprint(config: Config) -> str:
    """The SHA-256 of the effective configuration (for ``config_loaded``: a hash, so no
    secret in it, a database password say, reaches the log)."""
    return hashlib.sha256(canonical(config.to_document())).hexdigest()


def serve(config: Config, *, host: str | None = None, port: int | None = None) -> None:
    """Run the service until it is stopped (SIGINT, SIGTERM)."""
    import uvicorn

    from parity_sandbox.service.app import create_app
    from parity_sandbox.service.dispatch import Dispatcher

    settings = config.service
    store = open_store(config)
    audit = None
    try:
        audit = open_audit_log(config)
        metrics = open_metrics(config)
        with sole_server(store, config):
            counts = store.recover(
                retry=settings.on_restart == "retry",
                max_attempts=settings.max_attempts,
                everyone=store.sqlite,  # we hold the lock: no other server runs anything
            )
            if any(counts.values()):
                log.warning(
                    "tasks a stopped server was running: %d queued again, %d lost",
                    counts["requeued"],
                    counts["lost"],
                )
            owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            if audit is not None:
                audit.record_later(
                    "config_loaded",
                    who=None,
                    server=owner,
                    version=parity_sandbox.__version__,
                    config_sha256=config_fingerprint(config),
                )
            dispatcher = Dispatcher(store, config, owner, audit=audit, metrics=metrics)
            app = create_app(config, store, dispatcher)
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host=host or settings.host,
                    port=settings.port if port is None else port,
                    log_level="warning",
                    access_log=False,
                    lifespan="on",
                    timeout_graceful_shutdown=10,
                )
            )
            server.run()
    finally:
        store.close()
        if audit is not None:
            audit.close()
