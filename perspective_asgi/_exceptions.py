"""Errors raised by perspective-asgi.

    PerspectiveASGIError
     ├── ConnectionClosed      the peer closed or dropped the websocket
     ├── ProtocolError         a frame that is not a Perspective request
     └── LoadError             a data file that cannot be served (also a ValueError)
"""

from __future__ import annotations

from ._codes import CloseCode


class PerspectiveASGIError(Exception):
    """Base class of every error this package raises on purpose."""


class ConnectionClosed(PerspectiveASGIError):
    """The websocket is closed; ``code`` is the close code the peer sent (1005 if none)."""

    def __init__(self, code: int = CloseCode.NO_STATUS_RECEIVED, reason: str = "") -> None:
        super().__init__(f"connection closed with code {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class ProtocolError(PerspectiveASGIError):
    """An inbound frame the core refuses; ``code`` is the close code it warrants."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LoadError(PerspectiveASGIError, ValueError):
    """A data file that cannot be served; the message names the file and what is wrong with it."""
