"""An edge server: ``uvicorn perspective_asgi.edge:app`` (or ``perspective-asgi edge URL``).

It replicates an upstream Perspective server's tables (see ``perspective_asgi.replica``) and
serves them with the dashboard app: ``/``, ``/websocket``, ``/metrics``, ``/healthz``
(liveness, with the replica's status) and ``/readyz`` (503 while not synchronised). Several
workers (``--workers N``) are several independent replicas, each a subscriber of the upstream.

Configured from the environment, so every worker process builds the same app:

- ``PERSPECTIVE_ASGI_UPSTREAM``: the upstream's websocket URL (required);
- ``PERSPECTIVE_ASGI_EDGE_TABLES``: comma-separated table names (default: all, following
  the upstream's list);
- ``PERSPECTIVE_ASGI_READ_ONLY``: ``1`` refuses changes from the edge's clients (changes made
  at an edge would be overwritten by the upstream's anyway).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette

from ._config import Settings
from .app import READ_ONLY_ENV, TRUE_VALUES, create_app
from .replica import Replica

__all__ = ["EDGE_TABLES_ENV", "UPSTREAM_ENV", "create_edge_app", "edge_options_from_env"]

UPSTREAM_ENV = "PERSPECTIVE_ASGI_UPSTREAM"
EDGE_TABLES_ENV = "PERSPECTIVE_ASGI_EDGE_TABLES"


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


def edge_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return ``create_edge_app`` arguments from the environment; ``ValueError`` if unusable."""
    environ = os.environ if environ is None else environ
    upstream = environ.get(UPSTREAM_ENV, "").strip()
    if not upstream.startswith(("ws://", "wss://")):
        raise ValueError(f"{UPSTREAM_ENV} must be a ws:// or wss:// URL, got {upstream!r}")
    names = [name.strip() for name in environ.get(EDGE_TABLES_ENV, "").split(",")]
    read_only = environ.get(READ_ONLY_ENV, "").strip().lower() in TRUE_VALUES
    return {
        "upstream": upstream,
        "tables": [name for name in names if name] or None,
        "settings": Settings(read_only=read_only),
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
