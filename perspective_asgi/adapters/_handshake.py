"""What every adapter does with a websocket handshake before accepting it: origin, then auth.

The same-origin rule comes first.

Browsers attach cookies and HTTP auth to cross-site websocket handshakes, and no CORS check
protects a websocket; so a page on any site could drive a user's Perspective session unless
the server compares the ``Origin`` header with its own host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

from .._auth import HandshakeRequest
from .._config import Settings
from .._exceptions import AuthenticationFailed

logger = logging.getLogger("perspective_asgi")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parsed = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parsed.port
    except ValueError:
        return netloc.lower(), None
    return (parsed.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def origin_allowed(origin: str | None, host: str | None, settings: Settings) -> bool:
    """Return whether a handshake with this ``Origin`` and ``Host`` header may be accepted."""
    if origin is None:
        return settings.allow_missing_origin
    normalised = origin.strip().lower().rstrip("/")
    if "*" in settings.allowed_origins or normalised in settings.allowed_origins:
        return True
    parts = urlsplit(normalised)
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        # Sandboxed frames and file:// pages send "null"; they are never same-origin.
        return False
    # The Host header carries no scheme; a default port is implied by the origin's scheme.
    return _host_port(parts.netloc, parts.scheme) == _host_port(host.strip(), parts.scheme)


def refuse_origin(origin: str | None, host: str | None, settings: Settings) -> bool:
    """Return whether to refuse a handshake for its origin; a refusal is reported."""
    if origin_allowed(origin, host, settings):
        return False
    if settings.observer is not None:
        settings.observer.connection_refused("origin")
    return True


class Refusal(NamedTuple):
    """Why a handshake is refused: the HTTP status to answer with, and a short text."""

    status: int
    reason: str


async def authenticate_handshake(
    settings: Settings, request: Callable[[], HandshakeRequest]
) -> object | Refusal:
    """Run ``settings.authenticate`` on a handshake; return its principal or a ``Refusal``.

    Without a hook every handshake is accepted with the principal ``None``. ``request`` is
    called only when there is a hook, so unauthenticated servers parse nothing.
    """
    hook = settings.authenticate
    if hook is None:
        return None
    refusal: Refusal
    try:
        principal = await hook(request())
    except AuthenticationFailed as exc:
        refusal = Refusal(exc.status, exc.reason)
    except Exception:
        # Never accept a connection whose credentials could not be checked.
        logger.exception("the authenticate hook raised; refusing the handshake with 500")
        refusal = Refusal(500, "internal error")
    else:
        if principal is not None:
            return principal
        refusal = Refusal(401, "authentication required")
    if settings.observer is not None:
        settings.observer.connection_refused("auth")
    return refusal
