"""``PerspectiveASGIApp`` inside a Starlette app, built as the README's "Raw ASGI" snippet says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import perspective
import pytest
import websockets
from starlette.applications import Starlette

from perspective_asgi import PerspectiveASGIApp

from ._helpers import DEMO_ROWS, connect
from ._servers import serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> perspective.Server:
    server = perspective.Server()
    server.new_local_client().table(DEMO_ROWS, name="demo", index="id")
    return server


def readme_snippet() -> str:
    """The Python block of the README's "Raw ASGI" paragraph."""
    text = README.read_text("utf-8")
    found = re.search(r"\*\*Raw ASGI\*\*.*?```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md has no Raw ASGI snippet"
    return found.group(1)


def readme_app(server: perspective.Server) -> tuple[Any, str]:
    """The Starlette app the snippet builds around ``server``, and the path its comment names."""
    snippet = readme_snippet()
    namespace: dict[str, Any] = {"server": server}
    exec(compile(snippet, str(README), "exec"), namespace)
    named = re.search(r"ws://host(/\S*)", snippet)
    assert named, "the snippet does not say which URL clients connect to"
    return namespace["starlette_app"], named.group(1)


async def assert_serves(url: str) -> None:
    async with connect(url) as conn:
        table = await conn.client.open_table("demo")
        assert await table.size() == len(DEMO_ROWS["id"])


async def test_the_readme_snippet_serves_at_the_url_it_names(server: perspective.Server) -> None:
    app, path = readme_app(server)
    assert path == "/websocket"
    async with serve_in_background(uvicorn_main(app), path=path) as url:
        await assert_serves(url)


async def test_a_mount_serves_below_its_path_only(server: perspective.Server) -> None:
    # What the README warns of: Mount("/websocket", app) matches /websocket/... only.
    readme = " ".join(README.read_text("utf-8").split())
    assert "works only for clients that connect to `ws://host/websocket/`" in readme
    app = Starlette()
    app.mount("/websocket", PerspectiveASGIApp(server))
    async with serve_in_background(uvicorn_main(app), path="/websocket/") as url:
        await assert_serves(url)
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(url.removesuffix("/")):
                pass
    assert refused.value.response.status_code == 403
