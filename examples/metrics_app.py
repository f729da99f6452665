"""Prometheus metrics of every Perspective connection, served at ``/metrics`` beside the
websocket.

Run it, then connect any Perspective client to ws://127.0.0.1:8080/websocket and read
http://127.0.0.1:8080/metrics (``$PORT`` changes the port)::

    python examples/metrics_app.py
    prometheus --config.file=examples/prometheus.yml    # scrapes it every 15 s

``grafana-dashboard.json``, beside this file, is a Grafana dashboard of these metrics. Needs
the ``metrics`` extra (prometheus-client).
"""

from __future__ import annotations

import os

import perspective
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from perspective_asgi import Settings
from perspective_asgi.adapters.starlette import PerspectiveWebSocketRoute
from perspective_asgi.metrics import PrometheusObserver

observer = PrometheusObserver()  # its own registry: nothing else's metrics are mixed in

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


async def metrics(request: Request) -> Response:
    return Response(generate_latest(observer.registry), media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[
        Route("/metrics", metrics),
        PerspectiveWebSocketRoute("/websocket", server, settings=Settings(observer=observer)),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
