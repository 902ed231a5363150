"""The service's store: API keys and the durable task queue, in SQLAlchemy 2 Core.

SQLite (WAL) by default, PostgreSQL for several servers on one store; the same statements
serve both. The schema is made and upgraded by Alembic (``migrations/``), never by
``create_all``. A task row is the queue entry and the record at once:

    queued ──claim──> running ──finish──> succeeded | failed | timeout | resource_limit
       │                 │                         | error | launch_failed | cancelled
       └──cancel──> cancelled       └──(its server died)──> queued again, or lost

``claim`` takes queued rows with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite serialises
writers), so each task is taken by exactly one server. A running row names its owner and a
lease the owner renews; a row whose lease ran out belongs to a dead server and is recovered.
``finish`` ends only a row that is running under the caller's ownership, so no task ends twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

#: States of a task that has ended; a task in one of them never changes again.
ENDED = frozenset(
    {
        "succeeded",
        "failed",
        "timeout",
        "resource_limit",
        "error",
        "launch_failed",
        "cancelled",
        "lost",
    }
)
STATES = frozenset({"queued", "running"}) | ENDED
#: Seconds a running task's owner holds it without renewing; then it counts as dead.
LEASE = 30.0
#: A key as a client sends it: this prefix and 43 URL-safe characters (256 random bits).
KEY_PREFIX = "psk_"

metadata = sa.MetaData()

keys = sa.Table(
    "keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    #: The SHA-256 of the key; the key itself is shown once and never stored.
    sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("admin", sa.Boolean, nullable=False),
    #: Tasks queued and running at once (``None``: the service's default).
    sa.Column("max_active", sa.Integer, nullable=True),
    #: Signs this key's webhooks (HMAC-SHA256).
    sa.Column("webhook_secret", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    #: What its tasks may ask for (JSON: memory, timeout, cpu, disk, runtimes, images).
    sa.Column("caps", sa.Text, nullable=True),
    #: CPU seconds its tasks may use per UTC day (``None``: no budget).
    sa.Column("cpu_seconds_per_day", sa.Float, nullable=True),
)

tasks = sa.Table(
    "tasks",
    metadata,
    #: Order of acceptance: the queue's order and the list's cursor.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("runtime", sa.String(32), nullable=False),
    #: The task in its record form (JSON, bytes in base64).
    sa.Column("task", sa.LargeBinary, nullable=False),
    #: ``Result.to_json()`` once it ended (``None`` for a cancelled or lost task).
    sa.Column("result", sa.LargeBinary, nullable=True),
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    #: Runs begun (a run cut short by a dead server counts).
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    #: ``False``: run it even where the result cache has its result.
    sa.Column("use_cache", sa.Boolean, nullable=False, server_default=sa.true()),
    #: Why it ended without a result (cancelled, lost).
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("ended_at", sa.Float, nullable=True),
    #: CPU seconds the run used, from its result (what the daily budget counts).
    sa.Column("cpu_seconds", sa.Float, nullable=True),
    sa.UniqueConstraint("key_id", "idempotency_key", name="uq_tasks_key_idempotency"),
    sa.Index("ix_tasks_state_seq", "state", "seq"),
    sa.Index("ix_tasks_key_seq", "key_id", "seq"),
    sa.Index("ix_tasks_key_ended", "key_id", "ended_at"),
    sa.Index("ix_tasks_key_state", "key_id", "state"),
)


deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("task_id", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    #: ``pending`` (``next_at`` says when), ``delivered``, or ``failed`` (out of attempts).
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_at", sa.Float, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float, nullable=True),
    sa.Index("ix_deliveries_state_next", "state", "next_at"),
)


modules = sa.Table(
    "modules",
    metadata,
    sa.Column("key_id", sa.String(32), sa.ForeignKey("keys.id"), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("module", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class NewTask:
    """A task to queue: what ``add_tasks`` stores for each."""

    runtime: str
    task: bytes
    callback_url: str | None
    body_sha256: str
    use_cache: bool = True


@dataclass(frozen=True)
class Delivery:
    """A webhook to send: the ended task ``task_id``, to ``url``, signed with the key's
    secret."""

    seq: int
    task_id: str
    url: str
    attempts: int
    webhook_secret: str


@dataclass(frozen=True)
class Key:
    """An API key as the store knows it (never the key itself)."""

    id: str
    name: str
    admin: bool
    max_active: int | None
    webhook_secret: str
    created_at: float
    revoked_at: float | None
    #: What its tasks may ask for: memory, timeout, cpu, disk (numbers), runtimes, images.
    caps: dict[str, Any] = field(default_factory=dict)
    cpu_seconds_per_day: float | None = None


@dataclass(frozen=True)
class TaskRow:
    """One task of the queue, as stored."""

    seq: int
    id: str
    key_id: str
    state: str
    runtime: str
    #: The task's record form; ``None`` where it was not read (only runs need it).
    task: bytes | None
    result: bytes | None
    callback_url: str | None
    idempotency_key: str | None
    body_sha256: str
    attempts: int
    use_cache: bool
    owner: str | None
    reason: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None


class Conflict(Exception):
    """An ``Idempotency-Key`` was used before with another body."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row: Any) -> Key:
    return Key(
        id=row.id,
        name=row.name,
        admin=row.admin,
        max_active=row.max_active,
        webhook_secret=row.webhook_secret,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        caps=json.loads(row.caps) if row.caps else {},
        cpu_seconds_per_day=row.cpu_seconds_per_day,
    )


def _task(row: Any) -> TaskRow:
    fields: dict[str, Any] = {
        name: getattr(row, name, None) for name in TaskRow.__dataclass_fields__
    }
    return TaskRow(**fields)


_TASK_COLUMNS = [tasks.c[name] for name in TaskRow.__dataclass_fields__]
#: A task without its record form (which can be large, and which only a run needs).
_VIEW_COLUMNS = [column for column in _TASK_COLUMNS if column.name != "task"]


class Store:
    """Keys and tasks in one database; thread-safe (one connection per operation)."""

    def __init__(self, url: str, *, lease: float = LEASE) -> None:
        self.url = sa.make_url(url)
        #: Seconds a server holds a running task without renewing it.
        self.lease = lease
        self.sqlite = self.url.get_backend_name() == "sqlite"
        self._writing: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if self.sqlite else contextlib.nullcontext()
        )
        if self.sqlite and self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engine: Engine = sa.create_engine(
            self.url,
            pool_pre_ping=not self.sqlite,
            connect_args={"timeout": 30} if self.sqlite else {},
        )
        if self.sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(self.engine, "begin", _sqlite_begin)

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Make or upgrade the schema to this version's (Alembic ``upgrade head``)."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        settings = AlembicConfig()
        settings.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._begin() as connection:
            settings.attributes["connection"] = connection
            command.upgrade(settings, "head")

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it takes the write lock at once (``BEGIN
        IMMEDIATE``): a reader that upgrades to a writer later could fail with SQLITE_BUSY."""
        # One writer at a time in this process: SQLite has one write lock, and writers that
        # wait for it in its busy handler sleep and retry instead of queueing.
        with self._writing, self.engine.connect() as connection:
            connection.execution_options(immediate=True)
            with connection.begin():
                yield connection

    def _any(self, query: sa.Select[Any]) -> bool:
        """Whether ``query`` finds a row (a read: no write lock)."""
        with self.engine.connect() as connection:
            return connection.execute(query.limit(1)).first() is not None

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return False
        return True

    # -- keys ------------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        *,
        admin: bool = False,
        max_active: int | None = None,
        caps: dict[str, Any] | None = None,
        cpu_seconds_per_day: float | None = None,
    ) -> str:
        """Make a key named ``name``; returns the key, which is never shown again."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._begin() as connection:
            connection.execute(
                keys.insert().values(
                    id=uuid.uuid4().hex,
                    name=name,
                    secret_sha256=hash_key(secret),
                    admin=admin,
                    max_active=max_active,
                    webhook_secret=secrets.token_hex(32),
                    created_at=time.time(),
                    revoked_at=None,
                    caps=json.dumps(caps) if caps else None,
                    cpu_seconds_per_day=cpu_seconds_per_day,
                )
            )
        return secret

    def authenticate(self, secret: str) -> Key | None:
        """The live key ``secret`` is, or ``None`` (unknown or revoked)."""
        digest = hash_key(secret)
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(keys).where(keys.c.secret_sha256 == digest)).first()
        if row is None or not hmac.compare_digest(row.secret_sha256, digest):
            return None
        return None if row.revoked_at is not None else _key(row)

    def list_keys(self) -> list[Key]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(keys).order_by(keys.c.created_at)).all()
        return [_key(row) for row in rows]

    def revoke_key(self, name: str) -> bool:
        """Revoke the key named ``name``; ``False`` if there is no such live key."""
        with self._begin() as connection:
            done = connection.execute(
                keys.update()
                .where(keys.c.name == name, keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return done.rowcount == 1

    # -- tasks -----------------------------------------------------------------------------

    def add_task(
        self,
        key: Key,
        *,
        runtime: str,
        task: bytes,
        callback_url: str | None,
        idempotency_key: str | None,
        body_sha256: str,
        max_active: int,
        max_queued: int,
        use_cache: bool = True,
    ) -> tuple[TaskRow, bool]:
        """Queue a task (committed when this returns); ``(row, False)`` for a repeated
        ``Idempotency-Key`` with the same body.

        Raises:
            Conflict: the idempotency key was used with another body.
            QuotaExceeded: the key, or the whole service, has as many tasks as it may.
        """
        with self._begin() as connection:
            if idempotency_key is not None:
                row = connection.execute(
                    sa.select(*_VIEW_COLUMNS).where(
                        tasks.c.key_id == key.id, tasks.c.idempotency_key == idempotency_key
                    )
                ).first()
                if row is not None:
                    if row.body_sha256 != body_sha256:
                        raise Conflict(idempotency_key)
                    return _task(row), False
            active = tasks.c.state.in_(("queued", "running"))
            mine = connection.execute(
                sa.select(sa.func.count()).where(active, tasks.c.key_id == key.id)
            ).scalar_one()
            if mine >= max_active:
                raise QuotaExceeded("key", max_active)
            everyone = connection.execute(sa.select(sa.func.count()).where(active)).scalar_one()
            if everyone >= max_queued:
                raise QuotaExceeded("service", max_queued)
            values = {
                "id": uuid.uuid4().hex,
                "key_id": key.id,
                "state": "queued",
                "runtime": runtime,
                "task": task,
                "result": None,
                "callback_url": callback_url,
                "idempotency_key": idempotency_key,
                "body_sha256": body_sha256,
                "attempts": 0,
                "use_cache": use_cache,
                "owner": None,
                "lease_until": None,
                "cancel_requested": False,
                "reason": None,
                "created_at": time.time(),
                "started_at": None,
                "ended_at": None,
            }
            connection.execute(tasks.insert().values(**values))
            row = connection.execute(
                sa.select(*_VIEW_COLUMNS).where(tasks.c.id == values["id"])
            ).one()
            return _task(row), True

    def task(self, task_id: str, key: Key) -> TaskRow | None:
        """The task ``task_id`` if ``key`` may see it (its own, or any for an admin key)."""
        query = sa.select(*_VIEW_COLUMNS).where(tasks.c.id == task_id)
        if not key.admin:
            query = query.where(tasks.c.key_id == key.id)
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _task(row)

    def tasks_by_id(self, ids: list[str]) -> dict[str, TaskRow]:
        """The tasks ``ids`` names (whoever owns them: the caller checked), by id."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(*_VIEW_COLUMNS).where(tasks.c.id.in_(ids))).all()
        return {row.id: _task(row) for row in rows}

    def state(self, task_id: str) -> str | None:
        """The task's state, whoever owns it; ``None`` if there is no such task."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(tasks.c.state).where(tasks.c.id == task_id)).first()
        return None if row is None else str(row.state)

    def list_tasks(self, key: Key, *, state: str | None, after: int, limit: int) -> list[TaskRow]:
        """``key``'s tasks (an admin's: all) in order of acceptance, after cursor ``after``."""
        query = sa.select(*_VIEW_COLUMNS).where(tasks.c.seq > after)
        if not key.admin:
            query = query.where(tasks.c.key_id == key.id)
        if state is not None:
            query = query.where(tasks.c.state == state)
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(tasks.c.seq).limit(limit)).all()
        return [_task(row) for row in rows]

    def claim(self, owner: str, count: int) -> list[TaskRow]:
        """Take up to ``count`` queued tasks, oldest first, for ``owner`` to run."""
        if not self._any(sa.select(tasks.c.seq).where(tasks.c.state == "queued")):
            return []  # seen without the write lock
        now = time.time()
        with self._begin() as connection:
            picked = (
                sa.select(tasks.c.seq)
                .where(tasks.c.state == "queued")
                .order_by(tasks.c.seq)
                .limit(count)
                .with_for_update(skip_locked=True)
            )
            seqs = [row.seq for row in connection.execute(picked)]
            if not seqs:
                return []
            connection.execute(
                tasks.update()
                .where(tasks.c.seq.in_(seqs), tasks.c.state == "queued")
                .values(
                    state="running",
                    owner=owner,
                    lease_until=now + self.lease,
                    attempts=tasks.c.attempts + 1,
                    started_at=now,
                )
            )
            rows = connection.execute(
                sa.select(*_TASK_COLUMNS)
                .where(tasks.c.seq.in_(seqs), tasks.c.owner == owner)
                .order_by(tasks.c.seq)
            ).all()
        return [_task(row) for row in rows]

    def renew(self, owner: str) -> None:
        """Extend the lease of every task ``owner`` runs."""
        with self._begin() as connection:
            connection.execute(
                tasks.update()
                .where(tasks.c.owner == owner, tasks.c.state == "running")
                .values(lease_until=time.time() + self.lease)
            )

    def finish(
        self,
        task_id: str,
        owner: str,
        state: str,
        result: bytes | None,
        reason: str | None = None,
        cpu_seconds: float | None = None,
    ) -> bool:
        """End a task ``owner`` runs; ``False`` (and nothing changes) if it does not run it
        any more (recovered after a lost lease, or ended already)."""
        assert state in ENDED
        with self._begin() as connection:
            done = connection.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.owner == owner, tasks.c.state == "running")
                .values(
                    state=state,
                    result=result,
                    reason=reason,
                    ended_at=time.time(),
                    lease_until=None,
                    cpu_seconds=cpu_seconds,
                )
            )
            if done.rowcount == 1:
                _queue_deliveries(connection, tasks.c.id == task_id)
        return done.rowcount == 1

    def cancel(self, task_id: str, key: Key) -> TaskRow | None:
        """Cancel a task: a queued one ends now; a running one is marked for its owner to
        stop. The task as it is afterwards, or ``None`` if ``key`` cannot see it."""
        row = self.task(task_id, key)
        if row is None:
            return None
        with self._begin() as connection:
            cancelled = connection.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.state == "queued")
                .values(
                    state="cancelled",
                    reason="cancelled before it ran",
                    ended_at=time.time(),
                )
            )
            if cancelled.rowcount == 1:
                _queue_deliveries(connection, tasks.c.id == task_id)
            connection.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.state == "running")
                .values(cancel_requested=True)
            )
        return self.task(task_id, key)

    def cancel_requested(self, owner: str) -> list[str]:
        """Ids of tasks ``owner`` runs that a client asked to cancel."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(tasks.c.id).where(
                    tasks.c.owner == owner,
                    tasks.c.state == "running",
                    tasks.c.cancel_requested.is_(True),
                )
            ).all()
        return [row.id for row in rows]

    def delete(self, task_id: str, key: Key) -> bool | None:
        """Delete an ended or queued task (``True``); ``False`` for a running one (cancel it
        first); ``None`` if ``key`` cannot see it."""
        row = self.task(task_id, key)
        if row is None:
            return None
        with self._begin() as connection:
            done = connection.execute(
                tasks.delete().where(tasks.c.id == task_id, tasks.c.state != "running")
            )
        return done.rowcount == 1

    def recover(self, *, retry: bool, max_attempts: int, everyone: bool = False) -> dict[str, int]:
        """Tasks whose server died while they ran: queued again (``retry``, while attempts
        are left) or marked ``lost``. ``everyone``: every running task is such a task (the
        only server of a SQLite store, starting). Returns how many went each way."""
        now = time.time()
        orphaned = tasks.c.state == "running"
        if not everyone:
            orphaned = orphaned & (tasks.c.lease_until < now)
        counts = {"requeued": 0, "lost": 0}
        with self._begin() as connection:
            if retry:
                counts["requeued"] = connection.execute(
                    tasks.update()
                    .where(orphaned, tasks.c.attempts < max_attempts)
                    .where(tasks.c.cancel_requested.is_(False))
                    .values(state="queued", owner=None, lease_until=None)
                ).rowcount
            lost = [row.id for row in connection.execute(sa.select(tasks.c.id).where(orphaned))]
            if lost:
                connection.execute(
                    tasks.update()
                    .where(tasks.c.id.in_(lost))
                    .values(
                        state="lost",
                        owner=None,
                        lease_until=None,
                        ended_at=now,
                        reason="its server stopped while it ran",
                    )
                )
                _queue_deliveries(connection, tasks.c.id.in_(lost))
            counts["lost"] = len(lost)
        return counts

    def active(self) -> int:
        """Tasks queued or running, all keys together."""
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    sa.select(sa.func.count()).where(tasks.c.state.in_(("queued", "running")))
                ).scalar_one()
            )

    def cpu_seconds_since(self, key: Key, since: float) -> float:
        """CPU seconds ``key``'s tasks that ended after ``since`` used."""
        with self.engine.connect() as connection:
            used = connection.execute(
                sa.select(sa.func.coalesce(sa.func.sum(tasks.c.cpu_seconds), 0.0)).where(
                    tasks.c.key_id == key.id, tasks.c.ended_at >= since
                )
            ).scalar_one()
        return float(used)

    def add_tasks(
        self, key: Key, items: list[NewTask], *, max_active: int, max_queued: int
    ) -> list[TaskRow]:
        """Queue ``items`` all together, or none (one transaction, one quota check).

        Raises:
            QuotaExceeded: they do not all fit in the key's or the service's quota.
        """
        now = time.time()
        with self._begin() as connection:
            active = tasks.c.state.in_(("queued", "running"))
            mine = connection.execute(
                sa.select(sa.func.count()).where(active, tasks.c.key_id == key.id)
            ).scalar_one()
            if mine + len(items) > max_active:
                raise QuotaExceeded("key", max_active)
            everyone = connection.execute(sa.select(sa.func.count()).where(active)).scalar_one()
            if everyone + len(items) > max_queued:
                raise QuotaExceeded("service", max_queued)
            ids = [uuid.uuid4().hex for _ in items]
            connection.execute(
                tasks.insert(),
                [
                    {
                        "id": task_id,
                        "key_id": key.id,
                        "state": "queued",
                        "runtime": item.runtime,
                        "task": item.task,
                        "result": None,
                        "callback_url": item.callback_url,
                        "idempotency_key": None,
                        "body_sha256": item.body_sha256,
                        "attempts": 0,
                        "use_cache": item.use_cache,
                        "owner": None,
                        "lease_until": None,
                        "cancel_requested": False,
                        "reason": None,
                        "created_at": now,
                        "started_at": None,
                        "ended_at": None,
                    }
                    for task_id, item in zip(ids, items, strict=True)
                ],
            )
            rows = connection.execute(
                sa.select(*_VIEW_COLUMNS).where(tasks.c.id.in_(ids)).order_by(tasks.c.seq)
            ).all()
        return [_task(row) for row in rows]

    # -- modules -----------------------------------------------------------------------------

    def put_module(self, key: Key, sha256: str, module: bytes) -> bool:
        """Keep ``module`` for ``key`` under its hash; ``False`` if it was there already."""
        with self._begin() as connection:
            there = connection.execute(
                sa.select(modules.c.sha256).where(
                    modules.c.key_id == key.id, modules.c.sha256 == sha256
                )
            ).first()
            if there is not None:
                return False
            connection.execute(
                modules.insert().values(
                    key_id=key.id, sha256=sha256, module=module, created_at=time.time()
                )
            )
        return True

    def module(self, key: Key, sha256: str) -> bytes | None:
        """``key``'s module with hash ``sha256``, if it sent one."""
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(modules.c.module).where(
                    modules.c.key_id == key.id, modules.c.sha256 == sha256
                )
            ).first()
        return None if row is None else bytes(row.module)

    # -- webhooks ----------------------------------------------------------------------------

    def due_deliveries(self, limit: int, hold: float) -> list[Delivery]:
        """Take up to ``limit`` pending deliveries that are due, for ``hold`` seconds (another
        server does not take them meanwhile; a server that dies releases them so)."""
        now = time.time()
        due = (deliveries.c.state == "pending") & (deliveries.c.next_at <= now)
        if not self._any(sa.select(deliveries.c.seq).where(due)):
            return []  # seen without the write lock
        with self._begin() as connection:
            picked = (
                sa.select(deliveries.c.seq)
                .where(deliveries.c.state == "pending", deliveries.c.next_at <= now)
                .order_by(deliveries.c.next_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            seqs = [row.seq for row in connection.execute(picked)]
            if not seqs:
                return []
            connection.execute(
                deliveries.update().where(deliveries.c.seq.in_(seqs)).values(next_at=now + hold)
            )
            rows = connection.execute(
                sa.select(
                    deliveries.c.seq,
                    deliveries.c.task_id,
                    deliveries.c.url,
                    deliveries.c.attempts,
                    keys.c.webhook_secret,
                )
                .join(keys, keys.c.id == deliveries.c.key_id)
                .where(deliveries.c.seq.in_(seqs))
                .order_by(deliveries.c.seq)
            ).all()
        return [
            Delivery(
                seq=row.seq,
                task_id=row.task_id,
                url=row.url,
                attempts=row.attempts,
                webhook_secret=row.webhook_secret,
            )
            for row in rows
        ]

    def delivery_done(self, seq: int, *, error: str | None, retry_in: float | None) -> None:
        """Record an attempt: delivered (``error`` is ``None``), to be tried again in
        ``retry_in`` seconds, or failed for good (``retry_in`` is ``None``)."""
        now = time.time()
        values: dict[str, Any] = {"attempts": deliveries.c.attempts + 1, "last_error": error}
        if error is None:
            values.update(state="delivered", delivered_at=now)
        elif retry_in is None:
            values.update(state="failed")
        else:
            values.update(next_at=now + retry_in)
        with self._begin() as connection:
            connection.execute(deliveries.update().where(deliveries.c.seq == seq).values(values))

    def deliveries_of(self, task_id: str) -> list[dict[str, Any]]:
        """The deliveries of a task, oldest first."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(deliveries)
                .where(deliveries.c.task_id == task_id)
                .order_by(deliveries.c.seq)
            ).all()
        return [dict(row._mapping) for row in rows]

    def task_any(self, task_id: str) -> TaskRow | None:
        """The task ``task_id``, whoever owns it (for the server's own use)."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(*_VIEW_COLUMNS).where(tasks.c.id == task_id)).first()
        return None if row is None else _task(row)


def _queue_deliveries(connection: Connection, which: Any) -> None:
    """Queue a webhook for each task ``which`` selects that has a callback URL, in the
    transaction that ended it: an ended task's webhook is never forgotten."""
    now = time.time()
    rows = connection.execute(
        sa.select(tasks.c.id, tasks.c.key_id, tasks.c.callback_url).where(
            which, tasks.c.callback_url.is_not(None)
        )
    ).all()
    for row in rows:
        connection.execute(
            deliveries.insert().values(
                task_id=row.id,
                key_id=row.key_id,
                url=row.callback_url,
                state="pending",
                attempts=0,
                next_at=now,
                last_error=None,
                created_at=now,
                delivered_at=None,
            )
        )


class QuotaExceeded(Exception):
    """A key (``scope="key"``) or the whole service (``"service"``) has as many tasks queued
    and running as it may."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(scope, limit)
        self.scope = scope
        self.limit = limit


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get("immediate", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    try:
        # WAL: readers never wait for the writer. NORMAL: a commit survives the process's
        # death (kill -9); only a power loss can take the last ones.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()
    # pysqlite's own transaction handling would defer BEGIN; SQLAlchemy emits it instead.
    connection.isolation_level = None
