"""A real PostgreSQL server for tests, started by the tests themselves on loopback.

``start_postgres(base)`` runs Debian's server binaries (``scripts/services-setup.sh`` installs
them) in a fresh temp dir under ``base``: ``initdb`` makes a throwaway cluster there and
``pg_ctl`` starts it on 127.0.0.1 only, on a free port, with its unix socket in that same temp
dir and trust authentication on loopback. Durability is off (``fsync=off``): the data are
thrown away anyway. ``PostgresServer.stop()`` shuts the server down and removes the temp dir.

PostgreSQL refuses to run as root, so when the tests run as root every server binary runs as
the ``postgres`` user (the Debian package creates it), and the temp dir is handed to that user.

``postgres_server`` is a session-scoped pytest fixture built on it. Like the Redis tests, it
skips when the binaries are missing, unless ``PARITY_TEST_POSTGRES=required`` (set where the
server must be tested for real), where a missing server fails the tests instead.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

#: Where Debian puts each major version's server binaries: /usr/lib/postgresql/15/bin.
POSTGRES_ROOT = Path("/usr/lib/postgresql")
#: The binaries this module runs.
REQUIRED_BINARIES = ("initdb", "pg_ctl", "createdb")
#: The system user that owns the server's files and runs it when we are root.
SYSTEM_USER = "postgres"
#: The database created for the tests.
DATABASE = "parity_test"
#: How the setup fix is named in error messages.
SETUP_HINT = "bash scripts/services-setup.sh"
#: Seconds that starting or stopping the server may take.
TIMEOUT = 60
#: The longest path a unix socket may have on Linux (sun_path is 108 bytes, NUL included).
MAX_SOCKET_PATH = 107


class PostgresError(RuntimeError):
    """The test server could not be started or stopped."""


class PostgresUnavailable(PostgresError):
    """The PostgreSQL server binaries are not installed here."""


def find_postgres_bin(root: Path | None = None) -> Path:
    """The ``bin`` directory of the highest PostgreSQL version installed under ``root``
    (by default ``POSTGRES_ROOT``).

    Versions are compared as numbers (16 beats 9.6). Raises ``PostgresUnavailable``, naming
    the setup script, when no version has all of ``REQUIRED_BINARIES``."""
    root = POSTGRES_ROOT if root is None else root
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for bin_dir in root.glob("*/bin"):
        try:
            version = tuple(int(part) for part in bin_dir.parent.name.split("."))
        except ValueError:
            continue
        if all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED_BINARIES):
            candidates.append((version, bin_dir))
    if not candidates:
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries under {root}/*/bin (need "
            f"{', '.join(REQUIRED_BINARIES)}): run `{SETUP_HINT}` to install them"
        )
    return max(candidates)[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Runner:
    """Runs the server binaries as the user they must run as, with a clean environment."""

    def __init__(self, bin_dir: Path, cwd: Path) -> None:
        self.bin_dir = bin_dir
        self.cwd = cwd
        # No PG* variable of ours (PGHOST, PGDATA, ...) may steer the tools.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        self.env["LC_ALL"] = "C"
        self.account: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.account = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"no `{SYSTEM_USER}` user to run PostgreSQL as (it refuses to run as "
                    f"root): run `{SETUP_HINT}` to install the server, which creates it"
                ) from None
            self.env["HOME"] = str(cwd)
            self.env["USER"] = self.env["LOGNAME"] = SYSTEM_USER

    @property
    def user(self) -> str:
        """The name of the database superuser: initdb names it after the user running it."""
        return self.account.pw_name if self.account else pwd.getpwuid(os.geteuid()).pw_name

    def chown(self, path: Path) -> None:
        """Hand ``path`` to the user the server runs as (a no-op when we are not root)."""
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def can_enter(self, directory: Path) -> bool:
        """Whether the server's user may reach ``directory`` (search rights on its every
        ancestor; ACLs are not considered)."""
        if self.account is None:
            return True
        uid, gid = self.account.pw_uid, self.account.pw_gid
        for path in (directory, *directory.parents):
            info = path.stat()
            if info.st_uid == uid:
                bit = stat.S_IXUSR
            elif info.st_gid == gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return False
        return True

    def run(self, tool: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``tool`` from the bin dir with ``args``; its output is captured, not checked."""
        extra: dict[str, Any] = {}
        if self.account is not None:
            extra = {
                "user": self.account.pw_uid,
                "group": self.account.pw_gid,
                "extra_groups": [],
            }
        return subprocess.run(
            [str(self.bin_dir / tool), *args],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT + 30,
            check=False,
            **extra,
        )

    def check(self, tool: str, args: Sequence[str], log: Path | None = None) -> None:
        """Run ``tool`` and raise ``PostgresError`` with its output (and the server log's
        tail) when it fails."""
        done = self.run(tool, args)
        if done.returncode != 0:
            detail = (done.stdout + done.stderr).strip()
            if log is not None and log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-20:]
                detail += "\nserver log:\n" + "\n".join(tail)
            raise PostgresError(f"{tool} failed (exit {done.returncode}):\n{detail}")


class PostgresServer:
    """A running throwaway PostgreSQL server; ``stop()`` (or leaving a ``with`` block) shuts
    it down and removes its files.

    ``url`` is an SQLAlchemy URL for psycopg 3: ``postgresql+psycopg://USER@127.0.0.1:PORT/DB``.
    """

    def __init__(self, runner: _Runner, directory: Path, port: int) -> None:
        self._runner = runner
        #: The temp dir that holds everything of this server (removed by ``stop()``).
        self.directory = directory
        #: The cluster's data directory.
        self.data_dir = directory / "data"
        #: The directory of the server's unix socket.
        self.socket_dir = directory
        #: The server's log file.
        self.log_file = directory / "server.log"
        self.host = "127.0.0.1"
        self.port = port
        self.user = runner.user
        self.database = DATABASE
        self.url = f"postgresql+psycopg://{self.user}@{self.host}:{port}/{self.database}"
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<PostgresServer {self.url} ({state})>"

    @property
    def stopped(self) -> bool:
        """Whether ``stop()`` has been called."""
        return self._stopped

    def stop(self) -> None:
        """Shut the server down (``pg_ctl stop -m fast``) and remove its temp dir.

        If a fast shutdown fails, an immediate one is tried before the files are removed, and
        an error is raised when the server may still be running. Calling it again does
        nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if (self.data_dir / "postmaster.pid").exists():
                for mode in ("fast", "immediate"):
                    args = ["stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(TIMEOUT)]
                    done = self._runner.run("pg_ctl", args)
                    if done.returncode == 0 or not (self.data_dir / "postmaster.pid").exists():
                        break
                else:
                    raise PostgresError(
                        f"pg_ctl could not stop the server in {self.data_dir}:\n"
                        f"{(done.stdout + done.stderr).strip()}"
                    )
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_postgres(base: Path, *, bin_dir: Path | None = None) -> PostgresServer:
    """Start a throwaway PostgreSQL server in a fresh temp dir under ``base``.

    The server listens on 127.0.0.1 only, on a free port, with its unix socket in the temp
    dir, trusts every connection from loopback, runs with ``fsync=off`` and
    ``max_connections=100``, and has an empty database ``DATABASE`` for the tests. As root,
    ``base`` must be a directory the ``postgres`` user can enter (pytest's own temp dirs are
    private to root; the system temp dir will do).

    Raises ``PostgresUnavailable`` when the binaries are missing and ``PostgresError`` when the
    server does not come up; a server started half way is stopped and its files removed."""
    bin_dir = find_postgres_bin() if bin_dir is None else bin_dir
    base = base.resolve()
    directory = Path(tempfile.mkdtemp(prefix="postgres-", dir=base))
    try:
        runner = _Runner(bin_dir, directory)
        if not runner.can_enter(base):
            raise PostgresError(
                f"the `{SYSTEM_USER}` user cannot enter {base}: start the server under a "
                f"directory it can reach, such as {tempfile.gettempdir()}"
            )
        runner.chown(directory)
        server = PostgresServer(runner, directory, free_port())
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        _initialise(runner, server)
        runner.check(
            "pg_ctl",
            [
                "start",
                "-D",
                str(server.data_dir),
                "-l",
                str(server.log_file),
                "-w",
                "-t",
                str(TIMEOUT),
            ],
            log=server.log_file,
        )
        runner.check(
            "createdb",
            ["-h", str(server.socket_dir), "-p", str(server.port), "-U", server.user, DATABASE],
        )
    except BaseException:
        server.stop()
        raise
    return server


def _initialise(runner: _Runner, server: PostgresServer) -> None:
    """Make the cluster with ``initdb`` and write its settings and its access rules."""
    socket_path = server.socket_dir / f".s.PGSQL.{server.port}"
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise PostgresError(f"the server's socket path is too long for Linux: {socket_path}")
    runner.check(
        "initdb",
        [
            *("-D", str(server.data_dir), "-U", server.user, "-E", "UTF8", "--locale=C"),
            *("--auth=trust", "--no-sync", "--no-instructions"),
        ],
    )
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(server.port),
        "unix_socket_directories": f"'{server.socket_dir}'",
        "max_connections": "100",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    # The server itself writes these files back as its own user; root appends and replaces
    # them here, which keeps their owner.
    with (server.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write("\n# Set by tests/postgres.py\n")
        conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
    (server.data_dir / "pg_hba.conf").write_text(
        "# Set by tests/postgres.py: trust the unix socket and loopback, nothing else.\n"
        "local all all trust\n"
        "host all all 127.0.0.1/32 trust\n",
        encoding="utf-8",
    )


def _postgres_required() -> bool:
    """``PARITY_TEST_POSTGRES=required`` makes a missing server a failure, not a skip."""
    return os.environ.get("PARITY_TEST_POSTGRES") == "required"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the whole test session (``.url`` for
    SQLAlchemy). Skips where the server is not installed, unless it is required."""
    try:
        server = start_postgres(Path(tempfile.gettempdir()))
    except PostgresUnavailable as exc:
        if _postgres_required():
            pytest.fail(f"PostgreSQL is required here: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    with server:
        yield server


def empty_database(url: str) -> None:
    """Drop everything in the database at ``url`` (its ``public`` schema), for the next test
    that uses the session's server."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()
