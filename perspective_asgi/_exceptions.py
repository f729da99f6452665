"""Errors raised by perspective-asgi.

    PerspectiveASGIError
     ├── ConnectionClosed      the peer closed or dropped the websocket
     ├── ProtocolError         a frame that is not a Perspective request
     ├── AuthenticationFailed  raised by ``Settings.authenticate`` to refuse a handshake
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


class AuthenticationFailed(PerspectiveASGIError):
    """Refuses a websocket handshake from ``Settings.authenticate`` with ``status`` 401 or 403."""

    def __init__(self, status: int = 401, reason: str = "authentication required") -> None:
        if status not in (401, 403):
            raise ValueError(f"AuthenticationFailed status must be 401 or 403, got {status!r}")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class LoadError(PerspectiveASGIError, ValueError):
    """A data file that cannot be served; the message names the file and what is wrong with it."""


class UpstreamUnavailable(PerspectiveASGIError):
    """An edge could not carry a write to its upstream; the message says whether it was
    applied there."""
