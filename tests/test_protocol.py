"""One protocol suite, run against every adapter on a real server with the stock Python client."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import perspective
import pyarrow as pa
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from perspective_asgi import CloseCode, Settings

from ._client import perspective_client
from .conftest import DEMO_ROWS, CountingFactory

T = TypeVar("T")
MiB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable: a few client methods are sync in one version."""
    return await value if inspect.isawaitable(value) else value


async def closed_with(ws: ClientConnection, timeout: float = 10) -> int | None:
    """Wait until the server closes ``ws``; return the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    await ws.wait_closed()
    return ws.close_code


async def still_serving(url: str) -> None:
    """A fresh connection gets a correct answer: the server survived what came before."""
    async with perspective_client(url) as (client, _):
        table = await client.open_table("demo")
        assert await table.size() == len(DEMO_ROWS["id"])


def local_table(server: perspective.Server, name: str = "demo") -> Any:
    return server.new_local_client().open_table(name)


# Reading ------------------------------------------------------------------------------------


def test_tables_schema_and_views(url: str) -> None:
    async def scenario() -> None:
        async with perspective_client(url) as (client, _):
            assert sorted(await client.get_hosted_table_names()) == ["demo", "other"]
            table = await client.open_table("demo")
            assert await table.schema() == {
                "id": "integer", "name": "string", "group": "string", "value": "float"
            }
            assert await resolve(table.get_index()) == "id"
            view = await table.view(
                group_by=["group"],
                columns=["value"],
                aggregates={"value": "sum"},
                sort=[["value", "desc"]],
            )
            assert await view.to_columns() == {
                "__ROW_PATH__": [[], ["y"], ["x"]], "value": [12.0, 7.0, 5.0]
            }
            await view.delete()
            view = await table.view(filter=[["value", ">", 2.0]], sort=[["id", "desc"]])
            rows = await view.to_json()
            assert [row["name"] for row in rows] == ["delta", "gamma", "beta"]
            arrow = pa.ipc.open_stream(io.BytesIO(await view.to_arrow())).read_all()
            assert arrow.column("id").to_pylist() == [4, 3, 2]
            assert await view.num_rows() == 3
            await view.delete()

    run(scenario())


# Updates ------------------------------------------------------------------------------------


def test_on_update_from_a_server_side_thread(url: str, perspective_server: Any) -> None:
    async def scenario() -> None:
        async with perspective_client(url) as (client, _):
            table = await client.open_table("demo")
            view = await table.view()
            updated = asyncio.Event()
            await view.on_update(lambda *_: updated.set())
            await table.size()  # on_update resolves on send: one round trip registers it
            writer = threading.Thread(
                target=lambda: local_table(perspective_server).update(
                    {"id": [5], "name": ["epsilon"], "group": ["x"], "value": [9.5]}
                )
            )
            writer.start()
            writer.join()
            await asyncio.wait_for(updated.wait(), 10)
            assert (await view.to_json())[-1]["name"] == "epsilon"

    run(scenario())


def test_client_update_is_seen_by_another_connection(url: str) -> None:
    async def scenario() -> None:
        async with perspective_client(url) as (watcher, _), perspective_client(url) as (
            editor,
            _,
        ):
            watched = await watcher.open_table("demo")
            view = await watched.view()
            updated = asyncio.Event()
            await view.on_update(lambda *_: updated.set())
            await watched.size()
            edited = await editor.open_table("demo")
            await edited.update([{"id": 2, "name": "BETA", "group": "y", "value": 20.0}])
            await asyncio.wait_for(updated.wait(), 10)
            rows = await view.to_json()
            assert {"id": 2, "name": "BETA", "group": "y", "value": 20.0} in rows
            assert await edited.size() == 4

    run(scenario())


# Volume -------------------------------------------------------------------------------------


def _big_arrow(megabytes: int) -> tuple[bytes, list[str]]:
    rows = megabytes * 1024  # ~1 KiB per row, unique and incompressible
    blobs = [os.urandom(505).hex() for _ in range(rows)]
    table = pa.table({"id": pa.array(range(rows)), "blob": pa.array(blobs)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue(), blobs


def test_fifty_megabytes_each_way(url: str, perspective_server: Any) -> None:
    payload, blobs = _big_arrow(50)
    assert len(payload) >= 50 * 1_000_000

    async def scenario() -> None:
        async with perspective_client(url) as (client, _):
            table = await client.table(payload, name="big", index="id")
            assert await table.size() == 50 * 1024
            view = await table.view()
            arrow = await view.to_arrow()
            assert len(arrow) >= 50 * 1_000_000
            result = pa.ipc.open_stream(io.BytesIO(arrow)).read_all()
            assert result.num_rows == 50 * 1024
            assert result.column("blob").to_pylist() == blobs
            await view.delete()
            await table.delete()

    run(scenario(), timeout=120)


def test_two_hundred_concurrent_clients(url: str) -> None:
    async def one(i: int) -> int:
        async with perspective_client(url) as (client, _):
            table = await client.open_table("demo")
            view = await table.view(filter=[["id", "==", i % 4 + 1]])
            rows = await view.to_json()
            await view.delete()
            return int(rows[0]["id"])

    async def scenario() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    assert run(scenario(), timeout=120) == [i % 4 + 1 for i in range(200)]


# Disconnects --------------------------------------------------------------------------------


def _heavy_table(server: perspective.Server) -> None:
    rows = 300_000
    server.new_local_client().table(
        {"k": [i % 1000 for i in range(rows)], "v": [float(i) for i in range(rows)]},
        name="heavy",
    )


@pytest.mark.parametrize("how", ["close", "abort"])
def test_disconnect_mid_request(url: str, perspective_server: Any, how: str) -> None:
    _heavy_table(perspective_server)

    async def scenario() -> None:
        async with perspective_client(url) as (client, ws):
            table = await client.open_table("heavy")
            pending = asyncio.ensure_future(table.view(group_by=["k"], sort=[["v", "desc"]]))
            await asyncio.sleep(0)  # let the request reach the socket
            await asyncio.sleep(0.01)
            if how == "abort":
                ws.transport.abort()
            else:
                await ws.close()
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await still_serving(url)

    run(scenario())


def test_abrupt_tcp_close(url: str, factory: CountingFactory) -> None:
    async def scenario() -> None:
        async with perspective_client(url) as (client, ws):
            table = await client.open_table("demo")
            view = await table.view()
            await view.on_update(lambda *_: None)
            await table.size()
            ws.transport.abort()  # no close frame: the TCP connection just ends
        factory.wait_all_closed()
        await still_serving(url)

    run(scenario())


# Refusals -----------------------------------------------------------------------------------


def test_text_frame_is_refused(url: str, factory: CountingFactory) -> None:
    async def scenario() -> None:
        async with websockets.connect(url) as ws:
            await ws.send("hello")
            assert await closed_with(ws) == CloseCode.UNSUPPORTED_DATA
        await still_serving(url)

    run(scenario())


@pytest.mark.parametrize(
    "frame",
    [
        b"",  # perspective-python 5.x aborts the process on an empty request
        b"\x00",  # field number 0
        b"\x08" + b"\xff" * 11,  # varint longer than ten bytes
        b"\x12\x10short",  # string longer than the frame
        b"\x0b\x01",  # wire type 3 (groups)
        bytes(range(256)),
    ],
    ids=["empty", "field0", "longvarint", "truncated", "group", "bytes"],
)
def test_undecodable_frame_is_refused(url: str, frame: bytes) -> None:
    async def scenario() -> None:
        async with websockets.connect(url) as ws:
            await ws.send(frame)
            assert await closed_with(ws) == CloseCode.INVALID_PAYLOAD
        await still_serving(url)

    run(scenario())


@pytest.mark.parametrize("settings", [Settings(max_message_size=64 * 1024)])
def test_oversized_frame_is_refused(url: str, settings: Settings) -> None:
    async def scenario() -> None:
        async with websockets.connect(url, max_size=None) as ws:
            # Small enough to sit whole in the socket buffers: a server that closes as soon as
            # it reads the frame header must not reset the connection under unread data.
            await ws.send(b"\x08\x01" + b"\x00" * (96 * 1024))
            assert await closed_with(ws) == CloseCode.MESSAGE_TOO_BIG
        await still_serving(url)

    run(scenario())


def test_cross_origin_is_refused(url: str, factory: CountingFactory) -> None:
    async def scenario() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, origin="http://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        assert factory.opened == 0
        await still_serving(url)

    run(scenario())


def test_same_origin_is_accepted(url: str) -> None:
    own_origin = "http://" + url.split("/")[2]

    async def scenario() -> None:
        async with perspective_client(url, origin=own_origin) as (client, _):
            assert "demo" in await client.get_hosted_table_names()

    run(scenario())


@pytest.mark.parametrize("settings", [Settings(allowed_origins={"https://dash.example.com"})])
def test_allowed_origin_is_accepted(url: str, settings: Settings) -> None:
    async def scenario() -> None:
        async with perspective_client(url, origin="https://dash.example.com") as (client, _):
            assert "demo" in await client.get_hosted_table_names()
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(url, origin="https://other.example.com"):
                pass

    run(scenario())


# Quiet closes -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, None])
def test_normal_close_logs_nothing_above_debug(
    url: str, factory: CountingFactory, caplog: pytest.LogCaptureFixture, code: int | None
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with perspective_client(url) as (client, ws):
            table = await client.open_table("demo")
            view = await table.view()
            await view.on_update(lambda *_: None)
            await table.size()
            if code is None:
                # What the JS client's terminate() does: a close frame without a code.
                await ws.close(code=None)  # type: ignore[arg-type]
            else:
                await ws.close(code)
        factory.wait_all_closed()

    run(scenario())
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    ours = [r for r in caplog.records if r.name.startswith("perspective_asgi")]
    assert not loud, [r.getMessage() for r in loud]
    assert all(r.levelno == logging.DEBUG for r in ours), [r.getMessage() for r in ours]
