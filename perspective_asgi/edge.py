"""An edge server: ``uvicorn perspective_asgi.edge:app`` (or ``perspective-asgi edge URL``).

It replicates an upstream Perspective server's tables (see ``perspective_asgi.replica``) and
serves them with the dashboard app: ``/``, ``/websocket``, ``/metrics``, ``/healthz``
(liveness, with the replica's status) and ``/readyz`` (503 while not synchronised). Several
workers (``--workers N``) are several independent replicas, each a subscriber of the upstream.

Configured from the environment, so every worker process builds the same app:

- ``PERSPECTIVE_ASGI_UPSTREAM``: the upstream's websocket URL (required);
- ``PERSPECTIVE_ASGI_EDGE_TABLES``: comma-separated table names (default: all, following
  the upstream's list);
- ``PERSPECTIVE_ASGI_READ_ONLY``: ``1`` refuses changes from the edge's clients; by default
  their writes to replicated tables are carried to the upstream (``perspective_asgi._forward``);
- ``PERSPECTIVE_ASGI_UPSTREAM_HEADERS``: handshake headers for the upstream, a JSON object;
- ``PERSPECTIVE_ASGI_UPSTREAM_HEADER_FILE``: a file of ``Name: value`` lines, read again before
  every connection to the upstream, so a credential rotated on disk is used at the next one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from ._auth import parse_header
from ._config import Settings
from .app import READ_ONLY_ENV, TRUE_VALUES, create_app
from .client import HeadersSource
from .replica import Replica

__all__ = [
    "EDGE_TABLES_ENV",
    "HEADERS_ENV",
    "HEADER_FILE_ENV",
    "UPSTREAM_ENV",
    "create_edge_app",
    "edge_options_from_env",
    "read_header_file",
]

logger = logging.getLogger("perspective_asgi.edge")

UPSTREAM_ENV = "PERSPECTIVE_ASGI_UPSTREAM"
EDGE_TABLES_ENV = "PERSPECTIVE_ASGI_EDGE_TABLES"
HEADERS_ENV = "PERSPECTIVE_ASGI_UPSTREAM_HEADERS"
HEADER_FILE_ENV = "PERSPECTIVE_ASGI_UPSTREAM_HEADER_FILE"


def create_edge_app(
    upstream: str,
    *,
    tables: list[str] | None = None,
    settings: Settings | None = None,
    **replica_options: Any,
) -> Starlette:
    """Return the dashboard app serving replicas of ``upstream``'s tables."""
    replica = Replica(upstream, tables=tables, **replica_options)
    return create_app(demo=False, settings=settings, replica=replica)


def read_header_file(path: str | Path) -> dict[str, str]:
    """The headers in a file of ``Name: value`` lines; blank lines and ``#`` comments are
    skipped. ``ValueError`` names the line that is neither; ``OSError`` if it is unreadable."""
    headers: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            name, value = parse_header(line)
        except argparse.ArgumentTypeError:
            raise ValueError(f"{path}, line {number}: expected 'Name: value'") from None
        headers[name] = value
    return headers


def _upstream_headers(static: Mapping[str, str], path: str) -> HeadersSource:
    if not path:
        return dict(static) or None
    read_header_file(path)  # now, so a bad file stops the edge before it starts

    def current() -> dict[str, str]:
        headers = dict(static)
        try:
            headers.update(read_header_file(path))
        except (OSError, ValueError) as exc:
            # Mid-rotation, say: the upstream refuses the stale credential and the replica
            # retries, reading the file again.
            logger.warning("upstream headers: %s; connecting without them", exc)
        return headers

    return current


def edge_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return ``create_edge_app`` arguments from the environment; ``ValueError`` if unusable."""
    environ = os.environ if environ is None else environ
    upstream = environ.get(UPSTREAM_ENV, "").strip()
    if not upstream.startswith(("ws://", "wss://")):
        raise ValueError(f"{UPSTREAM_ENV} must be a ws:// or wss:// URL, got {upstream!r}")
    names = [name.strip() for name in environ.get(EDGE_TABLES_ENV, "").split(",")]
    read_only = environ.get(READ_ONLY_ENV, "").strip().lower() in TRUE_VALUES
    try:
        static = json.loads(environ.get(HEADERS_ENV, "").strip() or "{}")
    except json.JSONDecodeError:
        static = None
    if not isinstance(static, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in static.items()
    ):
        raise ValueError(f"{HEADERS_ENV} must be a JSON object of strings")
    path = environ.get(HEADER_FILE_ENV, "").strip()
    try:
        headers = _upstream_headers(static, path)
    except OSError as exc:
        raise ValueError(f"{HEADER_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
    return {
        "upstream": upstream,
        "tables": [name for name in names if name] or None,
        "settings": Settings(read_only=read_only),
        "headers": headers,
    }


def __getattr__(name: str) -> Starlette:
    # Built on first access by the ASGI server, in each worker process.
    if name == "app":
        try:
            app = create_edge_app(**edge_options_from_env())
        except ValueError as exc:
            raise SystemExit(f"perspective-asgi: error: {exc}") from None
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
