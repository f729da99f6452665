"""Perspective behind a FastAPI ``@app.websocket`` endpoint with a dependency, under uvicorn.

Run it, then connect any Perspective client to ws://127.0.0.1:8080/websocket (``$PORT`` changes
the port)::

    python examples/fastapi_app.py

FastAPI resolves the endpoint's dependencies before the handshake is accepted, so a dependency
can refuse the connection (raise ``WebSocketException``), authenticate the user, or, as here,
choose the Perspective server, which tests can replace through ``app.dependency_overrides``.
"""

from __future__ import annotations

import os
from typing import Annotated

import perspective
import uvicorn
from fastapi import Depends, FastAPI, WebSocket

from perspective_asgi.adapters.starlette import PerspectiveStarletteHandler

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8080"))

SERVER = perspective.Server()
SERVER.new_local_client().table(
    {
        "region": ["North", "South", "East", "West"],
        "units": [120, 95, 143, 88],
        "price": [9.5, 11.0, 8.75, 12.25],
    },
    name="sales",
    index="region",
)


def perspective_server() -> perspective.Server:
    """Return the Perspective server that websocket clients reach."""
    return SERVER


app = FastAPI()


@app.websocket("/websocket")
async def websocket(
    websocket: WebSocket,
    server: Annotated[perspective.Server, Depends(perspective_server)],
) -> None:
    await PerspectiveStarletteHandler(perspective_server=server, websocket=websocket).run()


if __name__ == "__main__":
    uvicorn.run(app, host=HOST, port=PORT)
