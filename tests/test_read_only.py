"""The read-only policy over every adapter: every mutating request is refused, reads work."""

from __future__ import annotations

from typing import Any

import anyio
import perspective
import pytest
import websockets

from perspective_asgi import Settings
from perspective_asgi._core.policy import MUTATING_REQUEST_KINDS
from perspective_asgi._core.wire import SERVER_ERROR, read_envelope, read_fields

from ._helpers import DEMO_ROWS, SCENARIO_TIMEOUT, connect, reply, request

pytestmark = pytest.mark.anyio


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


async def test_stock_client_cannot_change_anything(url: str, perspective_server: Any) -> None:
    before = snapshot(perspective_server)

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            client = conn.client
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

    assert snapshot(perspective_server) == before


async def test_hand_built_mutations_are_refused(url: str, perspective_server: Any) -> None:
    before = snapshot(perspective_server)

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            for msg_id, kind in enumerate(sorted(MUTATING_REQUEST_KINDS), start=1):
                # msg_id, entity_id "demo", and the request kind with an empty body.
                await ws.send(request(msg_id, "demo", kind))
                answer = read_envelope(await reply(ws))
                assert (answer.msg_id, answer.entity_id, answer.kind) == (
                    msg_id, "demo", SERVER_ERROR
                )
                message = dict(read_fields(answer.body))[1]
                assert isinstance(message, memoryview)
                assert b"read-only" in bytes(message)

    assert snapshot(perspective_server) == before

