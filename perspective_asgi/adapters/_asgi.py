"""ASGI websocket plumbing shared by the raw ASGI and Starlette adapters.

ASGI is a specification, not a framework: this module speaks the message dictionaries of the
ASGI 3 websocket protocol and imports nothing beyond the core.
"""

from __future__ import annotations

from .._auth import HandshakeRequest
from .._codes import CloseCode
from .._config import Settings
from .._core.bridge import SessionBridge
from .._exceptions import ConnectionClosed
from .._types import Frame, Receive, Scope, Send, SessionFactory
from ._handshake import Refusal, authenticate_handshake, refuse_origin


def scope_header(scope: Scope, name: bytes) -> str | None:
    """Return the first value of header ``name`` (lowercase bytes) in an ASGI scope."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def handshake_request(scope: Scope) -> HandshakeRequest:
    """Return the framework-neutral view of an ASGI websocket scope's upgrade request."""
    headers = [
        (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
        for name, value in scope.get("headers", ())
    ]
    client = scope.get("client")
    return HandshakeRequest.build(
        scope.get("path", ""),
        headers,
        bytes(scope.get("query_string", b"")).decode("latin-1"),
        None if client is None else (str(client[0]), int(client[1])),
    )


async def refuse_handshake(scope: Scope, send: Send, refusal: Refusal) -> None:
    """Refuse a websocket that is not yet accepted, with an HTTP response where possible."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = f"{refusal.reason}\n".encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": refusal.status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    # Without the extension the server answers a close before the accept with a 403.
    code = CloseCode.INTERNAL_ERROR if refusal.status >= 500 else CloseCode.POLICY_VIOLATION
    await send({"type": "websocket.close", "code": code, "reason": refusal.reason})


class ASGITransport:
    """A ``Transport`` over an accepted ASGI websocket's ``receive`` and ``send``.

    It has no ``abort``: ASGI gives the application no hold on the TCP connection, and the
    server completes the closing handshake itself after ``websocket.close``. Neither uvicorn
    nor hypercorn resets a peer that stopped reading: uvicorn's ``websocket.close`` waits
    until the transport is writable again, hypercorn's drains it, and once the application
    has returned both close the socket the ordinary way, whose FIN waits behind the bytes
    already queued (SECURITY.md, "Not covered").
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        disconnect_errors: tuple[type[BaseException], ...] = (OSError,),
    ) -> None:
        self._receive = receive
        self._send = send
        # The ASGI spec has servers raise an OSError subclass on a send to a closed socket;
        # frameworks wrap it in their own error (Starlette's WebSocketDisconnect).
        self._disconnect_errors = disconnect_errors

    async def receive(self) -> Frame:
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data: Frame | None = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                raise RuntimeError('"websocket.receive" message with neither bytes nor text')
            return data
        if kind == "websocket.disconnect":
            raise ConnectionClosed(message.get("code", 1005), message.get("reason") or "")
        raise RuntimeError(f'Expected "websocket.receive" or "websocket.disconnect", got {kind!r}')

    async def send(self, data: bytes) -> None:
        try:
            await self._send({"type": "websocket.send", "bytes": data})
        except self._disconnect_errors as exc:
            raise ConnectionClosed(1006, "connection lost while sending") from exc

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (RuntimeError, *self._disconnect_errors):  # type: ignore[misc]
            pass  # Already closed by the peer or the server: nothing left to tell it.


async def serve_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    factory: SessionFactory,
    settings: Settings,
    *,
    disconnect_errors: tuple[type[BaseException], ...] = (OSError,),
    principal: object | None = None,
) -> SessionBridge | None:
    """Run the handshake and then a session on one ASGI websocket connection.

    A ``principal`` found by the application's own authentication replaces
    ``settings.authenticate``. Returns the finished ``SessionBridge``, or ``None`` if the
    handshake was refused or the client left before it completed.
    """
    message = await receive()
    if message["type"] == "websocket.disconnect":
        return None
    if message["type"] != "websocket.connect":
        raise RuntimeError(f'Expected "websocket.connect", got {message["type"]!r}')
    origin = scope_header(scope, b"origin")
    if refuse_origin(origin, scope_header(scope, b"host"), settings):
        # A close before the accept is sent as an HTTP 403 by every ASGI server.
        await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
        return None
    if principal is None:
        verdict = await authenticate_handshake(settings, lambda: handshake_request(scope))
        if isinstance(verdict, Refusal):
            await refuse_handshake(scope, send, verdict)
            return None
        principal = verdict
    await send({"type": "websocket.accept"})
    client = scope.get("client")
    peer = None if client is None else f"{client[0]}:{client[1]}"
    bridge = SessionBridge(factory, settings, peer=peer, principal=principal)
    await bridge.run(ASGITransport(receive, send, disconnect_errors))
    return bridge

