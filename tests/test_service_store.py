"""The service's store on SQLite and on a real PostgreSQL server: the queue hands each task to
exactly one server, ends it once, and gives back what a dead server held."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("alembic")

from parity_sandbox.service.store import Conflict, Key, QuotaExceeded, Store
from postgres import PostgresServer, empty_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.sqlite3'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.url
    made = Store(url)
    made.migrate()
    made.migrate()  # a second time changes nothing
    try:
        yield made
    finally:
        made.close()
        if not made.sqlite:  # the session's database: leave it empty for the next test
            empty_database(url)


def key_of(store: Store, name: str, **extra: object) -> Key:
    key = store.authenticate(store.create_key(name, **extra))  # type: ignore[arg-type]
    assert key is not None
    return key


def add(store: Store, key: Key, n: int, idempotency_key: str | None = None) -> str:
    row, _ = store.add_task(
        key,
        runtime="wasm",
        task=b'{"n": %d}' % n,
        callback_url=None,
        idempotency_key=idempotency_key,
        body_sha256=str(n),
        max_active=10_000,
        max_queued=10_000,
    )
    return row.id


def test_each_task_is_claimed_by_exactly_one_server(store: Store) -> None:
    key = key_of(store, "alice")
    ids = [add(store, key, n) for n in range(200)]
    taken: dict[str, list[str]] = {}
    lock = threading.Lock()

    def server(owner: str) -> None:
        while rows := store.claim(owner, 7):
            with lock:
                taken.setdefault(owner, []).extend(row.id for row in rows)
            for row in rows:
                assert store.finish(row.id, owner, "succeeded", b"{}")

    threads = [threading.Thread(target=server, args=(f"server-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [task_id for owner in taken.values() for task_id in owner]
    assert sorted(claimed) == sorted(ids)  # every task, once
    assert {row.state for row in store.list_tasks(key, state=None, after=0, limit=1000)} == {
        "succeeded"
    }


def test_a_task_ends_once_and_only_by_its_owner(store: Store) -> None:
    key = key_of(store, "alice")
    task_id = add(store, key, 1)
    (row,) = store.claim("a", 10)
    assert not store.finish(task_id, "b", "failed", b"{}")  # not b's
    assert store.finish(task_id, "a", "succeeded", b"{}")
    assert not store.finish(task_id, "a", "failed", b"{}")  # ended already
    assert store.state(task_id) == "succeeded" and row.attempts == 1


def test_what_a_dead_server_held_is_queued_again_or_lost(store: Store) -> None:
    key = key_of(store, "alice")
    first, second = add(store, key, 1), add(store, key, 2)
    store.claim("dead", 10)
    assert store.recover(retry=True, max_attempts=2) == {"requeued": 0, "lost": 0}  # leased
    assert store.recover(retry=True, max_attempts=2, everyone=True) == {
        "requeued": 2,
        "lost": 0,
    }
    rows = store.claim("dead-again", 10)
    assert [row.attempts for row in rows] == [2, 2]
    # out of attempts: lost, with the reason, and the dead owner cannot end it any more
    assert store.recover(retry=True, max_attempts=2, everyone=True)["lost"] == 2
    assert store.state(first) == store.state(second) == "lost"
    assert not store.finish(first, "dead-again", "succeeded", b"{}")


def test_idempotency_keys_and_quotas(store: Store) -> None:
    alice, bob = key_of(store, "alice"), key_of(store, "bob")
    first = add(store, alice, 1, "k")
    assert add(store, alice, 1, "k") == first
    with pytest.raises(Conflict):
        add(store, alice, 2, "k")
    assert add(store, bob, 1, "k") != first  # another tenant's key space
    with pytest.raises(QuotaExceeded) as info:
        store.add_task(
            alice,
            runtime="wasm",
            task=b"{}",
            callback_url=None,
            idempotency_key=None,
            body_sha256="x",
            max_active=1,
            max_queued=100,
        )
    assert info.value.scope == "key"
    # a tenant sees its own tasks only; an unknown secret or a revoked key authenticates none
    assert store.task(first, bob) is None and store.task(first, alice) is not None
    assert store.authenticate("psk_nothing") is None
    assert store.revoke_key("bob") and not store.revoke_key("bob")
    assert all(key.name != "bob" or key.revoked_at for key in store.list_keys())
