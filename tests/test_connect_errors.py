"""A refused handshake's ``ConnectError`` carries the response's status and body, and quotes it."""

from __future__ import annotations

import socket
from typing import Any

import perspective
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from perspective_asgi import HandshakeRequest, PerspectiveASGIApp, Settings
from perspective_asgi.client import ConnectError, open_connection

from ._servers import ADAPTERS, serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def refused(url: str, **options: Any) -> ConnectError:
    """The ``ConnectError`` a connection to ``url`` fails with."""
    with pytest.raises(ConnectError) as caught:
        connection = await open_connection(url, open_timeout=10, **options)
        await connection.close()
    return caught.value


async def nobody(request: HandshakeRequest) -> None:
    return None


@pytest.mark.parametrize("adapter", ["asgi-uvicorn", "starlette", "aiohttp"])
async def test_an_authentication_refusal_says_why(adapter: str) -> None:
    settings = Settings(authenticate=nobody)
    async with serve_in_background(ADAPTERS[adapter](perspective.Server(), settings)) as url:
        error = await refused(url)
    assert error.status == 401
    assert str(error) == f"cannot connect to {url}: HTTP 401 Unauthorized: authentication required"
    assert error.reason == "Unauthorized"
    assert error.body == b"authentication required\n"


async def test_an_origin_refusal_says_why() -> None:
    settings = Settings(allowed_origins={"https://dash.example.com"})
    async with serve_in_background(ADAPTERS["aiohttp"](perspective.Server(), settings)) as url:
        error = await refused(url, headers={"Origin": "https://evil.example.com"})
    assert error.status == 403
    assert str(error).endswith(": HTTP 403 Forbidden: origin not allowed")
    assert error.body == b"origin not allowed\n"


async def test_a_refusal_without_a_body_says_so() -> None:
    # No websocket route answers /websocket: Starlette refuses before any app sees it.
    app = Starlette(routes=[Mount("/websocket", PerspectiveASGIApp(perspective.Server()))])
    async with serve_in_background(uvicorn_main(app)) as url:
        error = await refused(url)
    assert error.status == 403
    assert str(error) == f"cannot connect to {url}: HTTP 403 Forbidden, with an empty body"
    assert error.body == b""


async def refuse_at_length(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that refuses every websocket with a 503 and a long, many-line page."""
    assert scope["type"] == "websocket"
    assert await receive() == {"type": "websocket.connect"}
    body = ("<h1>Down for maintenance</h1>\n" + "back soon.\n" * 200).encode()
    await send({
        "type": "websocket.http.response.start",
        "status": 503,
        "headers": [(b"content-type", b"text/html"), (b"content-length", b"%d" % len(body))],
    })
    await send({"type": "websocket.http.response.body", "body": body})


async def test_a_long_body_is_quoted_in_one_short_line() -> None:
    async with serve_in_background(uvicorn_main(refuse_at_length)) as url:
        error = await refused(url)
    assert error.status == 503
    message = str(error)
    assert "\n" not in message
    assert message.startswith(
        f"cannot connect to {url}: HTTP 503 Service Unavailable: "
        "<h1>Down for maintenance</h1> back soon. back soon."
    )
    assert message.endswith("...")
    assert len(message) < len(f"cannot connect to {url}: HTTP 503 Service Unavailable: ") + 201
    assert error.body is not None and error.body.count(b"back soon.") == 200


async def test_no_http_answer_has_no_body() -> None:
    # Bound but not listening: the kernel refuses the connection, and no other test can
    # take the port meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/websocket"
        error = await refused(url)
    assert error.status is None
    assert error.body is None
    assert str(error) == f"cannot connect to {url}: connection refused"
