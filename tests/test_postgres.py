"""PostgreSQL served through Perspective's virtual server: a real server (``_postgres``), the
stock client over every adapter, ``serve --workers 4`` over one database, 1,000 aborted
clients, and the command line's errors.

Not yet here (issue 13): a worker killed mid-query, and the docs/edge.md example.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Any

import anyio
import perspective
import pytest

from perspective_asgi import Settings
from perspective_asgi.cli import main

from ._helpers import SCENARIO_TIMEOUT, START_TIMEOUT, connect, environment, free_port
from ._postgres import ROWS, TABLE, PostgresCluster, postgres_fixture  # noqa: F401
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
    import contextlib

    from ._helpers import command, in_thread, server_process

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
    import time

    from ._helpers import command, in_thread, server_process

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
