"""Perspective as a plain ASGI application, served by uvicorn.

Run it, then connect any Perspective client to ws://127.0.0.1:8080/websocket (the app answers
websockets on every path; ``$PORT`` changes the port)::

    python examples/asgi_uvicorn.py

The same app object runs under any ASGI server: ``uvicorn asgi_uvicorn:app --app-dir examples``
or ``hypercorn examples/asgi_uvicorn:app``.
"""

from __future__ import annotations

import os

import perspective
import uvicorn

from perspective_asgi import PerspectiveASGIApp

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8080"))


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


app = PerspectiveASGIApp(perspective_server())

if __name__ == "__main__":
    uvicorn.run(app, host=HOST, port=PORT)
