"""The Prometheus observer, fed by real traffic through every adapter and scraped as text."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
import websockets
from prometheus_client import generate_latest

from perspective_asgi import Settings
from perspective_asgi.metrics import PrometheusObserver

from ._helpers import SCENARIO_TIMEOUT, CountingFactory, Samples, connect, metric_samples, until

pytestmark = pytest.mark.anyio


@pytest.fixture
def observer() -> PrometheusObserver:
    return PrometheusObserver()


@pytest.fixture
def settings(observer: PrometheusObserver) -> Settings:
    return Settings(observer=observer)


def scrape(observer: PrometheusObserver) -> Samples:
    return metric_samples(generate_latest(observer.registry).decode())


def samples(scraped: Samples,
            name: str) -> Iterator[tuple[dict[str, str], float]]:
    for (sample, labels), value in scraped.items():
        if sample == name:
            yield dict(labels), value


async def test_metrics_after_traffic(
    url: str, observer: PrometheusObserver, factory: CountingFactory
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            table = await conn.client.open_table("demo")
            for _ in range(3):
                assert await table.size() == 4
            view = await table.view(group_by=["group"])
            await view.to_arrow()
            during = scrape(observer)
            assert during[("perspective_connections", ())] == 1
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(url, origin="http://evil.example"):
                pass
        async with websockets.connect(url) as ws:
            await ws.send("text")
            await ws.wait_closed()

    await factory.all_closed()
    # A connection's session is closed a moment before its task reports the end.
    await until(lambda: scrape(observer)[("perspective_connections", ())] == 0)
    scraped = scrape(observer)
    received = scraped[("perspective_messages_total", (("direction", "in"),))]
    sent = scraped[("perspective_messages_total", (("direction", "out"),))]
    # open_table, 3 x size, make_view, to_arrow and one text frame in; a reply to each request
    assert received >= 7
    assert sent >= 6
    assert scraped[("perspective_message_bytes_total", (("direction", "out"),))] > 100
    latency = samples(scraped, "perspective_request_seconds_count")
    kinds = {labels["kind"]: value for labels, value in latency}
    assert kinds["table_size"] == 3
    assert kinds["table_make_view"] == 1
    assert kinds["view_to_arrow"] == 1
    ended = samples(scraped, "perspective_closes_total")
    closes = {labels["code"]: value for labels, value in ended}
    assert closes["1003"] == 1
    assert sum(closes.values()) == 2
    refusals = samples(scraped, "perspective_refused_connections_total")
    refused = {labels["reason"]: value for labels, value in refusals}
    assert refused == {"origin": 1}
    assert scraped[("perspective_send_queue_bytes", ())] == 0


async def test_shared_view_metrics(
    url: str, observer: PrometheusObserver, factory: CountingFactory
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as first, connect(url) as second, connect(url) as third:
            for conn in (first, second):
                await (await conn.client.open_table("demo")).view(group_by=["group"])
            await (await third.client.open_table("demo")).view()
            during = scrape(observer)
    assert during[("perspective_shared_views", ())] == 2
    assert during[("perspective_view_aliases", ())] == 3
    assert during[("perspective_engine_views_saved", ())] == 1
    await factory.all_closed()
    after = scrape(observer)
    assert after[("perspective_shared_views", ())] == 0
    assert after[("perspective_view_aliases", ())] == 0
