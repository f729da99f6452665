"""A PostgreSQL database served through Perspective's PostgreSQL virtual server on a Starlette
route, by as many uvicorn workers as you like.

Run it from the repository root with the database's URL in ``DATABASE_URL``, then connect any
Perspective client to ws://127.0.0.1:8080/websocket::

    export DATABASE_URL=postgresql://reader@db.internal/plant
    uvicorn examples.postgres_app:app --port 8080 --workers 4
    python examples/postgres_app.py     # or one process; $PORT changes its port

Every view is a query of the database, which holds all the state: the workers are
interchangeable, and a client's next query sees the rows the database holds then. Tables are
named ``<schema>.<table>``. Needs perspective-python 5.6.1 or later and psycopg
(``pip install 'perspective-asgi[postgres]'``).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE

from perspective_asgi import PerspectiveASGIError, Settings, postgres_server
from perspective_asgi.adapters.starlette import PerspectiveWebSocketRoute

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8080"))


def fail(message: str) -> NoReturn:
    """Print ``message`` as one line and exit with uvicorn's status for a failed start."""
    print(f"postgres_app: {message}", file=sys.stderr)
    # With that status uvicorn's --workers supervisor stops, rather than restart forever
    # workers that would fail the same way.
    sys.exit(STARTUP_FAILURE)


DATABASE_URL = os.environ.get("DATABASE_URL", "")
if not DATABASE_URL:
    fail("set DATABASE_URL to the database's URL, e.g. postgresql://reader@127.0.0.1/plant")
try:
    # Connects once now, so that a bad URL, or a perspective-python without the virtual
    # server, stops the worker with one line (the URL without its password) before it serves.
    DATABASE = postgres_server(DATABASE_URL)
except PerspectiveASGIError as exc:
    fail(str(exc))

SETTINGS = Settings(
    # The data belongs to the database: clients read it, they do not make or change tables.
    read_only=True,
    # Each client session queries on a connection of its own, so one slow query need not
    # hold up the other clients of the worker.
    virtual_server_threads=8,
)

app = Starlette(routes=[PerspectiveWebSocketRoute("/websocket", DATABASE, settings=SETTINGS)])

if __name__ == "__main__":
    uvicorn.run(app, host=HOST, port=PORT)
