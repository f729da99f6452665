"""Perspective as a plain ASGI application, which any ASGI server can run.

Run it from this directory under either server, then connect any Perspective client to
ws://127.0.0.1:8080/websocket (the app answers websockets on every path)::

    uvicorn asgi_app:app --port 8080
    hypercorn asgi_app:app --bind 127.0.0.1:8080
"""

from __future__ import annotations

import perspective

from perspective_asgi import PerspectiveASGIApp

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

app = PerspectiveASGIApp(server)
