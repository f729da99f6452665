"""Hooks through which the core reports what happens on its connections (for metrics, audit).

The core calls them on the connection's event loop, on its hot path: keep them quick, and do
not raise from them (an exception is treated as an internal error of the connection).
"""

from __future__ import annotations

from ._types import Connection


class SessionObserver:
    """Receives events from connections; every hook does nothing unless overridden."""

    def connection_opened(self, bridge: Connection) -> None:
        """A handshake was accepted and its Perspective session created."""

    def connection_closed(self, bridge: Connection, code: int | None) -> None:
        """A connection ended with ``code``: the peer's, or the one the core sent."""

    def connection_refused(self, reason: str) -> None:
        """A connection was refused before any session was created.

        ``reason`` is ``"origin"``, ``"auth"``, ``"max_connections"`` or
        ``"max_connections_per_principal"``.
        """

    def message_received(self, size: int) -> None:
        """A binary message of ``size`` bytes arrived (before it is validated)."""

    def message_sent(self, size: int) -> None:
        """A message of ``size`` bytes was handed to the transport."""

    def request_refused(self, kind: int | None, reason: str) -> None:
        """A request of ``kind`` was refused without reaching the engine.

        ``reason`` is one of ``"read_only"``, ``"table"``, ``"expressions"`` (the policy),
        ``"view"``, ``"views"``, ``"invalid"`` (the view guard) or ``"rate"``.
        """

    def request_handled(self, kind: int | None, seconds: float) -> None:
        """The engine answered a request of ``kind`` (``Request`` field number) in ``seconds``."""


class FanOutObserver(SessionObserver):
    """Passes every event to each of ``observers``, in order (not part of the public API).

    An observer that raises stops the event there, as a lone observer's error would: put
    the one that must not miss an event first.
    """

    def __init__(self, *observers: SessionObserver) -> None:
        self.observers = observers

    def connection_opened(self, bridge: Connection) -> None:
        for observer in self.observers:
            observer.connection_opened(bridge)

    def connection_closed(self, bridge: Connection, code: int | None) -> None:
        for observer in self.observers:
            observer.connection_closed(bridge, code)

    def connection_refused(self, reason: str) -> None:
        for observer in self.observers:
            observer.connection_refused(reason)

    def message_received(self, size: int) -> None:
        for observer in self.observers:
            observer.message_received(size)

    def message_sent(self, size: int) -> None:
        for observer in self.observers:
            observer.message_sent(size)

    def request_refused(self, kind: int | None, reason: str) -> None:
        for observer in self.observers:
            observer.request_refused(kind, reason)

    def request_handled(self, kind: int | None, seconds: float) -> None:
        for observer in self.observers:
            observer.request_handled(kind, seconds)


#: The observer used when ``Settings.observer`` is ``None``.
NULL_OBSERVER = SessionObserver()
