"""The PostgreSQL server that tests/postgres.py starts for the tests: it serves SQLAlchemy 2
Core over psycopg 3 (row locks included), listens on loopback only, and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from postgres import (
    SETUP_HINT,
    PostgresServer,
    PostgresUnavailable,
    find_postgres_bin,
    start_postgres,
)


@pytest.fixture
def engine(postgres_server: PostgresServer) -> Iterator[sa.Engine]:
    """An engine on the test database; disposed of (every connection closed) afterwards."""
    engine = sa.create_engine(postgres_server.url)
    try:
        yield engine
    finally:
        engine.dispose()


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel prints them) of TCP sockets listening on
    ``port``, over IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table, encoding="ascii") as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                address, port_hex = fields[1].rsplit(":", 1)
                if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def port_is_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_sqlalchemy_core_and_skip_locked(engine: sa.Engine) -> None:
    metadata = sa.MetaData()
    jobs = sa.Table(
        "jobs_skip_locked",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
    )
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        metadata.create_all(conn)
        conn.execute(jobs.insert(), [{"id": 1, "state": "queued"}, {"id": 2, "state": "queued"}])
    next_job = (
        sa.select(jobs.c.id)
        .where(jobs.c.state == "queued")
        .order_by(jobs.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    try:
        with engine.connect() as first, engine.connect() as second:
            with first.begin():
                assert first.execute(next_job).scalar_one() == 1
                with second.begin():
                    # The first transaction holds row 1: the second skips it, without waiting.
                    assert second.execute(next_job).scalar_one() == 2
                    everything_free = sa.select(jobs.c.id).with_for_update(skip_locked=True)
                    assert second.execute(everything_free).scalars().all() == [2]
            # Row 1 is free again once the first transaction is over.
            with second.begin():
                assert second.execute(next_job).scalar_one() == 1
    finally:
        with engine.begin() as conn:
            metadata.drop_all(conn)


def test_listens_on_loopback_only(postgres_server: PostgresServer, engine: sa.Engine) -> None:
    assert postgres_server.url.startswith("postgresql+psycopg://")
    assert f"@127.0.0.1:{postgres_server.port}/" in postgres_server.url
    # Exactly one listening socket on the port, bound to 127.0.0.1 (0100007F in the kernel's
    # little-endian hex), not to 0.0.0.0 or to any IPv6 address.
    assert listening_addresses(postgres_server.port) == {"0100007F"}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SHOW listen_addresses")).scalar_one() == "127.0.0.1"
        assert str(conn.execute(sa.text("SELECT inet_server_addr()")).scalar_one()) == "127.0.0.1"
        rules = conn.execute(
            sa.text("SELECT type, address FROM pg_hba_file_rules WHERE error IS NULL")
        ).all()
    # Trust is given to the unix socket and to 127.0.0.1 only.
    assert sorted((rule.type, rule.address) for rule in rules) == [
        ("host", "127.0.0.1"),
        ("local", None),
    ]


def test_stop_removes_the_data_and_closes_the_port() -> None:
    try:
        server = start_postgres(Path(tempfile.gettempdir()))
    except PostgresUnavailable as exc:
        if os.environ.get("PARITY_TEST_POSTGRES") == "required":
            pytest.fail(f"PostgreSQL is required here: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    with server:
        assert (server.data_dir / "PG_VERSION").is_file()
        assert port_is_open(server.port)
        engine = sa.create_engine(server.url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == (
                    server.database
                )
        finally:
            engine.dispose()
    assert server.stopped
    assert not server.directory.exists()
    assert not port_is_open(server.port)
    assert listening_addresses(server.port) == set()
    server.stop()  # a second stop does nothing


def test_the_highest_version_is_picked(tmp_path: Path) -> None:
    for version in ("9.6", "15", "16", "17"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        # 17 is incomplete (no createdb): it does not count.
        names = ("initdb", "pg_ctl") if version == "17" else ("initdb", "pg_ctl", "createdb")
        for name in names:
            (bin_dir / name).write_text("#!/bin/sh\n")
            (bin_dir / name).chmod(0o755)
    (tmp_path / "not-a-version" / "bin").mkdir(parents=True)
    assert find_postgres_bin(tmp_path) == tmp_path / "16" / "bin"


def test_missing_binaries_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PostgresUnavailable, match=r"services-setup\.sh") as caught:
        find_postgres_bin(tmp_path)
    assert SETUP_HINT in str(caught.value)
