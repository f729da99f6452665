"""The small vocabulary shared by the core and the adapters.

The ASGI names follow the ASGI 3 specification; ``Transport`` is the only thing an adapter must
implement for the core to drive a websocket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol, Union

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: What ``Transport.receive`` hands the core: the payload of one websocket message.
Frame = Union[bytes, bytearray, memoryview, str]  # noqa: UP007 - a runtime alias on 3.10


class Transport(Protocol):
    """One accepted websocket, as seen by the core.

    A transport may also define ``abort()`` (synchronous, never raising): the core calls it
    when ``close`` has not finished within ``Settings.close_timeout``, to drop the TCP
    connection of a peer that stopped reading. An ordinary close is not enough: its FIN waits
    behind the bytes the kernel holds; reset the connection (``SO_LINGER`` 0).
    """

    async def receive(self) -> Frame:
        """Return the next message; raise ``ConnectionClosed`` once the peer has gone."""

    async def send(self, data: bytes) -> None:
        """Send one binary message, waiting while the framework's write buffer is full."""

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket and wait for the closing handshake where the framework lets
        the application wait; must not raise if the peer has already gone."""


class Session(Protocol):
    """What Perspective's ``new_session`` returns; ``close`` is optional (virtual servers)."""

    def handle_request(self, request: bytes, /) -> Any: ...


class SessionFactory(Protocol):
    """``perspective.Server``, ``AsyncServer``, or a virtual server."""

    def new_session(self, callback: Any, /) -> Any: ...


Headers = Mapping[str, str]


class Connection(Protocol):
    """What an observer is told about a connection (a ``SessionBridge``)."""

    #: Names the connection in log records, e.g. ``conn-7 (127.0.0.1:50312)``.
    name: str
    #: Who the client authenticated as; ``None`` without authentication.
    principal: object | None
    #: The close code that ended the connection, once it has ended.
    close_code: int | None

    @property
    def outbox_bytes(self) -> int:
        """Bytes of replies and updates waiting to be handed to the transport."""
