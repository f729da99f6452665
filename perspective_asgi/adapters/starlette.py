"""Starlette and FastAPI: a ready route, an endpoint for ``@app.websocket``, and a drop-in handler.

``PerspectiveStarletteHandler`` takes the arguments of Perspective's own handler of that name, so
switching is a change of import::

    from perspective_asgi.adapters.starlette import PerspectiveStarletteHandler

    @app.websocket("/websocket")
    async def websocket(websocket: WebSocket) -> None:
        await PerspectiveStarletteHandler(perspective_server=server, websocket=websocket).run()

Authentication is ``Settings.authenticate``, or, in FastAPI, the app's own dependencies: they
run before the endpoint is called, so before the handshake is accepted. A dependency refuses by
raising ``WebSocketException`` (FastAPI closes the websocket, which the server answers with
403), and the endpoint hands what it found to the handler as ``principal``, kept as
``SessionBridge.principal``; the ``authenticate`` hook is then not run::

    async def current_user(websocket: WebSocket, token: str = "") -> User:
        user = await users.by_token(token)           # the query string: ?token=...
        if user is None:
            raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION)
        return user

    @app.websocket("/websocket")
    async def websocket(websocket: WebSocket, user: User = Depends(current_user)) -> None:
        handler = PerspectiveStarletteHandler(
            perspective_server=server, websocket=websocket, principal=user
        )
        await handler.run()
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

import perspective
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from .._config import Settings, resolve_settings
from .._core.bridge import SessionBridge
from .._types import SessionFactory
from ._asgi import ASGITransport, serve_websocket


class PerspectiveStarletteHandler:
    """Serves one Starlette ``WebSocket`` until it closes.

    Args:
        perspective_server: the session factory; Perspective's global server if omitted.
        websocket: the connection, not yet accepted (or accepted by the caller).
        executor: runs requests instead of anyio's worker threads.
        settings: limits and policies (see ``Settings``).
        principal: who the app's own authentication found the client to be; when given,
            ``settings.authenticate`` is not run.
    """

    def __init__(
        self,
        *,
        websocket: WebSocket,
        perspective_server: SessionFactory | None = None,
        executor: concurrent.futures.Executor | None = None,
        settings: Settings | None = None,
        principal: object | None = None,
    ) -> None:
        self.perspective_server = perspective_server or perspective.GLOBAL_SERVER
        self.websocket = websocket
        self.settings = resolve_settings(settings, executor)
        self.principal = principal

    async def run(self) -> None:
        """Accept the connection (unless the caller did) and serve it until it closes."""
        websocket = self.websocket
        disconnect = (OSError, WebSocketDisconnect)
        if websocket.client_state is WebSocketState.CONNECTING:
            await serve_websocket(
                websocket.scope,
                websocket.receive,
                websocket.send,
                self.perspective_server,
                self.settings,
                disconnect_errors=disconnect,
                principal=self.principal,
            )
            return
        # Accepted already (e.g. by an authentication dependency): skip the handshake.
        client = websocket.client
        bridge = SessionBridge(
            self.perspective_server,
            self.settings,
            peer=None if client is None else f"{client.host}:{client.port}",
            principal=self.principal,
        )
        await bridge.run(ASGITransport(websocket.receive, websocket.send, disconnect))


def websocket_endpoint(
    perspective_server: SessionFactory | None = None,
    *,
    settings: Settings | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> Callable[[WebSocket], Awaitable[None]]:
    """Return an endpoint for ``app.add_websocket_route`` or FastAPI's ``@app.websocket``."""
    resolved = resolve_settings(settings, executor)

    async def endpoint(websocket: WebSocket) -> None:
        handler = PerspectiveStarletteHandler(
            perspective_server=perspective_server, websocket=websocket, settings=resolved
        )
        await handler.run()

    return endpoint


class PerspectiveWebSocketRoute(WebSocketRoute):
    """A ``WebSocketRoute`` serving Perspective at ``path``."""

    def __init__(
        self,
        path: str,
        perspective_server: SessionFactory | None = None,
        *,
        settings: Settings | None = None,
        executor: concurrent.futures.Executor | None = None,
        name: str | None = None,
        **route_options: Any,
    ) -> None:
        endpoint = websocket_endpoint(perspective_server, settings=settings, executor=executor)
        super().__init__(path, endpoint, name=name or "perspective", **route_options)
