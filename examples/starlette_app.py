"""Perspective on a route of a Starlette application, served by uvicorn.

Run it, then connect any Perspective client to ws://127.0.0.1:8080/websocket (``$PORT`` changes
the port)::

    python examples/starlette_app.py
"""

from __future__ import annotations

import os

import perspective
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from perspective_asgi.adapters.starlette import PerspectiveWebSocketRoute


def perspective_server() -> perspective.Server:
    """Return a Perspective server hosting one small table, "sales"."""
    server = perspective.Server()
    server.new_local_client().table(
        {
            "region": ["North", "South", "East", "West"],
            "units": [120, 95, 143, 88],
            "price": [9.5, 11.0, 8.75, 12.25],
        },
        name="sales",
        index="region",
    )
    return server


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"Perspective is served at {request.url_for('perspective')}\n")


app = Starlette(
    routes=[
        Route("/", index),
        PerspectiveWebSocketRoute("/websocket", perspective_server()),  # named "perspective"
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
