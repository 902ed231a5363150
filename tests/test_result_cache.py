"""The result cache, on SQLite and on a real Redis server: hits, misses, damage, concurrency."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import WasmFixtures
from parity_sandbox import Config, Result, Status, Task, WasmExecutor
from parity_sandbox._cache import RedisCache, ResultCache, SqliteCache
from test_cli import run_cli


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on loopback, started for these tests only."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("PARITY_TEST_REDIS") == "required":
            pytest.fail("redis-server is required here (scripts/services-setup.sh installs it)")
        pytest.skip("no redis-server")
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(params=["sqlite", "redis"])
def cache_config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    settings: dict[str, object] = {"path": tmp_path / "results.sqlite3"}
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        RedisCache(url, 60, 1 << 30).clear()
        settings = {"backend": "redis", "redis_url": url}
    return Config(cache_dir=tmp_path / "modules", timeout="10s", cache=settings)


def test_a_hit_is_the_same_result_and_nothing_runs(
    cache_config: Config, wasm: WasmFixtures
) -> None:
    task = Task(wasm_file=wasm.determinism, deterministic=True, id="first")
    with WasmExecutor(cache_config) as executor:
        first = executor.execute(task)
        assert not first.cached and first.spec_hash == executor.spec_hash(task)

        def must_not_run(*_: object) -> Result:
            raise AssertionError("the task ran although its result was cached")

        executor._run = must_not_run  # type: ignore[method-assign,assignment]
        hit = executor.execute(task.model_copy(update={"id": "second"}))
    assert hit.cached and hit.task_id == "second"
    assert hit.model_copy(update={"cached": False, "task_id": "first"}) == first
    assert hit.result_hash == first.result_hash


def test_only_deterministic_or_cacheable_normal_ends_are_kept(
    cache_config: Config, wasm: WasmFixtures
) -> None:
    with WasmExecutor(cache_config) as executor:
        assert executor.cache is not None
        executor.execute(Task(wasm_file=wasm.hello))
        assert executor.cache.stats().entries == 0
        executor.execute(Task(wasm_file=wasm.hello, cacheable=True))
        assert executor.cache.stats().entries == 1
        with pytest.raises(Exception, match="fuel"):
            executor.execute(Task(wasm_file=wasm.loop, deterministic=True, limits={"fuel": 1000}))
        assert executor.cache.stats().entries == 1
        assert executor.execute(Task(wasm_file=wasm.hello, cacheable=True)).cached


def test_map_uses_the_cache(cache_config: Config, wasm: WasmFixtures) -> None:
    tasks = [Task(wasm_file=wasm.args, args=(str(i % 3),), cacheable=True) for i in range(9)]
    with WasmExecutor(cache_config) as executor:
        first = list(executor.map(tasks[:3]))
        again = list(executor.map(tasks))
    assert not any(r.cached for r in first)
    assert all(r.cached for r in again)
    assert [r.stdout for r in again] == [first[i % 3].stdout for i in range(9)]


def test_a_damaged_entry_is_a_miss(cache_config: Config, wasm: WasmFixtures) -> None:
    task = Task(wasm_file=wasm.hello, cacheable=True)
    with WasmExecutor(cache_config) as executor:
        first = executor.execute(task)
        assert first.spec_hash is not None
        cache = executor.cache
        assert cache is not None
        entry = cache._load(first.spec_hash)
        assert entry is not None
        damaged = entry[: len(entry) // 2]
        if isinstance(cache, SqliteCache):
            with sqlite3.connect(cache.path) as db:
                db.execute("UPDATE results SET data = ?", (damaged,))
        else:
            assert isinstance(cache, RedisCache)
            cache._client.set(cache._key(first.spec_hash), damaged)
        with pytest.warns(RuntimeWarning, match="ignoring the entry"):
            again = executor.execute(task)
        assert not again.cached and again.result_hash == first.result_hash


def test_a_corrupt_sqlite_file_is_a_miss_with_a_warning(tmp_path: Path, wasm: WasmFixtures) -> None:
    path = tmp_path / "results.sqlite3"
    config = Config(cache_dir=tmp_path, cache={"path": path})
    task = Task(wasm_file=wasm.hello, cacheable=True)
    with WasmExecutor(config) as executor:
        first = executor.execute(task)
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with WasmExecutor(config) as executor:
        with pytest.warns(RuntimeWarning, match="damaged"):
            again = executor.execute(task)
        assert not again.cached and again.result_hash == first.result_hash
        assert executor.execute(task).cached  # a fresh file took the new entry
    assert list(tmp_path.glob("results.sqlite3.corrupt-*"))


WRITER = """
import sys
from parity_sandbox import Result, Status
from parity_sandbox._cache import RedisCache, SqliteCache
where, name = sys.argv[1], sys.argv[2]
cache = RedisCache(where, 60, 1 << 30) if where.startswith("redis") else SqliteCache(
    __import__("pathlib").Path(where), 60, 1 << 30)
for i in range(150):
    cache.put("k" * 64, Result(status=Status.SUCCEEDED, exit_code=0, stdout=(name * 5000).encode()))
cache.close()
"""


def test_two_processes_writing_one_key_leave_one_whole_entry(cache_config: Config) -> None:
    settings = cache_config.cache
    where = settings.redis_url if settings.backend == "redis" else str(settings.path)
    assert where is not None
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, where, name]) for name in ("a", "b")]
    assert [w.wait(120) for w in writers] == [0, 0]
    cache: ResultCache = (
        RedisCache(where, 60, 1 << 30)
        if settings.backend == "redis"
        else SqliteCache(Path(where), 60, 1 << 30)
    )
    try:
        assert cache.stats().entries == 1
        result = cache.get("k" * 64)
        assert result is not None and result.stdout in (b"a" * 5000, b"b" * 5000)
    finally:
        cache.close()


def test_ttl_and_size_bound(cache_config: Config) -> None:
    settings = cache_config.cache
    make = (
        (lambda ttl, size: RedisCache(settings.redis_url or "", ttl, size))
        if settings.backend == "redis"
        else (lambda ttl, size: SqliteCache(settings.path or Path(), ttl, size))
    )
    result = Result(status=Status.SUCCEEDED, exit_code=0, stdout=b"x" * 1000)
    short = make(0.3, 1 << 30)
    short.put("a" * 64, result)
    assert short.get("a" * 64) is not None
    time.sleep(0.5)
    assert short.get("a" * 64) is None
    short.clear()
    bounded = make(60, 5000)
    for n in range(10):
        bounded.put(f"{n:064d}", result)
    stats = bounded.stats()
    assert stats.bytes <= 5000 and 0 < stats.entries < 10
    assert bounded.get(f"{9:064d}") is not None and bounded.get(f"{0:064d}") is None
    bounded.close()


def test_cli_cache_stats_and_clear(wasm: WasmFixtures, tmp_path: Path) -> None:
    env = {"PARITY_SANDBOX_CACHE_PATH": str(tmp_path / "c.sqlite3")}
    done = run_cli("run", "--deterministic", str(wasm.hello), env=env, cache=tmp_path)
    assert done.returncode == 0
    done = run_cli("cache", "stats", env=env, cache=tmp_path)
    assert done.returncode == 0 and b"entries: 1" in done.stdout
    done = run_cli("cache", "clear", env=env, cache=tmp_path)
    assert done.returncode == 0 and b"removed 1" in done.stdout
    done = run_cli("cache", "stats", env=env, cache=tmp_path)
    assert b"entries: 0" in done.stdout
