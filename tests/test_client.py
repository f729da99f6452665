"""``perspective_asgi.client`` against every adapter and Perspective's own Tornado handler."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import perspective
import pyarrow as pa
import pytest

from perspective_asgi import HandshakeRequest, Settings
from perspective_asgi.client import (
    ConnectError,
    connect,
    connect_sync,
    open_connection,
    reconnect,
)

from ._helpers import ROOT, SCENARIO_TIMEOUT, free_port
from ._servers import ADAPTERS, ServerMain, serve_in_background, serve_in_thread

pytestmark = pytest.mark.anyio


def reference_tornado_main(server: Any) -> ServerMain:
    """Perspective's own ``PerspectiveTornadoHandler``, from the installed wheel."""

    async def main(sock: socket.socket, stop: asyncio.Event) -> None:
        import tornado.httpserver
        import tornado.web
        from perspective.handlers.tornado import PerspectiveTornadoHandler

        app = tornado.web.Application(
            [(r"/websocket", PerspectiveTornadoHandler, {"perspective_server": server})],
            websocket_max_message_size=256 * 1024 * 1024,
        )
        http = tornado.httpserver.HTTPServer(app, max_buffer_size=256 * 1024 * 1024)
        http.add_sockets([sock])
        await stop.wait()
        http.stop()
        await http.close_all_connections()

    return main


@pytest.fixture
def reference_url(perspective_server: perspective.Server) -> Iterator[str]:
    with serve_in_thread(reference_tornado_main(perspective_server)) as ws_url:
        yield ws_url


def free_port_url() -> str:
    """A loopback URL on which nothing listens."""
    return f"ws://127.0.0.1:{free_port()}/websocket"


async def round_trip(url: str) -> None:
    async with connect(url) as client:
        assert {"demo", "other"} <= set(await client.get_hosted_table_names())
        table = await client.open_table("demo")
        assert await table.size() == 4
        assert (await table.schema())["name"] == "string"
        view = await table.view(columns=["id", "value"], filter=[["value", ">", 2.0]])
        assert (await view.to_columns())["id"] == [2, 3, 4]

        updated = asyncio.Event()
        await view.on_update(lambda *_: updated.set())
        await table.update([{"id": 5, "name": "eps", "group": "x", "value": 5.5}])
        await asyncio.wait_for(updated.wait(), 10)
        assert await view.num_rows() == 4
        await view.delete()


async def test_round_trip(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        await round_trip(url)


async def test_round_trip_with_perspective_reference_handler(reference_url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        await round_trip(reference_url)


async def big_payload(url: str) -> None:
    rows = 200_000
    data = pa.table({
        "id": pa.array(range(rows), pa.int32()),
        "value": pa.array([i * 0.5 for i in range(rows)], pa.float64()),
        "label": pa.array([f"row-{i}" for i in range(rows)]),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write_table(data)
    async with connect(url) as client:
        table = await client.table(sink.getvalue().to_pybytes(), name="big")
        view = await table.view()
        arrow = await view.to_arrow()
        back = pa.ipc.open_stream(arrow).read_all()
        assert back.num_rows == rows
        assert back.column("label")[rows - 1].as_py() == f"row-{rows - 1}"
        assert back.column("value").to_pylist() == data.column("value").to_pylist()
        await view.delete()
        await table.delete()


async def test_big_payload(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        await big_payload(url)


async def test_big_payload_with_perspective_reference_handler(reference_url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        await big_payload(reference_url)


def test_sync_client(perspective_server: perspective.Server) -> None:
    with serve_in_thread(ADAPTERS["asgi-uvicorn"](perspective_server, Settings())) as url, \
            connect_sync(url) as client:
        table = client.open_table("demo")
        assert table.size() == 4
        table.update([{"id": 9, "name": "iota", "group": "y", "value": 9.5}])
        assert table.view().to_columns()["id"] == [1, 2, 3, 4, 9]
    with pytest.raises(perspective.PerspectiveError, match="connection closed with code 1000"):
        table.size()


async def test_connection_refused_is_a_connect_error() -> None:
    url = free_port_url()
    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(ConnectError) as caught:
        await open_connection(url, open_timeout=5)
    assert caught.value.status is None
    assert caught.value.url == url
    assert "connection refused" in str(caught.value)


@pytest.mark.parametrize("settings", [Settings(allowed_origins={"https://dash.example.com"})])
async def test_cross_origin_handshake_is_refused_with_403(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(ConnectError) as caught:
        await open_connection(url, headers={"Origin": "https://evil.example.com"})
    assert caught.value.status == 403
    assert "HTTP 403" in str(caught.value)


async def require_token(request: HandshakeRequest) -> str | None:
    return "alice" if request.headers.get("authorization") == "Bearer good" else None


@pytest.mark.parametrize("settings", [Settings(authenticate=require_token)])
async def test_unauthenticated_handshake_is_refused_with_401(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        with pytest.raises(ConnectError) as caught:
            await open_connection(url, headers={"Authorization": "Bearer bad"})
        assert caught.value.status == 401

        async with connect(url, headers={"Authorization": "Bearer good"}) as client:
            assert await (await client.open_table("demo")).size() == 4


@contextlib.asynccontextmanager
async def killable_server() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests._killable_server", cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
        assert url.startswith("ws://127.0.0.1:"), url
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_server_killed_mid_request_fails_pending_calls_promptly() -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with killable_server() as (process, url):
            connection = await open_connection(url)
            table = await connection.client.open_table("demo")
            view = await table.view()
            updates: list[int] = []
            await view.on_update(lambda port, *_: updates.append(port))
            pending = asyncio.ensure_future(view.to_csv())
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), 10) == b"stalled\n"
            assert not pending.done()

            process.kill()
            started = time.monotonic()
            with pytest.raises(perspective.PerspectiveError, match="connection closed"):
                await asyncio.wait_for(pending, 5)
            assert time.monotonic() - started < 5
            await asyncio.wait_for(connection.wait_closed(), 5)
            assert connection.closed
            assert connection.close_code == 1006
            # Later calls fail in the send callback, at once.
            with pytest.raises(perspective.PerspectiveError, match="connection closed"):
                await asyncio.wait_for(table.size(), 5)
            await connection.close()
            assert updates == []


class TokenService:
    """Hands out bearer tokens; ``valid`` is what the server accepts right now."""

    def __init__(self, issued: list[str]) -> None:
        self.valid = {"old"}
        self._issued = issued
        self.calls = 0
        self.seen: list[str] = []

    def headers(self) -> dict[str, str]:
        token = self._issued[min(self.calls, len(self._issued) - 1)]
        self.calls += 1
        return {"Authorization": f"Bearer {token}"}

    async def authenticate(self, request: HandshakeRequest) -> str | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.seen.append(token)
        return "user" if token in self.valid else None


async def test_reconnect_refreshes_headers_and_reopens_tables(
    perspective_server: perspective.Server,
) -> None:
    # The first token works, then expires while the connection is down; the token service
    # still hands out the stale one once before issuing a new one.
    tokens = TokenService(["old", "old", "new"])
    settings = Settings(authenticate=tokens.authenticate)

    async def scenario(url: str) -> list[int]:
        sizes: list[int] = []
        connections = reconnect(url, headers=tokens.headers, initial_delay=0.01, max_delay=0.05)
        async for conn in connections:
            async with conn:
                table = await conn.client.open_table("demo")
                sizes.append(await table.size())
                if connections.connections == 2:
                    break
                tokens.valid = {"new"}
                pending = asyncio.ensure_future(table.view())
                conn.websocket.transport.abort()  # the network drops
                await pending  # fails; ``async with conn`` swallows it and the loop goes on
        assert conn.closed
        return sizes

    async with serve_in_background(ADAPTERS["starlette"](perspective_server, settings)) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            assert await scenario(url) == [4, 4]
    assert tokens.seen == ["old", "old", "new"]
    assert tokens.calls == 3


async def test_reconnect_gives_up_on_refusals_it_cannot_fix(
    perspective_server: perspective.Server,
) -> None:
    settings = Settings(authenticate=require_token)

    async with serve_in_background(ADAPTERS["aiohttp"](perspective_server, settings)) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(ConnectError) as caught:
            async for _ in reconnect(url, headers={"Authorization": "Bearer bad"}):
                raise AssertionError("connected with a bad token")
    assert caught.value.status == 401


async def test_reconnect_stops_after_max_attempts() -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(
        ConnectError, match="connection refused"
    ):
        async for _ in reconnect(free_port_url(), initial_delay=0.01, max_attempts=3):
            raise AssertionError("connected to a closed port")


async def test_connection_context_propagates_errors_unrelated_to_a_drop(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(perspective.PerspectiveError):
        async for conn in reconnect(url):
            async with conn:
                await conn.client.open_table("no such table")
        raise AssertionError("unreachable")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perspective_asgi.client", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


def test_cli_lists_tables_with_schemas_and_sizes(perspective_server: perspective.Server) -> None:
    with serve_in_thread(ADAPTERS["tornado"](perspective_server, Settings())) as url:
        result = cli(url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "demo: 4 rows, 4 columns, index id" in lines
    assert "other: 3 rows, 1 columns" in lines
    assert lines[lines.index("demo: 4 rows, 4 columns, index id") + 2].split() == ["name", "string"]


def test_cli_reports_a_failure_in_one_line() -> None:
    result = cli(free_port_url())
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: cannot connect to ws://127.0.0.1:")


@pytest.mark.parametrize("settings", [Settings(authenticate=require_token)])
def test_cli_sends_headers(url: str) -> None:
    refused = cli(url)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr
    accepted = cli(url, "-H", "Authorization: Bearer good")
    assert accepted.returncode == 0, accepted.stderr
    assert "demo: 4 rows" in accepted.stdout
