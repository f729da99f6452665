"""One protocol suite, run against every adapter on a real server with the stock Python client."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import threading
from typing import Any

import anyio
import perspective
import pyarrow as pa
import pytest
import websockets

from perspective_asgi import CloseCode, Settings
from perspective_asgi._core import registry

from ._helpers import (
    SCENARIO_TIMEOUT,
    WAIT,
    CountingFactory,
    closed_with,
    connect,
    in_thread,
    local_table,
    resolve,
    still_serving,
)

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
#: The bound of the scenarios that move tens of megabytes or hundreds of connections.
VOLUME_TIMEOUT = 120


# Reading ------------------------------------------------------------------------------------


async def test_tables_schema_and_views(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            client = conn.client
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


# Updates ------------------------------------------------------------------------------------


async def test_on_update_from_a_server_side_thread(url: str, perspective_server: Any) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            table = await conn.client.open_table("demo")
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
            await in_thread(writer.join)
            await asyncio.wait_for(updated.wait(), 10)
            assert (await view.to_json())[-1]["name"] == "epsilon"


async def test_client_update_is_seen_by_another_connection(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as watcher, connect(url) as editor:
            watched = await watcher.client.open_table("demo")
            view = await watched.view()
            updated = asyncio.Event()
            await view.on_update(lambda *_: updated.set())
            await watched.size()
            edited = await editor.client.open_table("demo")
            await edited.update([{"id": 2, "name": "BETA", "group": "y", "value": 20.0}])
            await asyncio.wait_for(updated.wait(), 10)
            rows = await view.to_json()
            assert {"id": 2, "name": "BETA", "group": "y", "value": 20.0} in rows
            assert await edited.size() == 4


# Volume -------------------------------------------------------------------------------------


def _big_arrow(megabytes: int) -> tuple[bytes, list[str]]:
    rows = megabytes * 1024  # ~1 KiB per row, unique and incompressible
    blobs = [os.urandom(505).hex() for _ in range(rows)]
    table = pa.table({"id": pa.array(range(rows)), "blob": pa.array(blobs)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue(), blobs


async def test_fifty_megabytes_each_way(url: str, perspective_server: Any) -> None:
    payload, blobs = _big_arrow(50)
    assert len(payload) >= 50 * 1_000_000

    with anyio.fail_after(VOLUME_TIMEOUT):
        async with connect(url) as conn:
            table = await conn.client.table(payload, name="big", index="id")
            assert await table.size() == 50 * 1024
            view = await table.view()
            arrow = await view.to_arrow()
            assert len(arrow) >= 50 * 1_000_000
            result = pa.ipc.open_stream(io.BytesIO(arrow)).read_all()
            assert result.num_rows == 50 * 1024
            assert result.column("blob").to_pylist() == blobs
            await view.delete()
            await table.delete()


async def test_two_hundred_concurrent_clients(url: str) -> None:
    async def one(i: int) -> int:
        async with connect(url) as conn:
            table = await conn.client.open_table("demo")
            view = await table.view(filter=[["id", "==", i % 4 + 1]])
            rows = await view.to_json()
            await view.delete()
            return int(rows[0]["id"])

    with anyio.fail_after(VOLUME_TIMEOUT):
        ids = await asyncio.gather(*(one(i) for i in range(200)))
    assert ids == [i % 4 + 1 for i in range(200)]


# Disconnects --------------------------------------------------------------------------------


def _heavy_table(server: perspective.Server) -> None:
    rows = 300_000
    server.new_local_client().table(
        {"k": [i % 1000 for i in range(rows)], "v": [float(i) for i in range(rows)]},
        name="heavy",
    )


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_disconnect_mid_request(
    url: str, perspective_server: Any, factory: CountingFactory, how: str
) -> None:
    _heavy_table(perspective_server)

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            table = await conn.client.open_table("heavy")
            pending = asyncio.ensure_future(table.view(group_by=["k"], sort=[["v", "desc"]]))
            # The view request has reached the engine (through the shared views' private
            # session): the client leaves in the middle of it.
            with anyio.fail_after(WAIT):
                while not registry.engine_is_busy(id(perspective_server)):
                    await anyio.sleep(0.001)
            if how == "abort":
                conn.ws.transport.abort()
            else:
                await conn.ws.close()
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await still_serving(url)


async def test_abrupt_tcp_close(url: str, factory: CountingFactory) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            table = await conn.client.open_table("demo")
            view = await table.view()
            await view.on_update(lambda *_: None)
            await table.size()
            conn.ws.transport.abort()  # no close frame: the TCP connection just ends
        await factory.all_closed()
        await still_serving(url)


# Refusals -----------------------------------------------------------------------------------


async def test_text_frame_is_refused(url: str, factory: CountingFactory) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.send("hello")
            assert await closed_with(ws) == CloseCode.UNSUPPORTED_DATA
        await still_serving(url)


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
async def test_undecodable_frame_is_refused(url: str, frame: bytes) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.send(frame)
            assert await closed_with(ws) == CloseCode.INVALID_PAYLOAD
        await still_serving(url)


@pytest.mark.parametrize("settings", [Settings(max_message_size=64 * 1024)])
async def test_oversized_frame_is_refused(url: str, settings: Settings) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url, max_size=None) as ws:
            # Small enough to sit whole in the socket buffers: a server that closes as soon as
            # it reads the frame header must not reset the connection under unread data.
            await ws.send(b"\x08\x01" + b"\x00" * (96 * 1024))
            assert await closed_with(ws) == CloseCode.MESSAGE_TOO_BIG
        await still_serving(url)


async def test_cross_origin_is_refused(url: str, factory: CountingFactory) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, origin="http://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        assert factory.opened == 0
        await still_serving(url)


async def test_same_origin_is_accepted(url: str) -> None:
    own_origin = "http://" + url.split("/")[2]

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url, origin=own_origin) as conn:
            assert "demo" in await conn.client.get_hosted_table_names()


@pytest.mark.parametrize("settings", [Settings(allowed_origins={"https://dash.example.com"})])
async def test_allowed_origin_is_accepted(url: str, settings: Settings) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url, origin="https://dash.example.com") as conn:
            assert "demo" in await conn.client.get_hosted_table_names()
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(url, origin="https://other.example.com"):
                pass


# Quiet closes -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, None])
async def test_normal_close_logs_nothing_above_debug(
    url: str, factory: CountingFactory, caplog: pytest.LogCaptureFixture, code: int | None
) -> None:
    caplog.set_level(logging.DEBUG)

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            table = await conn.client.open_table("demo")
            view = await table.view()
            await view.on_update(lambda *_: None)
            await table.size()
            if code is None:
                # What the JS client's terminate() does: a close frame without a code.
                await conn.ws.close(code=None)  # type: ignore[arg-type]
            else:
                await conn.ws.close(code)
        await factory.all_closed()

    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    ours = [r for r in caplog.records if r.name.startswith("perspective_asgi")]
    assert not loud, [r.getMessage() for r in loud]
    assert all(r.levelno == logging.DEBUG for r in ours), [r.getMessage() for r in ours]
