"""Tornado: ``PerspectiveTornadoHandler``, a drop-in for Perspective's handler of that name.

It takes the same ``initialize`` arguments (``perspective_server``, ``loop``, ``executor``,
``max_buffer_size``) plus ``settings`` and a working ``check_origin``::

    (r"/websocket", PerspectiveTornadoHandler, {"perspective_server": server})

Tornado hands websocket streams over to their handlers, so stopping the ``HTTPServer`` leaves
them open: await ``perspective_asgi.close_all_connections()`` when shutting down. It returns once
each client has answered its close frame and Tornado has closed the socket, or, for a client
that does not answer, once ``Settings.close_timeout`` has passed and the connection was reset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import perspective
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.web import HTTPError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .._auth import HandshakeRequest
from .._config import Settings, resolve_settings
from .._core.bridge import SessionBridge
from .._exceptions import ConnectionClosed
from .._types import Frame, SessionFactory
from ._handshake import Refusal, authenticate_handshake, refuse_origin
from ._tcp import reset_on_close

#: Tornado closes the socket itself this long after a close frame the peer has not answered
#: (``WebSocketProtocol13.close``), the ordinary way, which a peer that stopped reading never
#: sees (see ``_tcp``).
_TORNADO_CLOSE_WAIT = 5.0


class _TornadoTransport:
    """Feeds ``on_message`` into the core; sends wait on Tornado's write flow control."""

    __slots__ = ("_closed", "_frame", "_giver", "_handler", "_stream", "_taker", "_waiting_close")

    def __init__(self, handler: PerspectiveTornadoHandler) -> None:
        self._handler = handler
        # One frame at a time, unbuffered: on_message returns once the core has taken its
        # frame, and Tornado reads no further meanwhile, so TCP holds back a fast client.
        # Futures, made only while one side waits, cost an idle connection nothing.
        self._frame: Frame | None = None
        #: The core waiting in ``receive``.
        self._taker: asyncio.Future[Frame] | None = None
        #: ``on_message`` waiting for the core to take ``_frame``.
        self._giver: asyncio.Future[None] | None = None
        #: Tornado has closed the socket (``on_close``).
        self._closed = False
        self._waiting_close: asyncio.Future[None] | None = None
        self._stream: IOStream | None = None

    def put(self, frame: Frame) -> asyncio.Future[None] | None:
        """Hand ``frame`` to the core; return a future to await if the core is busy."""
        if self._closed:
            return None  # nobody is left to read it
        taker, self._taker = self._taker, None
        if taker is not None and not taker.done():
            taker.set_result(frame)
            return None
        self._frame = frame
        giver = self._giver = asyncio.get_running_loop().create_future()
        return giver

    async def receive(self) -> Frame:
        frame = self._frame
        if frame is not None:
            self._frame = None
            giver, self._giver = self._giver, None
            if giver is not None and not giver.done():
                giver.set_result(None)
            return frame
        if self._closed:
            handler = self._handler
            raise ConnectionClosed(handler.close_code or 1005, handler.close_reason or "")
        taker: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._taker = taker
        return await taker

    async def send(self, data: bytes) -> None:
        try:
            written = self._handler.write_message(data, binary=True)
            # Cancelling Tornado's write future makes its IOStream log an error, and a write
            # abandoned on cancel fails later when the stream closes: shield it, and retrieve
            # that late failure so it is not reported as never retrieved.
            written.add_done_callback(_retrieve)
            await asyncio.shield(written)
        except (WebSocketClosedError, StreamClosedError) as exc:
            raise ConnectionClosed(1006, "connection lost while sending") from exc

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame and wait until Tornado has closed the socket, which it does
        when the peer answers: a shutdown that awaits the core then ends with the connections,
        instead of leaving them open to whoever collects the stream later."""
        handler = self._handler
        protocol = handler.ws_connection
        if protocol is not None:
            self._stream = protocol.stream  # handler.close() forgets the protocol
        # Scheduled before Tornado's own timer (below), so it runs first: Tornado's close
        # then finds a socket that has already been reset.
        fallback = asyncio.get_running_loop().call_later(_TORNADO_CLOSE_WAIT, self.abort)
        handler.close(code, reason)
        try:
            if not self._closed:
                self._waiting_close = asyncio.get_running_loop().create_future()
                await self._waiting_close
        finally:
            fallback.cancel()

    def abort(self) -> None:
        """Reset the TCP connection now (a peer that stopped reading holds it otherwise)."""
        stream = self._stream
        if stream is None or stream.closed():
            return
        reset_on_close(stream.socket)
        stream.close()

    def closed(self) -> None:
        self._closed = True
        handler = self._handler
        taker = self._taker
        if taker is not None and not taker.done():
            taker.set_exception(
                ConnectionClosed(handler.close_code or 1005, handler.close_reason or "")
            )
        for waiter in (self._giver, self._waiting_close):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._taker = self._giver = self._waiting_close = None


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class PerspectiveTornadoHandler(WebSocketHandler):
    """Serves a Perspective server on a Tornado websocket route."""

    _bridge: SessionBridge
    _principal: object | None = None
    _transport: _TornadoTransport
    _task: asyncio.Task[None]

    def initialize(
        self,
        perspective_server: SessionFactory | None = None,
        loop: IOLoop | None = None,
        executor: concurrent.futures.Executor | None = None,
        max_buffer_size: int | None = None,
        settings: Settings | None = None,
        check_origin: bool = False,
    ) -> None:
        """Take the route's arguments.

        ``loop`` is accepted for compatibility and ignored: the handler runs on the loop that
        serves it. ``check_origin=True`` accepts every origin, as Perspective's documentation
        describes; otherwise the same-origin rule and ``settings.allowed_origins`` apply.
        """
        self.perspective_server = perspective_server or perspective.GLOBAL_SERVER
        settings = resolve_settings(settings, executor)
        # Tornado's RequestHandler.settings is the Application's; ours live beside it.
        self.session_settings = settings
        self._allow_any_origin = check_origin
        connection = self.request.connection
        if max_buffer_size is not None and connection is not None:
            # Perspective's handler exposes this knob of Tornado's HTTP1Connection stream.
            connection.stream.max_buffer_size = max_buffer_size  # type: ignore[attr-defined]

    @property
    def max_message_size(self) -> int:
        # Tornado closes with 1009 past this size before buffering the rest of the frame.
        return self.session_settings.max_message_size

    @property
    def ping_interval(self) -> float | None:
        # The Application's websocket_ping_interval, when set, wins over Settings.
        interval = self.settings.get("websocket_ping_interval")
        return self.session_settings.ping_interval if interval is None else float(interval)

    @property
    def ping_timeout(self) -> float | None:
        timeout = self.settings.get("websocket_ping_timeout")
        if timeout is not None:
            return float(timeout)
        timeout, interval = self.session_settings.ping_timeout, self.ping_interval
        # Tornado caps the timeout at the interval, with a warning; cap it quietly.
        return timeout if timeout is None or not interval else min(timeout, interval)

    async def prepare(self) -> None:
        """Check the origin, then run ``settings.authenticate``, before Tornado's handshake."""
        headers = self.request.headers
        # Tornado's own check_origin runs only after prepare(); the hook must not see a
        # cross-origin handshake, so the same rule is applied here first.
        origin = headers.get("Origin", headers.get("Sec-Websocket-Origin"))
        if not self._allow_any_origin and refuse_origin(
            origin, headers.get("Host"), self.session_settings
        ):
            raise HTTPError(403)
        verdict = await authenticate_handshake(self.session_settings, self._handshake_request)
        if isinstance(verdict, Refusal):
            raise HTTPError(verdict.status)
        self._principal = verdict

    def _handshake_request(self) -> HandshakeRequest:
        request = self.request
        # Tornado exposes the peer's port only through its connection's context.
        address = getattr(getattr(request.connection, "context", None), "address", None)
        port = address[1] if isinstance(address, tuple) and len(address) >= 2 else 0
        return HandshakeRequest.build(
            request.path,
            request.headers.get_all(),
            request.query,
            None if request.remote_ip is None else (request.remote_ip, int(port)),
        )

    def check_origin(self, origin: str) -> bool:
        return True  # prepare() has applied the origin rule already, with or without Origin.

    def open(self, *args: Any, **kwargs: Any) -> None:
        # Tornado leaves Nagle's algorithm on: a reply sent right after another then waits for
        # the client's delayed ACK, 40 ms (benchmarks/nodelay.py). Each message is whole.
        self.set_nodelay(True)
        remote = self.request.remote_ip
        self._transport = _TornadoTransport(self)
        self._bridge = SessionBridge(
            self.perspective_server, self.session_settings, peer=remote, principal=self._principal
        )
        self._task = asyncio.ensure_future(self._bridge.run(self._transport))

    def on_message(self, message: str | bytes) -> asyncio.Future[None] | None:
        # Tornado awaits what this returns before it reads the next frame: nothing when the
        # core took the frame at once, saving a coroutine per message.
        return self._transport.put(message)

    def on_close(self) -> None:
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.closed()

    @property
    def bridge(self) -> SessionBridge:
        """The core serving this connection."""
        return self._bridge
