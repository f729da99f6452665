"""``PerspectiveASGIApp`` inside a Starlette app, routed as docs/tutorials/asgi.md and
starlette.md say: a ``WebSocketRoute`` serves its exact path, a ``Mount`` only below it."""

from __future__ import annotations

from pathlib import Path

import perspective
import pytest
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from perspective_asgi import PerspectiveASGIApp

from ._helpers import DEMO_ROWS, connect
from ._servers import serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parent.parent / "docs" / "tutorials"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> perspective.Server:
    server = perspective.Server()
    server.new_local_client().table(DEMO_ROWS, name="demo", index="id")
    return server


async def assert_serves(url: str) -> None:
    async with connect(url) as conn:
        table = await conn.client.open_table("demo")
        assert await table.size() == len(DEMO_ROWS["id"])


async def test_a_websocket_route_serves_its_exact_path(server: perspective.Server) -> None:
    # What docs/tutorials/asgi.md says: wrap the app in the framework's websocket route.
    guide = " ".join((DOCS / "asgi.md").read_text("utf-8").split())
    assert '`WebSocketRoute("/websocket", app)`' in guide
    app = Starlette(routes=[WebSocketRoute("/websocket", PerspectiveASGIApp(server))])
    async with serve_in_background(uvicorn_main(app), path="/websocket") as url:
        await assert_serves(url)


async def test_a_mount_serves_below_its_path_only(server: perspective.Server) -> None:
    # What docs/tutorials/starlette.md warns of: Mount("/websocket", app) matches
    # /websocket/... only.
    guide = " ".join((DOCS / "starlette.md").read_text("utf-8").split())
    assert "answers `ws://host/websocket/` but refuses `ws://host/websocket` with HTTP 403" in guide
    app = Starlette()
    app.mount("/websocket", PerspectiveASGIApp(server))
    async with serve_in_background(uvicorn_main(app), path="/websocket/") as url:
        await assert_serves(url)
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(url.removesuffix("/")):
                pass
    assert refused.value.response.status_code == 403
