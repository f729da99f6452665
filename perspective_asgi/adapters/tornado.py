"""Tornado: ``PerspectiveTornadoHandler``, a drop-in for Perspective's handler of that name.

It takes the same ``initialize`` arguments (``perspective_server``, ``loop``, ``executor``,
``max_buffer_size``) plus ``settings`` and a working ``check_origin``::

    (r"/websocket", PerspectiveTornadoHandler, {"perspective_server": server})

Tornado hands websocket streams over to their handlers, so stopping the ``HTTPServer`` leaves
them open: await ``perspective_asgi.close_all_connections()`` when shutting down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any

import anyio
import anyio.abc
import perspective
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .._auth import HandshakeRequest
from .._config import Settings, resolve_settings
from .._core.bridge import SessionBridge
from .._exceptions import ConnectionClosed
from .._types import Frame, SessionFactory
from ._handshake import Refusal, authenticate_handshake, refuse_origin


class _TornadoTransport:
    """Feeds ``on_message`` into the core; sends wait on Tornado's write flow control."""

    def __init__(self, handler: PerspectiveTornadoHandler) -> None:
        self._handler = handler
        # Unbuffered: on_message waits until the core takes each frame, and Tornado does not
        # read the next frame meanwhile, so a fast client is held back by TCP.
        self.inbox_send, self._inbox = anyio.create_memory_object_stream[Frame](0)

    async def receive(self) -> Frame:
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            handler = self._handler
            raise ConnectionClosed(handler.close_code or 1005, handler.close_reason or "") from None

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
        self._handler.close(code, reason)

    def closed(self) -> None:
        self.inbox_send.close()
        self._inbox.close()


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

    async def on_message(self, message: str | bytes) -> None:
        # Once the core has ended the connection there is nobody left to read the message.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._transport.inbox_send.send(message)

    def on_close(self) -> None:
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.closed()

    @property
    def bridge(self) -> SessionBridge:
        """The core serving this connection."""
        return self._bridge
