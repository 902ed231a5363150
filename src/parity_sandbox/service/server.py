"""``parity-sandbox serve``: open and migrate the store, recover what a dead server left, and
run the API under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from parity_sandbox._config import Config
from parity_sandbox._exceptions import RuntimeUnavailable
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


def serve(config: Config, *, host: str | None = None, port: int | None = None) -> None:
    """Run the service until it is stopped (SIGINT, SIGTERM)."""
    import uvicorn

    from parity_sandbox.service.app import create_app
    from parity_sandbox.service.dispatch import Dispatcher

    settings = config.service
    store = open_store(config)
    try:
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
            app = create_app(config, store, Dispatcher(store, config, owner))
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
