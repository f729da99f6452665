"""aiohttp: ``PerspectiveAIOHTTPHandler``, a drop-in for Perspective's handler of that name::

    async def websocket(request: web.Request) -> web.StreamResponse:
        return await PerspectiveAIOHTTPHandler(perspective_server=server, request=request).run()

    app.router.add_get("/websocket", websocket)
    app.on_shutdown.append(lambda app: perspective_asgi.close_all_connections())

aiohttp cancels websocket handlers that are still running at shutdown, which the client sees
as 1006; the ``on_shutdown`` hook closes them first with 1001 (going away). It returns once each
client has ended its side of the connection, or, for a client that does not, once
``Settings.close_timeout`` has passed and the connection was reset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib

import perspective
from aiohttp import WSCloseCode, WSMsgType, web

from .._auth import HandshakeRequest
from .._codes import CloseCode
from .._config import Settings, resolve_settings
from .._core.bridge import SessionBridge
from .._exceptions import ConnectionClosed, ProtocolError
from .._types import Frame, SessionFactory
from ._handshake import Refusal, authenticate_handshake, refuse_origin
from ._tcp import reset_on_close


class _AIOHTTPTransport:
    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._request = request

    async def receive(self) -> Frame:
        message = await self._ws.receive()
        if message.type is WSMsgType.BINARY:
            data: bytes = message.data
            return data
        if message.type is WSMsgType.TEXT:
            text: str = message.data
            return text
        if message.type is WSMsgType.ERROR:
            code = getattr(message.data, "code", None)
            if code == WSCloseCode.MESSAGE_TOO_BIG:
                raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, str(message.data))
            raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE, str(message.data))
        # CLOSE, CLOSING or CLOSED: aiohttp has already answered the peer's close frame.
        raise ConnectionClosed(self._ws.close_code or CloseCode.NO_STATUS_RECEIVED)

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except ConnectionError as exc:
            raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE, "connection lost") from exc

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame, end our side of the TCP connection after it, and wait until
        the peer answers or ends its own side."""
        # Runs as soon as ws.close() first waits, by which time it has written the frame.
        half_close = asyncio.get_running_loop().call_soon(self._end_writing)
        try:
            with contextlib.suppress(ConnectionError):
                # drain=False: the peer's answer comes only after the frame went out anyway,
                # and aiohttp's drain awaits one future per connection, which is cancelled for
                # good once a send blocked on a stalled peer was: draining would raise
                # CancelledError at once, and the connection would never be reset.
                await self._ws.close(code=code, message=reason.encode(), drain=False)
        finally:
            half_close.cancel()

    def _end_writing(self) -> None:
        # ws.close() waits for the peer's close frame, but once aiohttp's shutdown has begun
        # (RequestHandler.close(), before on_shutdown runs) it drops everything the peer
        # sends, so that frame never arrives. The peer's end of TCP does: send our FIN after
        # the close frame, and the peer, having answered, closes its side too. TLS transports
        # cannot half-close; they wait for the frame, at most close_timeout.
        transport = self._request.transport
        if self._ws.closed and transport is not None and transport.can_write_eof():
            transport.write_eof()

    def abort(self) -> None:
        """Reset the TCP connection now (a peer that stopped reading holds it otherwise)."""
        transport = self._request.transport
        if transport is None:
            return
        reset_on_close(transport.get_extra_info("socket"))
        transport.abort()


_REFUSALS: dict[int, type[web.HTTPException]] = {
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    500: web.HTTPInternalServerError,
}


def _handshake_request(request: web.Request) -> HandshakeRequest:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    client = (str(peername[0]), int(peername[1])) if isinstance(peername, tuple) else None
    return HandshakeRequest.build(
        request.path, request.headers.items(), request.query_string, client
    )


class PerspectiveAIOHTTPHandler:
    """Serves one aiohttp websocket request until it closes.

    Args:
        perspective_server: the session factory; Perspective's global server if omitted.
        request: the websocket upgrade request.
        executor: runs requests instead of anyio's worker threads.
        loop: accepted for compatibility and ignored.
        settings: limits and policies (see ``Settings``).
    """

    def __init__(
        self,
        *,
        request: web.Request,
        perspective_server: SessionFactory | None = None,
        executor: concurrent.futures.Executor | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.perspective_server = perspective_server or perspective.GLOBAL_SERVER
        self.request = request
        settings = resolve_settings(settings, executor)
        self.settings = settings
        self.bridge: SessionBridge | None = None

    async def run(self) -> web.WebSocketResponse:
        """Accept the websocket, serve it until it closes, and return the finished response."""
        request = self.request
        if refuse_origin(request.headers.get("Origin"), request.host, self.settings):
            raise web.HTTPForbidden(text="origin not allowed\n")
        principal = await authenticate_handshake(self.settings, lambda: _handshake_request(request))
        if isinstance(principal, Refusal):
            raise _REFUSALS[principal.status](text=f"{principal.reason}\n")
        # aiohttp pings every ``heartbeat`` seconds and closes when no pong comes within half.
        ws = web.WebSocketResponse(
            max_msg_size=self.settings.max_message_size, heartbeat=self.settings.ping_interval
        )
        await ws.prepare(request)
        peer = request.remote
        self.bridge = SessionBridge(
            self.perspective_server, self.settings, peer=peer, principal=principal
        )
        await self.bridge.run(_AIOHTTPTransport(ws, request))
        return ws
