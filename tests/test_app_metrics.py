"""The dashboard app's ``/metrics`` counts its connections whatever ``Settings.observer`` is."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator

import anyio.to_thread
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from perspective_asgi import SessionObserver, Settings
from perspective_asgi._types import Connection as Observed
from perspective_asgi.app import create_app
from perspective_asgi.edge import create_edge_app
from perspective_asgi.metrics import PrometheusObserver

from ._helpers import connect
from ._servers import serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio

#: Seconds any one wait may take: a loopback handshake and close take milliseconds.
WAIT = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingObserver(SessionObserver):
    """A caller's own observer: records the events it is told, from the server's thread."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.closed = threading.Event()

    def connection_opened(self, bridge: Observed) -> None:
        self.events.append("opened")

    def connection_closed(self, bridge: Observed, code: int | None) -> None:
        self.events.append(f"closed {code}")
        self.closed.set()

    def message_received(self, size: int) -> None:
        self.events.append("received")

    def message_sent(self, size: int) -> None:
        self.events.append("sent")

    def request_handled(self, kind: int | None, seconds: float) -> None:
        self.events.append("handled")


class Served:
    """An app under uvicorn: its websocket URL, and its ``/metrics`` as samples."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.metrics_url = ws_url.replace("ws://", "http://").replace("/websocket", "/metrics")

    async def sample(self, name: str, **labels: str) -> float:
        """The value ``/metrics`` reports for sample ``name`` with ``labels`` (0 if absent)."""
        async with httpx.AsyncClient(timeout=WAIT) as http:
            response = await http.get(self.metrics_url)
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[Served]:
    # Lifespan off: no ticker thread or replica; the websocket route serves all the same.
    async with serve_in_background(uvicorn_main(app)) as ws_url:
        yield Served(ws_url)


async def one_connection(served: Served) -> None:
    """Open a connection, check ``/metrics`` counts it while open, and close it."""
    async with connect(served.ws_url) as conn:
        assert await conn.client.get_hosted_table_names() == []
        assert await served.sample("perspective_connections") == 1


async def wait_closed(observer: RecordingObserver) -> None:
    assert await anyio.to_thread.run_sync(observer.closed.wait, WAIT), "no connection_closed"


def assert_saw_one_connection(observer: RecordingObserver) -> None:
    assert observer.events[0] == "opened"
    assert observer.events[-1] == "closed 1000"
    assert {"received", "handled", "sent"} <= set(observer.events)


async def test_metrics_count_connections_beside_a_callers_observer() -> None:
    mine = RecordingObserver()
    app = create_app(demo=False, settings=Settings(observer=mine))
    async with serving(app) as served:
        await one_connection(served)
        await wait_closed(mine)
        assert await served.sample("perspective_connections") == 0
        assert await served.sample("perspective_closes_total", code="1000") == 1
        assert await served.sample("perspective_messages_total", direction="in") >= 1
    assert_saw_one_connection(mine)
    assert isinstance(app.state.metrics, PrometheusObserver)


class ClosingPrometheusObserver(PrometheusObserver):
    """A caller's ``PrometheusObserver`` that also says when a connection has closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()

    def connection_closed(self, bridge: Observed, code: int | None) -> None:
        super().connection_closed(bridge, code)
        self.closed.set()


async def test_metrics_serve_a_callers_prometheus_observer() -> None:
    mine = ClosingPrometheusObserver()
    app = create_app(demo=False, settings=Settings(observer=mine))
    async with serving(app) as served:
        await one_connection(served)
        assert await anyio.to_thread.run_sync(mine.closed.wait, WAIT), "no connection_closed"
        assert await served.sample("perspective_closes_total", code="1000") == 1
    assert mine.registry.get_sample_value("perspective_closes_total", {"code": "1000"}) == 1
    assert app.state.metrics is mine


async def test_metrics_without_an_observer_count_connections() -> None:
    app = create_app(demo=False)
    async with serving(app) as served:
        await one_connection(served)


async def test_edge_metrics_count_connections_beside_a_callers_observer() -> None:
    # Nothing listens upstream, and without the lifespan the replica never runs: the edge
    # serves its (empty) local server.
    mine = RecordingObserver()
    app = create_edge_app("ws://127.0.0.1:9/websocket", settings=Settings(observer=mine))
    async with serving(app) as served:
        await one_connection(served)
        await wait_closed(mine)
        assert await served.sample("perspective_closes_total", code="1000") == 1
    assert_saw_one_connection(mine)


async def test_cli_serve_app_counts_connections() -> None:
    # The app ``perspective-asgi serve --no-demo`` runs, built from its own arguments.
    from perspective_asgi import cli

    app = cli._build_app(cli._parser().parse_args(["serve", "--no-demo"]))
    async with serving(app) as served:
        await one_connection(served)
