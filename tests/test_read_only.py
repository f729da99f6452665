"""The read-only policy over every adapter: every mutating request is refused, reads work."""

from __future__ import annotations

import asyncio
from typing import Any

import perspective
import pytest
import websockets

from perspective_asgi import Settings
from perspective_asgi._core.policy import MUTATING_REQUEST_KINDS
from perspective_asgi._core.wire import SERVER_ERROR, read_envelope, read_fields

from ._client import perspective_client
from .conftest import DEMO_ROWS


@pytest.fixture
def settings() -> Settings:
    return Settings(read_only=True)


def snapshot(server: perspective.Server) -> tuple[list[str], bytes]:
    client = server.new_local_client()
    view = client.open_table("demo").view()
    try:
        return sorted(client.get_hosted_table_names()), view.to_arrow()
    finally:
        view.delete()


def test_stock_client_cannot_change_anything(url: str, perspective_server: Any) -> None:
    before = snapshot(perspective_server)

    async def scenario() -> None:
        async with perspective_client(url) as (client, _):
            table = await client.open_table("demo")
            row = {"id": 9, "name": "intruder", "group": "z", "value": 0.0}
            attempts = {
                "make_table": lambda: client.table({"x": [1]}, name="new"),
                "update": lambda: table.update([row]),
                "replace": lambda: table.replace([row]),
                "remove": lambda: table.remove([1]),
                "clear": lambda: table.clear(),
                "delete": lambda: table.delete(),
            }
            for name, attempt in attempts.items():
                with pytest.raises(perspective.PerspectiveError, match="read-only"):
                    await attempt()
                # The refusal is an error reply: the connection still answers reads.
                assert await table.size() == len(DEMO_ROWS["id"]), name
            view = await table.view(group_by=["group"], columns=["value"])
            assert (await view.to_columns())["value"] == [12.0, 5.0, 7.0]
            await view.delete()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert snapshot(perspective_server) == before


def test_hand_built_mutations_are_refused(url: str, perspective_server: Any) -> None:
    before = snapshot(perspective_server)

    async def scenario() -> None:
        async with websockets.connect(url) as ws:
            for msg_id, kind in enumerate(sorted(MUTATING_REQUEST_KINDS), start=1):
                # msg_id, entity_id "demo", and the request kind with an empty body.
                frame = bytes([0x08, msg_id, 0x12, 4]) + b"demo"
                frame += _key(kind) + b"\x00"
                await ws.send(frame)
                reply = read_envelope(await asyncio.wait_for(ws.recv(), 10))
                assert (reply.msg_id, reply.entity_id, reply.kind) == (msg_id, "demo", SERVER_ERROR)
                message = dict(read_fields(reply.body))[1]
                assert isinstance(message, memoryview)
                assert b"read-only" in bytes(message)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert snapshot(perspective_server) == before


def _key(field: int) -> bytes:
    key = field << 3 | 2
    out = bytearray()
    while key > 0x7F:
        out.append(key & 0x7F | 0x80)
        key >>= 7
    out.append(key)
    return bytes(out)
