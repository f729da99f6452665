"""PostgreSQL served through Perspective's virtual server: a real server (``_postgres``), the
stock client over every adapter, ``serve --workers 4`` over one database, 1,000 aborted
clients, a worker killed in the middle of a query, the command line's errors,
``examples/postgres_app.py`` under two uvicorn workers, and
group-by against the database's own ``GROUP BY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import perspective
import pytest

from perspective_asgi import Settings, postgres_server
from perspective_asgi.cli import main

from ._helpers import (
    ROOT,
    SCENARIO_TIMEOUT,
    START_TIMEOUT,
    WAIT,
    Connection,
    command,
    connect,
    environment,
    free_port,
    in_thread,
    server_process,
)
from ._postgres import (  # noqa: F401
    CLIENT_CHECK,
    READER,
    ROWS,
    TABLE,
    Backend,
    PostgresCluster,
    postgres_fixture,
)
from ._servers import ADAPTERS, serve_in_thread

pytestmark = pytest.mark.anyio

HAS_VIRTUAL_SERVER = importlib.util.find_spec("perspective.virtual_servers.postgres") is not None
needs_virtual_server = pytest.mark.skipif(
    not HAS_VIRTUAL_SERVER,
    reason=f"perspective-python {perspective.__version__} ships no PostgreSQL virtual server",
)


def run_cli(*code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "\n".join(code)], env=environment(),
                          capture_output=True, text=True, timeout=START_TIMEOUT)


def test_missing_support_is_one_error_line_and_status_2() -> None:
    url = f"postgresql://reader:s3cret@127.0.0.1:{free_port()}/plant"
    block = "" if not HAS_VIRTUAL_SERVER else (
        "sys.modules['perspective.virtual_servers.postgres'] = None"
    )
    result = run_cli("import sys", block, "from perspective_asgi.cli import main",
                     f"sys.exit(main(['serve', {url!r}]))")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "ships no PostgreSQL virtual server" in result.stderr
    assert "s3cret" not in result.stderr


@needs_virtual_server
def test_missing_psycopg_and_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgres://reader:s3cret@127.0.0.1:{free_port()}/plant"
    result = run_cli("import sys", "sys.modules['psycopg'] = None",
                     "from perspective_asgi.cli import main", f"sys.exit(main(['serve', {url!r}]))")
    assert result.returncode == 2, result.stderr
    assert "needs psycopg" in result.stderr and "s3cret" not in result.stderr
    pytest.importorskip("psycopg")
    assert main(["serve", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect" in err and "s3cret" not in err
    assert main(["serve", url, "x.csv"]) == 2
    assert "must be the only source" in capsys.readouterr().err


@needs_virtual_server
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
async def test_stock_client_reads_the_rows(adapter: str, postgres: PostgresCluster) -> None:
    from perspective_asgi._loaders import POSTGRES_SESSION_THREADS, open_postgres

    settings = Settings(read_only=True, virtual_server_threads=POSTGRES_SESSION_THREADS)
    with serve_in_thread(ADAPTERS[adapter](open_postgres(postgres.url()), settings)) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(url) as conn:
                assert await conn.client.get_hosted_table_names() == [TABLE]
                table = await conn.client.open_table(TABLE)
                assert await table.schema() == {
                    "id": "integer", "name": "string", "value": "float"
                }
                assert await table.size() == 3
                view = await table.view(columns=list(ROWS), sort=[["id", "asc"]])
                assert await view.to_columns() == postgres.columns() == ROWS
                assert len(postgres.temporary_relations()) == 1  # the view, in pg_temp
                await view.delete()
    # Every session's connection is closed with it, and its views with the connection.
    postgres.wait_until("no sessions left", lambda: not postgres.sessions(), 5)
    assert postgres.temporary_relations() == []


@needs_virtual_server
async def test_four_workers_serve_one_database(postgres: PostgresCluster, tmp_path: Any) -> None:
    port = free_port()
    args = command("serve", postgres.url(), "--workers", "4", "--port", str(port))
    async with server_process(args, tmp_path, port=port) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with contextlib.AsyncExitStack() as stack:
                views: list[Any] = []
                workers: set[str] = set()
                while len(workers) < 4:
                    assert len(views) < 120, f"only workers {workers} answered"
                    conn = await stack.enter_async_context(connect(server.url))
                    table = await conn.client.open_table(TABLE)
                    view = await table.view(columns=list(ROWS), sort=[["id", "asc"]])
                    assert await view.to_columns() == ROWS
                    views.append(view)
                    workers = {name for name, _, _ in postgres.sessions()}
                postgres.execute(f"INSERT INTO {TABLE} VALUES (4, 'delta', 4.5)")
                try:
                    for view in views:
                        assert (await view.to_columns())["id"] == [1, 2, 3, 4]
                finally:
                    postgres.execute(f"DELETE FROM {TABLE} WHERE id = 4")
        await in_thread(server.stop)
    assert "Traceback" not in server.stderr


@needs_virtual_server
async def test_aborted_clients_leave_nothing_in_the_database(
    postgres: PostgresCluster, tmp_path: Any
) -> None:
    port = free_port()
    args = command("serve", postgres.url(), "--workers", "4", "--port", str(port))
    async with server_process(args, tmp_path, port=port) as server:
        limit = anyio.Semaphore(32)
        views_seen = 0

        async def cycle() -> None:
            nonlocal views_seen
            async with limit, connect(server.url) as conn:
                table = await conn.client.open_table(TABLE)
                await table.view(columns=list(ROWS))
                views_seen += 1
                conn.ws.transport.abort()  # gone without a word: no view.delete(), no close

        start = time.monotonic()
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with anyio.create_task_group() as tasks:
                for _ in range(1000):
                    tasks.start_soon(cycle)
        elapsed = time.monotonic() - start
        assert views_seen == 1000
        waited = await in_thread(postgres.wait_until, "every session closed",
                                 lambda: not postgres.sessions(), 10)
        assert postgres.temporary_relations() == []
        assert postgres.foreign_locks() == []
        print(f"1000 cycles in {elapsed:.1f} s; sessions gone {waited:.2f} s later")
        await in_thread(server.stop)
    assert "Traceback" not in server.stderr


def parent_pid(pid: int) -> int:
    """The parent of process ``pid``, from ``/proc`` (field 4 of ``stat``, after the name)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


@dataclass
class WorkerClient:
    """A client of one ``serve --workers`` process, with a table open through it."""

    conn: Connection
    table: Any
    #: The database backend of the client's session.
    backend: Backend


async def a_client_of_each_worker(
    stack: contextlib.AsyncExitStack[Any], url: str, table: str, postgres: PostgresCluster,
    workers: int,
) -> dict[int, WorkerClient]:
    """Connect until ``workers`` processes each serve one client; by worker pid. Extra clients
    stay connected until ``stack`` closes, so that the balancer moves on."""
    clients: dict[int, WorkerClient] = {}
    for _ in range(30 * workers):
        known = {backend.pid for backend in postgres.backends()}
        conn = await stack.enter_async_context(connect(url))
        opened = await conn.client.open_table(table)  # the session's first request connects it
        (backend,) = [found for found in postgres.backends() if found.pid not in known]
        assert backend.worker_pid is not None, backend
        clients.setdefault(backend.worker_pid, WorkerClient(conn, opened, backend))
        if len(clients) == workers:
            return clients
    pytest.fail(f"only workers {sorted(clients)} took a client")


#: Seconds the database may take to drop the backend of a client that vanished mid-query: the
#: role's client_connection_check_interval (``CLIENT_CHECK``, 250 ms), plus a margin.
DROP_BOUND = 2.0
#: Seconds the killed query would sleep if nothing noticed its client had gone: far beyond
#: ``DROP_BOUND``, so a backend that runs it to its end fails the test.
KILLED_QUERY_SLEEP = 60.0


async def read_columns(table: Any) -> dict[str, list[Any]]:
    """The table's rows by a view made for the purpose, deleted after."""
    view = await table.view(columns=list(ROWS), sort=[["id", "asc"]])
    columns: dict[str, list[Any]] = await view.to_columns()
    await view.delete()
    return columns


@needs_virtual_server
async def test_a_worker_killed_mid_query_leaves_nothing_behind(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    # Without it the killed worker's backend would run its query to the end; the role sets it.
    assert postgres.reader_setting("client_connection_check_interval") == CLIENT_CHECK
    port = free_port()
    args = command("serve", postgres.url(), "--workers", "2", "--port", str(port))
    with postgres.slow_readings() as slow:
        async with server_process(args, tmp_path, port=port) as server:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                async with contextlib.AsyncExitStack() as stack:
                    clients = await a_client_of_each_worker(stack, server.url, slow.name,
                                                            postgres, workers=2)
                    (doomed, victim), (_, survivor) = clients.items()
                    assert parent_pid(doomed) == server.popen.pid  # a worker of ours
                    pid = victim.backend.pid

                    def sleeping() -> bool:
                        backend = postgres.backend(pid)
                        return backend is not None and backend.wait_event == "PgSleep"

                    view = await victim.table.view(columns=list(ROWS), sort=[["id", "asc"]])
                    assert len(postgres.temporary_relations()) == 1
                    slow.pause(KILLED_QUERY_SLEEP)
                    reading = asyncio.ensure_future(view.to_columns())
                    await in_thread(postgres.wait_until, "the doomed worker's query sleeps",
                                    sleeping, WAIT)
                    assert any(lock[0] == pid for lock in postgres.foreign_locks())
                    os.kill(doomed, signal.SIGKILL)
                    dropped = await in_thread(postgres.wait_until, "its backend gone",
                                              lambda: postgres.backend(pid) is None, DROP_BOUND)
                    slow.pause(0)
                    # Its temporary view went with its backend, and so did its locks; the
                    # survivor's session, idle, holds none.
                    assert postgres.temporary_relations() == []
                    assert postgres.foreign_locks() == []
                    with anyio.fail_after(WAIT):
                        await victim.conn.ws.wait_closed()
                    reading.cancel()

                    # The other worker serves the same table, views and all, and so does
                    # whichever worker takes a new client.
                    assert await survivor.table.size() == 3
                    assert await read_columns(survivor.table) == ROWS
                    async with connect(server.url) as conn:
                        assert await read_columns(await conn.client.open_table(slow.name)) == ROWS
            print(f"the killed worker's backend was gone {dropped:.2f} s after SIGKILL")
            await in_thread(server.stop)
    assert "Traceback" not in server.stderr


# examples/postgres_app.py (docs/how-to/virtual-servers.md includes it; tests/test_docs.py) -------

EXAMPLE = ROOT / "examples" / "postgres_app.py"


@needs_virtual_server
async def test_example_under_two_uvicorn_workers_reads_the_database(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "examples.postgres_app:app", "--port", str(port),
            "--workers", "2"]
    env = environment(DATABASE_URL=postgres.url())
    async with server_process(args, tmp_path, port=port, env=env) as server:
        # uvicorn listens before its workers have imported the app, and each worker's import
        # checks the database on an unnamed connection: wait for both, so that no such check
        # is taken for a client's backend below.
        await in_thread(postgres.wait_until, "both workers started",
                        lambda: server.stderr.count("Application startup complete") == 2,
                        START_TIMEOUT)
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with contextlib.AsyncExitStack() as stack:
                clients = await a_client_of_each_worker(stack, server.url, TABLE, postgres,
                                                        workers=2)
                for worker, client in clients.items():
                    assert parent_pid(worker) == server.popen.pid
                    assert await client.conn.client.get_hosted_table_names() == [TABLE]
                    assert await read_columns(client.table) == postgres.columns() == ROWS
                postgres.execute(f"INSERT INTO {TABLE} VALUES (4, 'delta', 4.5)")
                try:
                    # No worker keeps rows: each one's next query reads the new row.
                    for client in clients.values():
                        columns = await read_columns(client.table)
                        assert columns == postgres.columns()
                        assert columns["id"] == [1, 2, 3, 4]
                finally:
                    postgres.execute(f"DELETE FROM {TABLE} WHERE id = 4")
        await in_thread(server.stop_cleanly)


def run_example(*code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the example as ``python examples/postgres_app.py`` would, after ``code``."""
    run = f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", "\n".join(["import runpy, sys", *code, run])],
                          env=environment(**env), capture_output=True, text=True,
                          timeout=START_TIMEOUT)


def test_example_without_support_or_url_is_one_error_line() -> None:
    # 3 is uvicorn's status for a failed start: its --workers supervisor stops on it, where
    # it would restart a worker that exits otherwise, forever.
    url = f"postgresql://reader:s3cret@127.0.0.1:{free_port()}/plant"
    block = "sys.modules['perspective.virtual_servers.postgres'] = None"
    result = run_example(block if HAS_VIRTUAL_SERVER else "", DATABASE_URL=url)
    assert (result.returncode, result.stdout) == (3, ""), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "ships no PostgreSQL virtual server" in result.stderr
    assert "s3cret" not in result.stderr
    result = run_example(DATABASE_URL="")
    assert (result.returncode, result.stderr) == (3, (
        "postgres_app: set DATABASE_URL to the database's URL, "
        "e.g. postgresql://reader@127.0.0.1/plant\n"
    ))


# Group-by, against the database's own GROUP BY ------------------------------------------------

ORDERS = "public.orders"
#: (region, units, price): regions of several rows, nulls in a group and a group of nulls.
ORDER_ROWS = [
    ("North", 3, 9.5), ("North", 5, 2.25), ("North", None, 0.125),
    ("South", 2, None), ("South", 7, 1.0),
    ("East", None, None),
]
SUMS = {"units": "sum", "price": "sum"}


@contextlib.contextmanager
def orders_table(postgres: PostgresCluster) -> Iterator[None]:
    """Create ``ORDERS`` (readable by the reader) from ``ORDER_ROWS``; drop it after."""
    with postgres.connect() as connection:
        connection.execute(f"CREATE TABLE {ORDERS} (region text NOT NULL, units integer, "
                           "price double precision)")
        with connection.cursor() as cursor:
            cursor.executemany(f"INSERT INTO {ORDERS} VALUES (%s, %s, %s)", ORDER_ROWS)
        connection.execute(f"GRANT SELECT ON {ORDERS} TO {READER}")
    try:
        yield
    finally:
        postgres.execute(f"DROP TABLE {ORDERS}")


@needs_virtual_server
async def test_group_by_sums_equal_sql_group_by(postgres: PostgresCluster) -> None:
    server_version = int(postgres.query("SHOW server_version_num")[0][0])
    settings = Settings(read_only=True, virtual_server_threads=8)
    with orders_table(postgres), serve_in_thread(
        ADAPTERS["starlette"](postgres_server(postgres.url()), settings)
    ) as url:
        groups = postgres.query(f"SELECT region, sum(units), sum(price) FROM {ORDERS} "
                                "GROUP BY region ORDER BY region")
        (total,) = postgres.query(f"SELECT sum(units), sum(price) FROM {ORDERS}")
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(url) as conn:
                table = await conn.client.open_table(ORDERS)

                # Rollup, the viewer's default: the total first, then each group by region.
                view = await table.view(group_by=["region"], columns=list(SUMS),
                                        aggregates=SUMS)
                columns = await view.to_columns()
                assert columns == {
                    "__ROW_PATH__": [[], *([region] for region, _, _ in groups)],
                    "units": [total[0], *(units for _, units, _ in groups)],
                    "price": [total[1], *(price for _, _, price in groups)],
                }
                assert columns["units"][1:] == [None, 8, 9]  # East's units are all null
                await view.delete()

                flat = await table.view(group_by=["region"], columns=list(SUMS),
                                        aggregates=SUMS, group_rollup_mode="flat")
                assert await flat.to_columns() == {
                    "__ROW_PATH__": [[region] for region, _, _ in groups],
                    "units": [units for _, units, _ in groups],
                    "price": [price for _, _, price in groups],
                }
                await flat.delete()

                # A column without an aggregate gets the SQL builder's fallback, any_value,
                # which PostgreSQL has only from 16: on 15 (Debian 12) the view is refused,
                # so a viewer grouping a PostgreSQL 15 table must name each column's aggregate.
                if server_version < 160000:
                    with pytest.raises(perspective.PerspectiveError,
                                       match=r"function any_value\(integer\) does not exist"):
                        await table.view(group_by=["region"], columns=["units"])
                else:
                    fallback = await table.view(group_by=["region"], columns=["units"])
                    assert (await fallback.to_columns())["__ROW_PATH__"][1:] == [
                        [region] for region, _, _ in groups
                    ]
                    await fallback.delete()

                # "total" (the grand total alone) is refused on every version: the SQL builder
                # orders by a row path column that its query, grouped by nothing, lacks.
                with pytest.raises(perspective.PerspectiveError,
                                   match='column "__ROW_PATH_0__" does not exist'):
                    await table.view(group_by=["region"], columns=list(SUMS),
                                     aggregates=SUMS, group_rollup_mode="total")

                # Refusals leave the session serving.
                assert await table.size() == len(ORDER_ROWS)
