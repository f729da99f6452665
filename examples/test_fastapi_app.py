"""Tests of ``fastapi_app.py`` as your own test file would write them: the app runs in-process
(its lifespan included, no server, no sockets) and the stock Perspective client talks to it.

Run them from the repository root::

    python -m pytest examples/test_fastapi_app.py
"""

from __future__ import annotations

import perspective
import pytest
from fastapi_app import app

from perspective_asgi.testing import ConnectError, InProcessApp, connect_asgi

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # perspective_asgi.testing runs on asyncio


async def test_a_user_reads_the_sales_table() -> None:
    async with connect_asgi(app, "/websocket?token=alice-token") as client:
        table = await client.open_table("sales")
        view = await table.view(columns=["region"], sort=[["units", "desc"]])
        assert (await view.to_columns())["region"] == ["East", "North", "South", "West"]


async def test_a_read_only_user_cannot_change_a_table() -> None:
    async with connect_asgi(app, headers={"Authorization": "Bearer bob-token"}) as client:
        table = await client.open_table("sales")
        with pytest.raises(perspective.PerspectiveError, match="read-only"):
            await table.update([{"region": "North", "units": 0}])
        assert await table.size() == 4  # the connection is still usable


async def test_a_handshake_without_a_known_token_is_refused() -> None:
    async with InProcessApp(app) as server:
        for path in ("/websocket", "/websocket?token=wrong"):
            with pytest.raises(ConnectError) as refused:
                async with server.connect(path):
                    pass
            assert refused.value.status == 403
