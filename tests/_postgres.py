"""A real PostgreSQL server for the tests: its own cluster in a temporary directory.

The session-scoped fixture ``postgres`` runs ``initdb`` into a fresh directory (as the
unprivileged ``postgres`` user when the tests run as root: initdb refuses root), starts
``postgres`` on a free loopback port with its unix socket in that directory, creates the
database ``plant`` with the table ``readings`` (``ROWS``) and a login role ``reader`` that may
only read it, and stops the server and removes the directory afterwards. A test that needs a
query to take seconds makes one with ``PostgresCluster.slow_readings()``.

Without the server binaries (Debian's ``postgresql`` package) or psycopg it skips, saying which
is missing; under CI (``CI`` set) it fails instead, so CI never skips it (``.ci/run`` installs
the package, the ``test`` extra installs psycopg).

Test modules use it with ``from ._postgres import postgres_fixture  # noqa: F401`` (the fixture
is named ``postgres``) and take ``postgres: PostgresCluster``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from ._helpers import free_port, unavailable

#: The rows of ``plant.public.readings``, by column, in ``id`` order.
ROWS: dict[str, list[Any]] = {
    "id": [1, 2, 3],
    "name": ["alpha", "beta", "gamma"],
    "value": [1.5, 2.5, None],
}
DATABASE = "plant"
TABLE = "public.readings"
#: A role that may connect and read ``readings``, nothing more: what a deployment should give
#: perspective-asgi.
READER = "reader"
SUPERUSER = "postgres"
#: Seconds the server gets to accept connections, and to stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: How often a backend whose client has gone checks for it while it runs a query (the server's
#: default is never: the query runs to its end). Set on the role, as
#: docs/how-to/virtual-servers.md recommends.
CLIENT_CHECK = "250ms"


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory with ``initdb`` and ``postgres``."""
    found = sorted(
        (Path(path).parent for path in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass(frozen=True)
class Backend:
    """One client backend of the database, as ``pg_stat_activity`` shows it."""

    pid: int
    application_name: str
    state: str | None
    #: What it waits on, e.g. ``PgSleep`` inside ``pg_sleep``, ``ClientRead`` when idle.
    wait_event: str | None

    @property
    def worker_pid(self) -> int | None:
        """The perspective-asgi process it serves, from ``perspective-asgi/<pid>``."""
        prefix, _, pid = self.application_name.partition("/")
        return int(pid) if prefix == "perspective-asgi" and pid.isdigit() else None


class SlowReadings:
    """The view ``public.slow_readings``: ``readings`` again, but every query of it first sleeps
    for as long as the one-row table ``public.pause`` says (0 s, until ``pause`` is called).

    The sleep is an uncorrelated subquery, so it runs once per query rather than per row, and
    only when rows are read: describing the view (``LIMIT 0``) stays instant.
    """

    name = "public.slow_readings"

    def __init__(self, cluster: PostgresCluster) -> None:
        self._cluster = cluster

    def pause(self, seconds: float) -> None:
        """Make every query of the view that starts from now on sleep ``seconds`` first."""
        self._cluster.execute("UPDATE public.pause SET seconds = %s", seconds)


class PostgresCluster:
    """A running server: URLs to its database, and psycopg connections as its superuser."""

    def __init__(self, port: int, directory: Path, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.directory = directory
        self.process = process

    def url(self, user: str = READER, database: str = DATABASE, scheme: str = "postgresql") -> str:
        return f"{scheme}://{user}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def connect(self, database: str = DATABASE) -> Iterator[Any]:
        """A psycopg connection as the superuser, in autocommit mode."""
        import psycopg

        with psycopg.connect(self.url(SUPERUSER, database), autocommit=True) as connection:
            yield connection

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run ``sql`` on a fresh superuser connection and return its rows."""
        with self.connect() as connection:
            return list(connection.execute(sql, params or None).fetchall())

    def execute(self, sql: str, *params: Any) -> None:
        with self.connect() as connection:
            connection.execute(sql, params or None)

    def columns(self) -> dict[str, list[Any]]:
        """``readings`` as the database holds it, by column, in ``id`` order."""
        rows = self.query(f"SELECT id, name, value FROM {TABLE} ORDER BY id")
        return {name: [row[i] for row in rows] for i, name in enumerate(ROWS)}

    def sessions(self) -> list[tuple[Any, ...]]:
        """(application_name, state, query) of every client backend of the database but the
        asking one."""
        return self.query(
            "SELECT application_name, state, query FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND datname = %s", DATABASE,
        )

    def backends(self) -> list[Backend]:
        """Every client backend of the database but the asking one."""
        rows = self.query(
            "SELECT pid, application_name, state, wait_event FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND datname = %s", DATABASE,
        )
        return [Backend(*row) for row in rows]

    def backend(self, pid: int) -> Backend | None:
        """The client backend ``pid``, or ``None`` once it has gone."""
        return next((backend for backend in self.backends() if backend.pid == pid), None)

    def reader_setting(self, name: str) -> str:
        """The value of the setting ``name`` in a session of the reader role."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            row = connection.execute("SELECT current_setting(%s)", (name,)).fetchone()
        assert row is not None
        return str(row[0])

    @contextlib.contextmanager
    def slow_readings(self) -> Iterator[SlowReadings]:
        """Create ``public.slow_readings`` (readable by the reader) and drop it after."""
        with self.connect() as connection:
            connection.execute("CREATE TABLE public.pause (seconds double precision NOT NULL)")
            connection.execute("INSERT INTO public.pause VALUES (0)")
            # pg_sleep returns void, which casts to '' (not null): the filter keeps every row.
            connection.execute(
                f"CREATE VIEW {SlowReadings.name} AS SELECT * FROM {TABLE} "
                "WHERE (SELECT pg_sleep(seconds)::text FROM public.pause) IS NOT NULL"
            )
            # A view reads its tables as its owner: the reader needs the view alone.
            connection.execute(f"GRANT SELECT ON {SlowReadings.name} TO {READER}")
        try:
            yield SlowReadings(self)
        finally:
            with self.connect() as connection:
                # A session that a failed test left sleeping would hold the view for minutes.
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usename = %s AND wait_event = 'PgSleep'", (READER,),
                )
                connection.execute(f"DROP VIEW {SlowReadings.name}")
                connection.execute("DROP TABLE public.pause")

    def temporary_relations(self) -> list[str]:
        """Every relation in a temporary schema: Perspective's views, while their session lives."""
        rows = self.query(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname LIKE 'pg_temp%'"
        )
        return [row[0] for row in rows]

    def foreign_locks(self) -> list[tuple[Any, ...]]:
        """Locks held by any backend but the asking one."""
        return self.query(
            "SELECT pid, locktype, relation::regclass::text, mode FROM pg_locks "
            "WHERE pid <> pg_backend_pid()"
        )

    def wait_until(self, what: str, done: Any, timeout: float) -> float:
        """Poll ``done()`` until it is true; return the seconds it took, fail after ``timeout``."""
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > timeout:
                pytest.fail(f"{what}: not so after {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - start


def _unavailable(reason: str) -> NoReturn:
    unavailable(reason, "the PostgreSQL tests")


def _owner() -> str | None:
    """The user to run the server as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        _unavailable("running as root and there is no 'postgres' user to run initdb as")
    return SUPERUSER


def _run(owner: str | None, *args: str) -> None:
    result = subprocess.run(list(args), user=owner, capture_output=True, text=True,
                            timeout=START_TIMEOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{result.stderr}")


def _wait_accepting(cluster: PostgresCluster, log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
            cluster.url(SUPERUSER, "postgres"), connect_timeout=2
        ):
            return
        if cluster.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def _create_database(cluster: PostgresCluster) -> None:
    with cluster.connect("postgres") as connection:
        connection.execute(f"CREATE ROLE {READER} LOGIN")
        connection.execute(f"ALTER ROLE {READER} SET client_connection_check_interval = "
                           f"'{CLIENT_CHECK}'")
        connection.execute(f"CREATE DATABASE {DATABASE}")
    with cluster.connect() as connection:
        connection.execute(f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, name text, "
                           "value double precision)")
        with connection.cursor() as cursor:
            cursor.executemany(f"INSERT INTO {TABLE} VALUES (%s, %s, %s)",
                               list(zip(*ROWS.values(), strict=True)))
        connection.execute(f"GRANT SELECT ON {TABLE} TO {READER}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, then exits
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresCluster]:
    """Yield a fresh server with the ``plant`` database; stop it and delete its files after."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'psycopg[binary]')")
    binaries = server_binaries()
    if binaries is None or not (binaries / "postgres").is_file():
        _unavailable("no PostgreSQL server binaries (apt-get install postgresql)")
    owner = _owner()
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    directory = Path(tempfile.mkdtemp(prefix="perspective-asgi-postgres-"))
    try:
        if owner is not None:
            shutil.chown(directory, owner)
        data = directory / "data"
        _run(owner, str(binaries / "initdb"), "-D", str(data), "-U", SUPERUSER,
             "--auth=trust", "--encoding=UTF8", "--no-instructions")
        port = free_port()
        log = directory / "postgres.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(data), "-p", str(port),
                 "-h", "127.0.0.1", "-k", str(directory), "-c", "max_connections=200",
                 "-c", "fsync=off", "-c", "synchronous_commit=off"],
                user=owner, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        cluster = PostgresCluster(port, directory, process)
        try:
            _wait_accepting(cluster, log)
            _create_database(cluster)
            yield cluster
        finally:
            _stop(process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[PostgresCluster]:
    with running_postgres() as cluster:
        yield cluster
