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

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import operator
import secrets
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")
P = ParamSpec("P")

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
    #: The WASM module the record names by ``wasm_module_sha256``: (sha256, bytes), kept
    #: for the key in the same transaction.
    module: tuple[str, bytes] | None = None


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


def _key_row(row: Any) -> Key:
    """A ``Key`` from a DBAPI row of ``_KEY_FIELDS`` columns."""
    fields = dict(zip(_KEY_FIELDS, row, strict=False))
    fields["admin"] = bool(fields["admin"])
    fields["caps"] = json.loads(fields["caps"]) if fields["caps"] else {}
    return Key(**fields)


def _task(row: Any) -> TaskRow:
    fields: dict[str, Any] = {
        name: getattr(row, name, None) for name in TaskRow.__dataclass_fields__
    }
    return TaskRow(**fields)


_TASK_COLUMNS = [tasks.c[name] for name in TaskRow.__dataclass_fields__]
#: What an insert takes from a new ``TaskRow`` (the rest: the record, lease, cancel flag).
_INSERTED = [name for name in TaskRow.__dataclass_fields__ if name not in ("seq", "task")]
#: A task without its record form (which can be large, and which only a run needs).
_VIEW_COLUMNS = [column for column in _TASK_COLUMNS if column.name != "task"]
_VIEW_NAMES = [column.name for column in _VIEW_COLUMNS]
_TASK_NAMES = [column.name for column in _TASK_COLUMNS]
_KEY_FIELDS = list(Key.__dataclass_fields__)

# The statements of the hot path (a submission, a run's end, a read of a task) are compiled
# once for the store's dialect and run on the DBAPI cursor (``Store._fast``): building and
# processing a statement in SQLAlchemy costs several times what SQLite takes to run it.
#: Queued or running (no IN: a list parameter cannot be compiled ahead).
_ACTIVE = sa.or_(tasks.c.state == "queued", tasks.c.state == "running")
_KEY_BY_SECRET = sa.select(*[keys.c[name] for name in _KEY_FIELDS], keys.c.secret_sha256).where(
    keys.c.secret_sha256 == sa.bindparam("digest")
)
_BY_IDEMPOTENCY = sa.select(*_VIEW_COLUMNS).where(
    tasks.c.key_id == sa.bindparam("key_id"),
    tasks.c.idempotency_key == sa.bindparam("idempotency_key"),
)
_ACTIVE_OF_KEY = sa.select(sa.func.count()).where(_ACTIVE, tasks.c.key_id == sa.bindparam("key_id"))
_ACTIVE_ALL = sa.select(sa.func.count()).where(_ACTIVE)
_TASK_BY_ID = sa.select(*_VIEW_COLUMNS).where(tasks.c.id == sa.bindparam("id"))
_TASK_OF_KEY = _TASK_BY_ID.where(tasks.c.key_id == sa.bindparam("key_id"))
_STATE = sa.select(tasks.c.state).where(tasks.c.id == sa.bindparam("id"))
_INSERT_TASK = (
    tasks.insert()
    .values({name: sa.bindparam(name) for name in [*_INSERTED, "task", "lease_until"]})
    .values(cancel_requested=False)
    .returning(tasks.c.seq)
)
_FINISH = (
    tasks.update()
    .where(
        tasks.c.id == sa.bindparam("task_id"),
        tasks.c.owner == sa.bindparam("task_owner"),
        tasks.c.state == "running",
    )
    .values(
        state=sa.bindparam("state"),
        result=sa.bindparam("result"),
        reason=sa.bindparam("reason"),
        ended_at=sa.bindparam("ended_at"),
        lease_until=None,
        cpu_seconds=sa.bindparam("cpu_seconds"),
    )
)
#: The webhook of a task that ended, if it has a callback URL (``_queue_deliveries``' work).
_DELIVERY_OF = deliveries.insert().from_select(
    ["task_id", "key_id", "url", "state", "attempts", "next_at", "created_at"],
    sa.select(
        tasks.c.id,
        tasks.c.key_id,
        tasks.c.callback_url,
        sa.literal("pending"),
        sa.literal(0),
        sa.bindparam("now", type_=sa.Float),
        sa.bindparam("now", type_=sa.Float),
    ).where(tasks.c.id == sa.bindparam("task_id"), tasks.c.callback_url.is_not(None)),
)
_MODULE = sa.select(modules.c.module).where(
    modules.c.key_id == sa.bindparam("key_id"), modules.c.sha256 == sa.bindparam("sha256")
)
_INSERT_MODULE = modules.insert().values(
    {name: sa.bindparam(name) for name in ("key_id", "sha256", "module", "created_at")}
)
_ANY_QUEUED = sa.select(tasks.c.seq).where(tasks.c.state == "queued").limit(1)
_PICK = (
    sa.select(tasks.c.seq)
    .where(tasks.c.state == "queued")
    .order_by(tasks.c.seq)
    .limit(sa.bindparam("count"))
    .with_for_update(skip_locked=True)
)
_PICK_OF = (
    sa.select(tasks.c.seq)
    .where(tasks.c.state == "queued", tasks.c.runtime == sa.bindparam("runtime"))
    .order_by(tasks.c.seq)
    .limit(sa.bindparam("count"))
    .with_for_update(skip_locked=True)
)
_TAKE = (
    tasks.update()
    .where(tasks.c.seq == sa.bindparam("seq"), tasks.c.state == "queued")
    .values(
        state="running",
        owner=sa.bindparam("owner"),
        lease_until=sa.bindparam("lease_until"),
        attempts=tasks.c.attempts + 1,
        started_at=sa.bindparam("now"),
    )
    .returning(*_TASK_COLUMNS)
)
_HOT = (
    _KEY_BY_SECRET,
    _BY_IDEMPOTENCY,
    _ACTIVE_OF_KEY,
    _ACTIVE_ALL,
    _ANY_QUEUED,
    _TASK_BY_ID,
    _TASK_OF_KEY,
    _STATE,
    _INSERT_TASK,
    _FINISH,
    _DELIVERY_OF,
    _MODULE,
    _INSERT_MODULE,
    _PICK,
    _PICK_OF,
    _TAKE,
)
#: Bytes of modules a store keeps in memory (they never change: a hash names each).
MODULE_CACHE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Finish:
    """How a run ended, for ``Store.finish_many``."""

    task_id: str
    owner: str
    state: str
    result: bytes | None
    reason: str | None = None
    cpu_seconds: float | None = None
    #: Whether the task may have a ``callback_url`` (``False``: no webhook to queue).
    callback: bool = True


#: A statement compiled for a dialect: its SQL, the values of its fixed parameters, and what
#: picks its parameters in order where the driver takes them by position.
_Compiled = tuple[str, dict[str, Any], Callable[[dict[str, Any]], tuple[Any, ...]] | None]


class _Cursor:
    """A DBAPI cursor that runs the hot path's statements, compiled once per dialect."""

    def __init__(self, cursor: Any, compiled: dict[Any, _Compiled]) -> None:
        self.cursor = cursor
        self._compiled = compiled

    def run(self, statement: Any, **params: Any) -> Any:
        """Run ``statement`` with ``params``; the cursor, to fetch from."""
        sql, fixed, pick = self._compiled[statement]
        values = {**fixed, **params}
        self.cursor.execute(sql, values if pick is None else pick(values))
        return self.cursor

    def row(self, statement: Any, **params: Any) -> Any:
        """The first row ``statement`` finds, or ``None``."""
        return self.run(statement, **params).fetchone()


def _picker(order: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """What takes the values of ``order``'s names from a dict, as a tuple."""
    if not order:
        return lambda _values: ()
    if len(order) == 1:
        (name,) = order
        return lambda values: (values[name],)
    get = operator.itemgetter(*order)
    return lambda values: tuple(get(values))


def _compile(dialect: sa.Dialect) -> dict[Any, _Compiled]:
    """The hot path's statements in ``dialect``'s SQL."""
    compiled: dict[Any, _Compiled] = {}
    for statement in _HOT:
        done = statement.compile(dialect=dialect)
        assert "POSTCOMPILE" not in done.string, done.string
        pick = None
        if done.positional:
            order = tuple(done.positiontup or ())
            pick = _picker(order)
        fixed = dict(done.params)  # literals (state = 'running'); the caller gives the rest
        compiled[statement] = (done.string, fixed, pick)
    return compiled


def _view_row(row: Any, names: list[str] = _VIEW_NAMES) -> TaskRow:
    """A ``TaskRow`` from a DBAPI row of the columns ``names`` (``_VIEW_COLUMNS``' or all)."""
    fields = dict(zip(names, row, strict=True))
    fields["use_cache"] = bool(fields["use_cache"])
    for name in ("result", "task"):
        if fields.get(name) is not None:
            fields[name] = bytes(fields[name])
    fields.setdefault("task", None)
    return TaskRow(**fields)


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
        #: The threads' own SQLite connections (``_fast``), to close with the store.
        self._local = threading.local()
        self._own: list[sqlite3.Connection] = []
        self._own_lock = threading.Lock()
        #: (key id, sha256) -> module, least recently used first.
        self._modules: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._modules_size = 0
        self._modules_lock = threading.Lock()
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
        self._compiled = _compile(self.engine.dialect)

    def close(self) -> None:
        with self._own_lock:
            own, self._own = self._own, []
        for connection in own:
            connection.close()
        self.engine.dispose()

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)`` (a store operation) from a coroutine. SQLite's take a
        fraction of a millisecond here, less than a hop to a thread and back, so they run on
        the event loop; PostgreSQL's (a round trip on the network) in a thread."""
        if self.sqlite:
            return call(*args, **kwargs)
        return await asyncio.to_thread(call, *args, **kwargs)

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database, as far as readers allow, so that a
        commit on the event loop seldom has to (SQLite does it in the commit that fills
        the log)."""
        if self.sqlite:
            with self._read() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

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

    @contextmanager
    def _fast(self, *, write: bool = False) -> Iterator[_Cursor]:
        """A cursor for the hot path's statements; with ``write``, in one transaction (as
        ``_begin``: SQLite's write lock taken at once). SQLite: on this thread's own
        connection, kept open; PostgreSQL: on one from the pool."""
        with self._writing if write else contextlib.nullcontext():
            own = self._own_connection()
            connection = own or self.engine.raw_connection()
            try:
                cursor = connection.cursor()
                try:
                    if write and self.sqlite:
                        cursor.execute("BEGIN IMMEDIATE")
                    yield _Cursor(cursor, self._compiled)
                    if write:
                        connection.commit()
                except BaseException:
                    connection.rollback()
                    raise
                finally:
                    cursor.close()
            finally:
                if own is None:
                    connection.close()

    def _own_connection(self) -> sqlite3.Connection | None:
        """This thread's SQLite connection (``None``: not a SQLite file store)."""
        if not (self.sqlite and self.url.database):
            return None
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.url.database, timeout=30, isolation_level=None, check_same_thread=False
            )
            _sqlite_pragmas(connection, None)
            self._local.connection = connection
            with self._own_lock:
                self._own.append(connection)
        return connection

    def _read(self) -> Connection:
        """A connection for reads: one statement each, so on SQLite no transaction is begun
        (a single statement reads a consistent state)."""
        return self.engine.connect().execution_options(reading=True)

    def _any(self, query: sa.Select[Any]) -> bool:
        """Whether ``query`` finds a row (a read: no write lock)."""
        with self._read() as connection:
            return connection.execute(query.limit(1)).first() is not None

    def ping(self) -> bool:
        try:
            with self._read() as connection:
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
        with self._fast() as cursor:
            row = cursor.row(_KEY_BY_SECRET, digest=digest)
        if row is None or not hmac.compare_digest(row[-1], digest):
            return None
        key = _key_row(row)
        return None if key.revoked_at is not None else key

    def list_keys(self) -> list[Key]:
        with self._read() as connection:
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
        module: tuple[str, bytes] | None = None,
        run_as: str | None = None,
        begin: Callable[[TaskRow], None] | None = None,
    ) -> tuple[TaskRow, bool]:
        """Queue a task (committed when this returns); ``(row, False)`` for a repeated
        ``Idempotency-Key`` with the same body. ``module`` (its sha256 and bytes) is kept
        for ``key`` with it, so the record names it by hash. With ``run_as``, and nothing
        queued before it, the task is taken at once for that owner (``running``), so a
        server with a free slot runs it without a claim; ``begin`` is then called with its
        row after the insert, before the commit (if the commit fails, the row never was).

        Raises:
            Conflict: the idempotency key was used with another body.
            QuotaExceeded: the key, or the whole service, has as many tasks as it may.
        """
        item = NewTask(runtime, task, callback_url, body_sha256, use_cache, module)
        with self._fast(write=True) as cursor:
            if idempotency_key is not None:
                row = cursor.row(_BY_IDEMPOTENCY, key_id=key.id, idempotency_key=idempotency_key)
                if row is not None:
                    before = _view_row(row)
                    if before.body_sha256 != body_sha256:
                        raise Conflict(idempotency_key)
                    return before, False
            (made,) = self._insert(
                cursor, key, [item], max_active, max_queued, run_as, [True], idempotency_key
            )
            if begin is not None and made.state == "running":
                begin(made)
        self._remember_module(key.id, module)
        return made, True

    def add_tasks(
        self,
        key: Key,
        items: list[NewTask],
        *,
        max_active: int,
        max_queued: int,
        run_as: str | None = None,
        runs: list[bool] | None = None,
    ) -> list[TaskRow]:
        """Queue ``items`` all together, or none (one transaction, one quota check). With
        ``run_as``, and nothing queued before them, those ``runs`` marks are taken at once
        for that owner (as ``add_task`` does).

        Raises:
            QuotaExceeded: they do not all fit in the key's or the service's quota.
        """
        with self._fast(write=True) as cursor:
            made = self._insert(
                cursor, key, items, max_active, max_queued, run_as, runs or [False] * len(items)
            )
        for item in items:
            self._remember_module(key.id, item.module)
        return made

    def _insert(
        self,
        cursor: _Cursor,
        key: Key,
        items: list[NewTask],
        max_active: int,
        max_queued: int,
        run_as: str | None,
        runs: list[bool],
        idempotency_key: str | None = None,
    ) -> list[TaskRow]:
        (mine,) = cursor.row(_ACTIVE_OF_KEY, key_id=key.id)
        if mine + len(items) > max_active:
            raise QuotaExceeded("key", max_active)
        (everyone,) = cursor.row(_ACTIVE_ALL)
        if everyone + len(items) > max_queued:
            raise QuotaExceeded("service", max_queued)
        for digest, module in {
            item.module[0]: item.module[1] for item in items if item.module
        }.items():
            self._keep_module(cursor, key, digest, module)
        if run_as is not None and any(runs) and cursor.row(_ANY_QUEUED) is not None:
            run_as = None  # others wait already: the new ones queue behind them
        now = time.time()
        made, values = [], []
        for index, item in enumerate(items):
            taken = run_as is not None and runs[index]
            row = TaskRow(
                seq=0,
                id=uuid.uuid4().hex,
                key_id=key.id,
                state="running" if taken else "queued",
                runtime=item.runtime,
                task=None,
                result=None,
                callback_url=item.callback_url,
                idempotency_key=idempotency_key,
                body_sha256=item.body_sha256,
                attempts=1 if taken else 0,
                use_cache=item.use_cache,
                owner=run_as if taken else None,
                reason=None,
                created_at=now,
                started_at=now if taken else None,
                ended_at=None,
            )
            made.append(row)
            values.append(
                {
                    **{name: getattr(row, name) for name in _INSERTED},
                    "task": item.task,
                    "lease_until": now + self.lease if taken else None,
                    "cancel_requested": False,
                }
            )
        return [
            dataclasses.replace(row, seq=cursor.row(_INSERT_TASK, **entry)[0])
            for row, entry in zip(made, values, strict=True)
        ]

    def task(self, task_id: str, key: Key) -> TaskRow | None:
        """The task ``task_id`` if ``key`` may see it (its own, or any for an admin key)."""
        with self._fast() as cursor:
            if key.admin:
                row = cursor.row(_TASK_BY_ID, id=task_id)
            else:
                row = cursor.row(_TASK_OF_KEY, id=task_id, key_id=key.id)
        return None if row is None else _view_row(row)

    def tasks_by_id(self, ids: list[str]) -> dict[str, TaskRow]:
        """The tasks ``ids`` names (whoever owns them: the caller checked), by id."""
        with self._read() as connection:
            rows = connection.execute(sa.select(*_VIEW_COLUMNS).where(tasks.c.id.in_(ids))).all()
        return {row.id: _task(row) for row in rows}

    def state(self, task_id: str) -> str | None:
        """The task's state, whoever owns it; ``None`` if there is no such task."""
        with self._fast() as cursor:
            row = cursor.row(_STATE, id=task_id)
        return None if row is None else str(row[0])

    def list_tasks(self, key: Key, *, state: str | None, after: int, limit: int) -> list[TaskRow]:
        """``key``'s tasks (an admin's: all) in order of acceptance, after cursor ``after``."""
        query = sa.select(*_VIEW_COLUMNS).where(tasks.c.seq > after)
        if not key.admin:
            query = query.where(tasks.c.key_id == key.id)
        if state is not None:
            query = query.where(tasks.c.state == state)
        with self._read() as connection:
            rows = connection.execute(query.order_by(tasks.c.seq).limit(limit)).all()
        return [_task(row) for row in rows]

    def claim(self, owner: str, count: int, runtime: str | None = None) -> list[TaskRow]:
        """Take up to ``count`` queued tasks (of ``runtime``, or any), oldest first, for
        ``owner`` to run."""
        with self._fast() as cursor:
            if cursor.row(_ANY_QUEUED) is None:
                return []  # seen without the write lock
        now = time.time()
        taken = []
        with self._fast(write=True) as cursor:
            if runtime is None:
                picked = cursor.run(_PICK, count=count)
            else:
                picked = cursor.run(_PICK_OF, count=count, runtime=runtime)
            seqs = [row[0] for row in picked.fetchall()]
            for seq in seqs:
                row = cursor.row(_TAKE, seq=seq, owner=owner, lease_until=now + self.lease, now=now)
                if row is not None:
                    taken.append(_view_row(row, _TASK_NAMES))
        return taken

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
        return self.finish_many([Finish(task_id, owner, state, result, reason, cpu_seconds)])[0]

    def finish_many(self, ends: list[Finish], now: float | None = None) -> list[bool]:
        """``finish`` for each of ``ends``, in one transaction; they ended at ``now``."""
        assert all(end.state in ENDED for end in ends)
        now = time.time() if now is None else now
        done = []
        with self._fast(write=True) as cursor:
            for end in ends:
                changed = cursor.run(
                    _FINISH,
                    task_id=end.task_id,
                    task_owner=end.owner,
                    state=end.state,
                    result=end.result,
                    reason=end.reason,
                    ended_at=now,
                    cpu_seconds=end.cpu_seconds,
                )
                done.append(changed.rowcount == 1)
                if done[-1] and end.callback:  # its webhook, in the transaction that ends it
                    cursor.run(_DELIVERY_OF, task_id=end.task_id, now=now)
        return done

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
        with self._read() as connection:
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
        with self._read() as connection:
            return int(
                connection.execute(
                    sa.select(sa.func.count()).where(tasks.c.state.in_(("queued", "running")))
                ).scalar_one()
            )

    def cpu_seconds_since(self, key: Key, since: float) -> float:
        """CPU seconds ``key``'s tasks that ended after ``since`` used."""
        with self._read() as connection:
            used = connection.execute(
                sa.select(sa.func.coalesce(sa.func.sum(tasks.c.cpu_seconds), 0.0)).where(
                    tasks.c.key_id == key.id, tasks.c.ended_at >= since
                )
            ).scalar_one()
        return float(used)

    # -- monitoring (admin reads: run them in a thread, they may scan) ------------------------

    def active_counts(self) -> list[tuple[str, str, int]]:
        """(key name, state, count) of the tasks queued and running now."""
        with self._read() as connection:
            rows = connection.execute(
                sa.select(keys.c.name, tasks.c.state, sa.func.count())
                .select_from(tasks.join(keys, keys.c.id == tasks.c.key_id))
                .where(tasks.c.state.in_(("queued", "running")))
                .group_by(keys.c.name, tasks.c.state)
            ).all()
        return [(str(name), str(state), int(count)) for name, state, count in rows]

    def ended_since(self, since: float) -> dict[str, int]:
        """How many tasks ended after ``since``, by state."""
        with self._read() as connection:
            rows = connection.execute(
                sa.select(tasks.c.state, sa.func.count())
                .where(tasks.c.ended_at >= since)
                .group_by(tasks.c.state)
            ).all()
        return {str(state): int(count) for state, count in rows}

    def top_cpu_since(self, since: float, limit: int = 10) -> list[tuple[str, float]]:
        """The keys whose tasks that ended after ``since`` used the most CPU seconds: (key
        name, seconds), most first."""
        used = sa.func.sum(tasks.c.cpu_seconds)
        with self._read() as connection:
            rows = connection.execute(
                sa.select(keys.c.name, used)
                .select_from(tasks.join(keys, keys.c.id == tasks.c.key_id))
                .where(tasks.c.ended_at >= since, tasks.c.cpu_seconds.is_not(None))
                .group_by(keys.c.name)
                .order_by(used.desc(), keys.c.name)
                .limit(limit)
            ).all()
        return [(str(name), float(seconds or 0.0)) for name, seconds in rows]

    # -- modules -----------------------------------------------------------------------------

    def put_module(self, key: Key, sha256: str, module: bytes) -> bool:
        """Keep ``module`` for ``key`` under its hash; ``False`` if it was there already."""
        with self._fast(write=True) as cursor:
            created = self._keep_module(cursor, key, sha256, module)
        self._remember_module(key.id, (sha256, module))
        return created

    def module(self, key: Key, sha256: str) -> bytes | None:
        """``key``'s module with hash ``sha256``, if it sent one."""
        return self.module_of(key.id, sha256)

    def module_of(self, key_id: str, sha256: str) -> bytes | None:
        """The module with hash ``sha256`` that the key ``key_id`` sent, if any."""
        found = self.cached_module(key_id, sha256)
        if found is not None:
            return found
        with self._fast() as cursor:
            row = cursor.row(_MODULE, key_id=key_id, sha256=sha256)
        if row is None:
            return None
        module = bytes(row[0])
        self._remember_module(key_id, (sha256, module))
        return module

    def cached_module(self, key_id: str, sha256: str) -> bytes | None:
        """``module_of`` from memory only (``None``: not there; ask ``module_of``)."""
        with self._modules_lock:
            found = self._modules.get((key_id, sha256))
            if found is not None:
                self._modules.move_to_end((key_id, sha256))
            return found

    def _keep_module(self, cursor: _Cursor, key: Key, sha256: str, module: bytes) -> bool:
        if self.cached_module(key.id, sha256) is not None:
            return False  # a module never changes, nor goes: it is in the store
        if cursor.row(_MODULE, key_id=key.id, sha256=sha256) is not None:
            return False
        cursor.run(
            _INSERT_MODULE, key_id=key.id, sha256=sha256, module=module, created_at=time.time()
        )
        return True

    def _remember_module(self, key_id: str, module: tuple[str, bytes] | None) -> None:
        if module is None or len(module[1]) > MODULE_CACHE // 4:
            return
        with self._modules_lock:
            entry = (key_id, module[0])
            if entry in self._modules:
                self._modules.move_to_end(entry)
                return
            self._modules[entry] = module[1]
            self._modules_size += len(module[1])
            while self._modules_size > MODULE_CACHE:
                _, dropped = self._modules.popitem(last=False)
                self._modules_size -= len(dropped)

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
        with self._read() as connection:
            rows = connection.execute(
                sa.select(deliveries)
                .where(deliveries.c.task_id == task_id)
                .order_by(deliveries.c.seq)
            ).all()
        return [dict(row._mapping) for row in rows]

    def task_any(self, task_id: str) -> TaskRow | None:
        """The task ``task_id``, whoever owns it (for the server's own use)."""
        with self._read() as connection:
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
    options = connection.get_execution_options()
    if options.get("reading", False):
        return  # autocommit: each statement reads on its own
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get("immediate", False) else "BEGIN")


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
