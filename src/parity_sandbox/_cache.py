"""The result cache: content-addressed by spec hash, for tasks whose output the spec decides.

Only results of deterministic tasks and of tasks marked ``cacheable`` are stored, and only
normal ends (``succeeded`` and ``failed``): a timeout or a crash says more about the machine
than about the task. A cached result is only ever served whole and checked: an entry whose
result does not match its own result hash, or whose key does not match, is a miss with a
warning, never a wrong result.

Backends:

- :class:`SqliteCache` (the default): one file, ``<cache_dir>/results.sqlite3``, in WAL mode
  with a busy timeout, so that several processes can read and write it at once; a write is one
  transaction (``INSERT OR REPLACE``), so two writers of one key leave one whole entry. A file
  that turns out damaged is moved aside (``*.corrupt-<time>``) and started afresh.
- :class:`RedisCache`: a Redis server (``pip install 'parity-sandbox[redis]'``); entries
  expire by Redis TTL, and a sorted set of keys by write time keeps the total under the bound.

An entry is JSON: ``{"v": 1, "spec_hash": ..., "result_hash": ..., "result": <Result JSON>}``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity_sandbox._config import Config
from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable
from parity_sandbox._models import Result, Status

ENTRY_VERSION = 1
#: Statuses worth keeping: the task ended by itself.
CACHEABLE_STATUSES = (Status.SUCCEEDED, Status.FAILED)


@dataclass(frozen=True)
class CacheStats:
    """What a cache holds, and how it has served this process and others (SQLite)."""

    backend: str
    location: str
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int


def encode_entry(spec_hash: str, result: Result) -> bytes:
    """The stored form of ``result`` under ``spec_hash``."""
    document = {
        "v": ENTRY_VERSION,
        "spec_hash": spec_hash,
        "result_hash": result.result_hash,
        "result": json.loads(result.to_json()),
    }
    return json.dumps(document, sort_keys=True).encode()


def decode_entry(spec_hash: str, data: bytes) -> Result:
    """The result stored in ``data`` for ``spec_hash``; raises ``ValueError`` unless it is whole
    and is the entry of that key."""
    try:
        document = json.loads(data)
        if document.get("v") != ENTRY_VERSION or document.get("spec_hash") != spec_hash:
            raise ValueError("an entry of another key or version")
        result = Result.from_json(json.dumps(document["result"]))
    except (InvalidInput, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"a damaged entry ({exc})") from None
    if result.result_hash != document.get("result_hash"):
        raise ValueError("an entry whose result does not match its hash")
    return result


class ResultCache(ABC):
    """A store of results by spec hash. Thread-safe; ``close()`` when done."""

    backend = "none"

    def __init__(self, ttl: float, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        #: Called with ``"entry"`` or ``"file"`` when a damaged one is set aside (the
        #: executor's metrics count them).
        self.on_damage: Callable[[str], None] | None = None

    def get(self, spec_hash: str) -> Result | None:
        """The cached result of ``spec_hash``, marked ``cached``; ``None`` on a miss."""
        data = self._load(spec_hash)
        if data is None:
            return None
        try:
            result = decode_entry(spec_hash, data)
        except ValueError as exc:
            warnings.warn(
                f"result cache: ignoring the entry of {spec_hash[:16]}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            self._discard(spec_hash)
            if self.on_damage is not None:
                self.on_damage("entry")
            return None
        return result.model_copy(update={"cached": True})

    def put(self, spec_hash: str, result: Result) -> None:
        """Store ``result`` (a normal end only) under ``spec_hash``."""
        if result.status not in CACHEABLE_STATUSES or result.cached:
            return
        data = encode_entry(spec_hash, result.model_copy(update={"spec_hash": spec_hash}))
        if len(data) <= self.max_bytes:
            self._store(spec_hash, data)

    @abstractmethod
    def _load(self, spec_hash: str) -> bytes | None: ...

    @abstractmethod
    def _store(self, spec_hash: str, data: bytes) -> None: ...

    @abstractmethod
    def _discard(self, spec_hash: str) -> None: ...

    @abstractmethod
    def stats(self) -> CacheStats: ...

    @abstractmethod
    def clear(self) -> int:
        """Remove every entry; returns how many there were."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class SqliteCache(ResultCache):
    """Entries in one SQLite file (see the module docstring)."""

    backend = "sqlite"

    def __init__(self, path: Path, ttl: float, max_bytes: int) -> None:
        super().__init__(ttl, max_bytes)
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # A cache needs no fsync per write: a crash loses recent entries at worst, and
                # a damaged file is detected and replaced.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS results (spec_hash TEXT PRIMARY KEY, "
                    "data BLOB NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS results_created ON results (created)")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, "
                    "value INTEGER NOT NULL)"
                )
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _guarded(self, what: str, action: Any) -> Any:
        """Run ``action(db)``; a damaged file is moved aside, warned about, and started anew."""
        with self._lock:
            for attempt in range(2):
                try:
                    return action(self._connect())
                except sqlite3.DatabaseError as exc:
                    if attempt or (
                        isinstance(exc, sqlite3.OperationalError)
                        and ("locked" in str(exc) or "busy" in str(exc))
                    ):
                        warnings.warn(
                            f"result cache: cannot {what} ({exc}); going on without it",
                            RuntimeWarning,
                            stacklevel=4,
                        )
                        return None
                    self._reset(exc)
            return None

    def _reset(self, error: Exception) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self.on_damage is not None:
            self.on_damage("file")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            self.path.replace(aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(OSError):
                self.path.with_name(self.path.name + suffix).unlink()
        warnings.warn(
            f"result cache: {self.path} is damaged ({error}); moved it to {aside.name} and "
            "started a new one",
            RuntimeWarning,
            stacklevel=5,
        )

    def _count(self, db: sqlite3.Connection, name: str) -> None:
        db.execute(
            "INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
            (name,),
        )

    def _load(self, spec_hash: str) -> bytes | None:
        def load(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT data, created FROM results WHERE spec_hash = ?", (spec_hash,)
            ).fetchone()
            fresh = row is not None and time.time() - row[1] <= self.ttl
            self._count(db, "hits" if fresh else "misses")
            return bytes(row[0]) if fresh else None

        found: bytes | None = self._guarded("read", load)
        return found

    def _store(self, spec_hash: str, data: bytes) -> None:
        def store(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                    (spec_hash, data, len(data), time.time()),
                )
                db.execute("DELETE FROM results WHERE created < ?", (time.time() - self.ttl,))
                total = db.execute("SELECT COALESCE(SUM(size), 0) FROM results").fetchone()[0]
                if total > self.max_bytes:  # drop the oldest until under the bound
                    db.execute(
                        "DELETE FROM results WHERE spec_hash IN (SELECT spec_hash FROM ("
                        "SELECT spec_hash, SUM(size) OVER (ORDER BY created DESC) AS kept "
                        "FROM results) WHERE kept > ?)",
                        (self.max_bytes,),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        self._guarded("write", store)

    def _discard(self, spec_hash: str) -> None:
        self._guarded(
            "write",
            lambda db: db.execute("DELETE FROM results WHERE spec_hash = ?", (spec_hash,)),
        )

    def stats(self) -> CacheStats:
        def read(db: sqlite3.Connection) -> tuple[int, int, int, int]:
            entries, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM results"
            ).fetchone()
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
            return entries, size, counters.get("hits", 0), counters.get("misses", 0)

        entries, size, hits, misses = self._guarded("read", read) or (0, 0, 0, 0)
        return CacheStats("sqlite", str(self.path), entries, size, self.max_bytes, hits, misses)

    def clear(self) -> int:
        def clear(db: sqlite3.Connection) -> int:
            count: int = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            db.execute("DELETE FROM results")
            db.execute("DELETE FROM counters")
            return count

        return int(self._guarded("clear", clear) or 0)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class RedisCache(ResultCache):
    """Entries in Redis under ``<prefix>:<spec hash>``; see the module docstring."""

    backend = "redis"

    def __init__(
        self, url: str, ttl: float, max_bytes: int, prefix: str = "parity-sandbox"
    ) -> None:
        super().__init__(ttl, max_bytes)
        try:
            import redis
        except ImportError as exc:
            raise RuntimeUnavailable(
                "the Redis result cache needs the redis package: pip install "
                "'parity-sandbox[redis]'"
            ) from exc
        self.url = url
        self._prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)

    def _key(self, spec_hash: str) -> str:
        return f"{self._prefix}:result:{spec_hash}"

    def _call(self, what: str, action: Any) -> Any:
        try:
            return action(self._client)
        except self._errors as exc:
            warnings.warn(
                f"result cache: cannot {what} at {self.url} ({exc}); going on without it",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    def _load(self, spec_hash: str) -> bytes | None:
        def load(client: Any) -> bytes | None:
            # One round trip: the entry, and the counters (which one counts is settled after).
            with client.pipeline(transaction=False) as pipe:
                pipe.get(self._key(spec_hash))
                pipe.incr(f"{self._prefix}:lookups")
                data, _ = pipe.execute()
            if data is None:
                client.incr(f"{self._prefix}:misses")
            return None if data is None else bytes(data)

        found: bytes | None = self._call("read", load)
        return found

    def _store(self, spec_hash: str, data: bytes) -> None:
        index = f"{self._prefix}:index"
        sizes = f"{self._prefix}:sizes"

        def store(client: Any) -> None:
            key = self._key(spec_hash)
            now = time.time()
            with client.pipeline(transaction=True) as pipe:
                pipe.set(key, data, px=max(1, int(self.ttl * 1000)))
                pipe.zadd(index, {key: now})
                pipe.hset(sizes, key, len(data))
                pipe.execute()
            # Over the bound: drop the oldest entries (expired ones first, as they are oldest).
            total = sum(int(v) for v in client.hvals(sizes))
            while total > self.max_bytes:
                oldest = client.zrange(index, 0, 0)
                if not oldest:
                    break
                victim = oldest[0]
                size = int(client.hget(sizes, victim) or 0)
                with client.pipeline(transaction=True) as pipe:
                    pipe.delete(victim)
                    pipe.zrem(index, victim)
                    pipe.hdel(sizes, victim)
                    pipe.execute()
                total -= size

        self._call("write", store)

    def _discard(self, spec_hash: str) -> None:
        key = self._key(spec_hash)
        self._call(
            "write",
            lambda client: (
                client.delete(key)
                + client.zrem(f"{self._prefix}:index", key)
                + client.hdel(f"{self._prefix}:sizes", key)
            ),
        )

    def stats(self) -> CacheStats:
        def read(client: Any) -> tuple[int, int, int, int]:
            live = [k for k in client.zrange(f"{self._prefix}:index", 0, -1) if client.exists(k)]
            sizes = client.hgetall(f"{self._prefix}:sizes")
            size = sum(int(sizes.get(k, 0)) for k in live)
            misses = int(client.get(f"{self._prefix}:misses") or 0)
            hits = int(client.get(f"{self._prefix}:lookups") or 0) - misses
            return len(live), size, hits, misses

        entries, size, hits, misses = self._call("read", read) or (0, 0, 0, 0)
        return CacheStats("redis", self.url, entries, size, self.max_bytes, hits, misses)

    def clear(self) -> int:
        def clear(client: Any) -> int:
            keys = list(client.scan_iter(f"{self._prefix}:*"))
            live = sum(1 for k in keys if b":result:" in k)
            if keys:
                client.delete(*keys)
            return live

        return int(self._call("clear", clear) or 0)

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._client.close()


def open_cache(config: Config) -> ResultCache | None:
    """The result cache ``config`` asks for, or ``None`` when it is disabled."""
    settings = config.cache
    if not settings.enabled:
        return None
    if settings.backend == "redis":
        assert settings.redis_url is not None
        return RedisCache(settings.redis_url, settings.ttl, settings.max_bytes)
    return SqliteCache(config.result_cache_path(), settings.ttl, settings.max_bytes)
