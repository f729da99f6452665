"""Test an ASGI app serving Perspective in-process: no server, no sockets.

``InProcessApp`` runs the app's lifespan on entry and exit and drives its ASGI callable
directly with websocket messages; ``connect`` yields a ``perspective.AsyncClient`` speaking to
it. Works with ``PerspectiveASGIApp`` and with Starlette/FastAPI apps using this package's
endpoint, route or handler::

    from perspective_asgi.testing import InProcessApp

    async def test_sales_table() -> None:
        async with InProcessApp(app) as server:
            async with server.connect("/websocket?token=t") as client:
                table = await client.open_table("sales")
                assert await table.size() == 4

``connect_asgi(app, path)`` does both steps in one. A refused handshake (the origin check, an
``authenticate`` hook, a FastAPI dependency) raises ``ConnectError`` with the HTTP status a
server would have answered. An exception the app raises while serving is re-raised when the
connection's block ends, so a test cannot miss it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import perspective

from ._client import ClientBridge, ConnectError
from ._codes import CloseCode
from ._types import ASGIApp, Message, Scope

__all__ = ["ConnectError", "InProcessApp", "connect_asgi"]

#: Messages queued each way between the client and the app before the sender waits.
_QUEUE_MESSAGES = 16


async def _next_message(
    queue: asyncio.Queue[Message], task: asyncio.Task[None], timeout: float | None
) -> Message | None:
    """Return the next message from the app, or ``None`` once the app has returned."""
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait(
            {getter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if not getter.done():
            getter.cancel()
    if getter in done:
        return getter.result()
    if task in done:
        return None
    raise TimeoutError(f"the application sent nothing within {timeout} s")


class _WebSocket:
    """One websocket connection driven through the app's ASGI callable."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self.to_app: asyncio.Queue[Message] = asyncio.Queue(_QUEUE_MESSAGES)
        self.from_app: asyncio.Queue[Message] = asyncio.Queue(_QUEUE_MESSAGES)
        self.disconnect: Message | None = None
        self.task = asyncio.ensure_future(app(scope, self._receive, self._send))

    async def _receive(self) -> Message:
        if self.to_app.empty() and self.disconnect is not None:
            return self.disconnect
        return await self.to_app.get()

    async def _send(self, message: Message) -> None:
        if self.disconnect is not None:
            # What the ASGI spec asks of a server when the app sends to a closed connection.
            raise OSError("the client has disconnected")
        await self.from_app.put(message)

    async def send_frame(self, data: bytes) -> None:
        if self.disconnect is not None:
            raise OSError("the connection is closed")
        await self.to_app.put({"type": "websocket.receive", "bytes": data})

    def client_disconnected(self, code: int) -> None:
        if self.disconnect is not None:
            return
        self.disconnect = {"type": "websocket.disconnect", "code": code, "reason": ""}
        # A full queue means the app is not waiting in receive(); it finds the disconnect there
        # once it has drained the queue.
        with contextlib.suppress(asyncio.QueueFull):
            self.to_app.put_nowait(self.disconnect)


class InProcessApp:
    """Runs an ASGI application in the current event loop and connects Perspective clients.

    Args:
        app: the ASGI application, e.g. a ``FastAPI`` or ``PerspectiveASGIApp`` instance.
        lifespan: send lifespan startup on entry and shutdown on exit.
        timeout: seconds allowed for the lifespan, for each handshake and for the app to
            finish a connection after the client closed it.
        host: the ``Host`` header and server name the app sees.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifespan: bool = True,
        timeout: float = 10.0,
        host: str = "testserver",
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.host = host
        #: The lifespan state, copied into every connection's scope (ASGI ``state``).
        self.state: dict[str, Any] = {}
        self._use_lifespan = lifespan
        self._lifespan_task: asyncio.Task[None] | None = None
        self._lifespan_in: asyncio.Queue[Message] = asyncio.Queue(2)
        self._lifespan_out: asyncio.Queue[Message] = asyncio.Queue(2)

    async def __aenter__(self) -> InProcessApp:
        if self._use_lifespan:
            scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                     "state": self.state}
            self._lifespan_task = asyncio.ensure_future(
                self.app(scope, self._lifespan_in.get, self._lifespan_out.put)
            )
            await self._lifespan_event("startup")
            if self._lifespan_task.done():
                self._lifespan_task = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._lifespan_task is not None:
            await self._lifespan_event("shutdown")
            await asyncio.wait_for(self._lifespan_task, self.timeout)

    async def _lifespan_event(self, event: str) -> None:
        task = self._lifespan_task
        assert task is not None
        await self._lifespan_in.put({"type": f"lifespan.{event}"})
        reply = await _next_message(self._lifespan_out, task, self.timeout)
        if reply is None:
            if event == "startup" and task.exception() is not None:
                return  # the ASGI spec: an app that raises on lifespan does not support it
            task.result()  # raises what the app raised during shutdown
            raise RuntimeError(f"the application returned during lifespan {event}")
        if reply["type"] == f"lifespan.{event}.failed":
            raise RuntimeError(f"lifespan {event} failed: {reply.get('message', '')}")
        if reply["type"] != f"lifespan.{event}.complete":
            raise RuntimeError(f'Expected "lifespan.{event}.complete", got {reply["type"]!r}')

    def _scope(self, path: str, headers: Mapping[str, str] | None) -> Scope:
        path, _, query = path.partition("?")
        raw_headers = [(b"host", self.host.encode("latin-1"))]
        raw_headers += [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in (headers or {}).items()
            if name.lower() != "host"
        ]
        return {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": (self.host, 80),
            "client": ("127.0.0.1", 50000),
            "root_path": "",
            "path": path,
            "raw_path": quote(path).encode("ascii"),
            "query_string": query.encode("latin-1"),
            "headers": raw_headers,
            "subprotocols": [],
            "extensions": {"websocket.http.response": {}},
            "state": dict(self.state),
        }

    @contextlib.asynccontextmanager
    async def connect(
        self, path: str = "/websocket", *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[perspective.AsyncClient]:
        """Open a websocket to ``path`` (query string allowed); yield a connected client."""
        url = f"ws://{self.host}{path}"
        ws = _WebSocket(self.app, self._scope(path, headers))
        await ws.to_app.put({"type": "websocket.connect"})
        await self._handshake(ws, url)
        bridge = ClientBridge(ws.send_frame)
        pump = asyncio.ensure_future(self._pump(ws, bridge))
        try:
            yield bridge.client
        finally:
            ws.client_disconnected(CloseCode.NORMAL_CLOSURE)
            await bridge.connection_lost(CloseCode.NORMAL_CLOSURE, "client closed")
            try:
                await asyncio.wait_for(asyncio.shield(ws.task), self.timeout)
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            ws.task.result()  # re-raise what the app raised while serving

    async def _handshake(self, ws: _WebSocket, url: str) -> None:
        message = await _next_message(ws.from_app, ws.task, self.timeout)
        if message is None:
            error = ws.task.exception()
            if error is not None:
                raise ConnectError(url, f"the application raised {error!r}", 500) from error
            # What servers answer an app that returns without accepting.
            raise ConnectError(url, "the application closed the connection", 403)
        kind = message["type"]
        if kind == "websocket.accept":
            return
        ws.client_disconnected(CloseCode.ABNORMAL_CLOSURE)
        if kind == "websocket.close":
            raise ConnectError(url, message.get("reason") or "handshake refused", 403)
        if kind == "websocket.http.response.start":
            status = int(message["status"])
            body = b""
            while True:
                part = await _next_message(ws.from_app, ws.task, self.timeout)
                if part is None:
                    break
                body += part.get("body", b"")
                if not part.get("more_body", False):
                    break
            reason = body.decode("utf-8", "replace").strip() or "handshake refused"
            raise ConnectError(url, reason, status)
        raise RuntimeError(f'Expected "websocket.accept", got {kind!r}')

    async def _pump(self, ws: _WebSocket, bridge: ClientBridge) -> None:
        while True:
            message = await _next_message(ws.from_app, ws.task, None)
            if message is None:
                await bridge.connection_lost(CloseCode.ABNORMAL_CLOSURE, "the application ended")
                return
            if bridge.closed:
                continue  # drained so that a sending app is never stuck on a full queue
            kind = message["type"]
            if kind == "websocket.send" and message.get("bytes") is not None:
                await bridge.deliver(message["bytes"])
            elif kind == "websocket.close":
                code = int(message.get("code", CloseCode.NORMAL_CLOSURE))
                ws.client_disconnected(code)
                await bridge.connection_lost(code, message.get("reason") or "")
            elif kind == "websocket.send":
                ws.client_disconnected(CloseCode.UNSUPPORTED_DATA)
                await bridge.connection_lost(CloseCode.UNSUPPORTED_DATA, "text frame")
            else:
                raise RuntimeError(f'Expected "websocket.send" or "websocket.close", got {kind!r}')


@contextlib.asynccontextmanager
async def connect_asgi(
    app: ASGIApp,
    path: str = "/websocket",
    *,
    headers: Mapping[str, str] | None = None,
    lifespan: bool = True,
) -> AsyncIterator[perspective.AsyncClient]:
    """Start ``app`` in-process and yield a ``perspective.AsyncClient`` connected to ``path``."""
    async with InProcessApp(app, lifespan=lifespan) as server, server.connect(
        path, headers=headers
    ) as client:
        yield client
