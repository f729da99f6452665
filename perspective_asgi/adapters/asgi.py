"""A plain ASGI 3 application: run it under any ASGI server, or route to it in Starlette/FastAPI.

Route it with ``WebSocketRoute("/websocket", app)``: Starlette's ``Mount("/websocket", app)``
matches only ``/websocket/...`` for websockets, and a client of ``/websocket`` gets HTTP 403.
"""

from __future__ import annotations

import concurrent.futures

import perspective

from .._config import Settings, resolve_settings
from .._types import Receive, Scope, Send, SessionFactory
from ._asgi import serve_websocket


class PerspectiveASGIApp:
    """Serves a Perspective server on every websocket connection it receives.

    HTTP requests get ``426 Upgrade Required``; lifespan events are acknowledged, so the app
    also runs on its own, e.g. ``uvicorn module:app``.

    Args:
        perspective_server: the session factory; Perspective's global server if omitted.
        settings: limits and policies (see ``Settings``).
        executor: runs requests instead of anyio's worker threads; overrides
            ``settings.executor``.
    """

    def __init__(
        self,
        perspective_server: SessionFactory | None = None,
        *,
        settings: Settings | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.perspective_server: SessionFactory = perspective_server or perspective.GLOBAL_SERVER
        settings = resolve_settings(settings, executor)
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await serve_websocket(scope, receive, send, self.perspective_server, self.settings)
        elif kind == "http":
            await _upgrade_required(send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        else:
            raise RuntimeError(f"Unsupported ASGI scope type {kind!r}")


async def _upgrade_required(send: Send) -> None:
    body = b"This endpoint serves Perspective over websockets.\n"
    await send(
        {
            "type": "http.response.start",
            "status": 426,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"upgrade"),
                (b"upgrade", b"websocket"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
