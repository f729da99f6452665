"""PostgreSQL served through Perspective's virtual server: a real server (``_postgres``), the
stock client over every adapter, ``serve --workers 4`` over one database, 1,000 aborted
clients, a worker killed in the middle of a query, and the command line's errors.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import perspective
import pytest

from perspective_asgi import Settings
from perspective_asgi.cli import main

from ._helpers import (
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
