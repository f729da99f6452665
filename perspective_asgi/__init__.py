"""Serve Perspective over websockets from any Python web stack.

The core (``SessionBridge``) bridges a ``perspective.Server`` session to one websocket; the
adapters in ``perspective_asgi.adapters`` fit it to raw ASGI, Starlette/FastAPI, Tornado and
aiohttp. Framework imports happen only in those adapter modules.
"""

from __future__ import annotations

from ._auth import HandshakeRequest
from ._codes import CloseCode
from ._config import Settings
from ._exceptions import (
    AuthenticationFailed,
    ConnectionClosed,
    PerspectiveASGIError,
    ProtocolError,
)
from ._observer import SessionObserver
from ._origin import origin_allowed
from ._policy import Policy
from ._session import SessionBridge, SessionState, close_all_connections
from ._types import Transport
from .adapters.asgi import PerspectiveASGIApp

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "CloseCode",
    "ConnectionClosed",
    "HandshakeRequest",
    "PerspectiveASGIApp",
    "PerspectiveASGIError",
    "Policy",
    "ProtocolError",
    "SessionBridge",
    "SessionObserver",
    "SessionState",
    "Settings",
    "Transport",
    "close_all_connections",
    "origin_allowed",
]
