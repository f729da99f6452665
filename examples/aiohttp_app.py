"""Perspective on an aiohttp route.

Run it, then connect any Perspective client to ws://127.0.0.1:8080/websocket (``$PORT`` changes
the port); Ctrl-C or SIGTERM stops it after closing open connections::

    python examples/aiohttp_app.py
"""

from __future__ import annotations

import os

import perspective
from aiohttp import web

from perspective_asgi import close_all_connections
from perspective_asgi.adapters.aiohttp import PerspectiveAIOHTTPHandler

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


def make_app() -> web.Application:
    """Return the aiohttp application serving Perspective at ``/websocket``."""
    server = perspective_server()

    async def websocket(request: web.Request) -> web.StreamResponse:
        return await PerspectiveAIOHTTPHandler(perspective_server=server, request=request).run()

    async def close_websockets(app: web.Application) -> None:
        # aiohttp would cancel the handlers, which clients see as 1006: close them with 1001.
        await close_all_connections()

    app = web.Application()
    app.router.add_get("/websocket", websocket)
    app.on_shutdown.append(close_websockets)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=PORT)
