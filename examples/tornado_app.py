"""Perspective on a Tornado ``WebSocketHandler`` route.

Run it, then connect any Perspective client to ws://127.0.0.1:8080/websocket (``$PORT`` changes
the port); Ctrl-C or SIGTERM stops it after closing open connections::

    python examples/tornado_app.py

An app written for Perspective's own handler switches by its import line alone: replace
``from perspective.handlers.tornado import PerspectiveTornadoHandler`` with the one below.
"""

from __future__ import annotations

import asyncio
import os
import signal

import perspective
import tornado.web

from perspective_asgi import close_all_connections
from perspective_asgi.adapters.tornado import PerspectiveTornadoHandler

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


async def main() -> None:
    app = tornado.web.Application(
        [(r"/websocket", PerspectiveTornadoHandler, {"perspective_server": perspective_server()})]
    )
    http = app.listen(PORT, address="127.0.0.1")
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # POSIX only
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print(f"Serving Perspective on ws://127.0.0.1:{PORT}/websocket", flush=True)
    await stop.wait()
    http.stop()
    # Tornado leaves websockets open when its server stops: close them with 1001 (going away).
    await close_all_connections()
    await http.close_all_connections()


if __name__ == "__main__":
    asyncio.run(main())
