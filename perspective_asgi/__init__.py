"""Serve Perspective over websockets from any Python web stack.

The core (``SessionBridge``) bridges a ``perspective.Server`` session to one websocket; the
adapters in ``perspective_asgi.adapters`` fit it to raw ASGI, Starlette/FastAPI, Tornado and
aiohttp. Framework imports happen only in those adapter modules.
"""

from __future__ import annotations

from ._auth import HandshakeRequest
from ._codes import CloseCode
from ._config import Settings
from ._core.bridge import SessionBridge, SessionState
from ._core.policy import Policy
from ._core.registry import close_all_connections
from ._exceptions import (
    AuthenticationFailed,
    ConnectionClosed,
    PerspectiveASGIError,
    ProtocolError,
)
from ._loaders import postgres_server
from ._observer import SessionObserver
from ._types import Transport
from .adapters._handshake import origin_allowed
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
    "postgres_server",
]
