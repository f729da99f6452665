"""Limits trip at exactly the configured numbers, over every adapter, and are counted."""

from __future__ import annotations

import asyncio

import anyio
import pytest
import websockets
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from perspective_asgi import AuthenticationFailed, HandshakeRequest, Settings
from perspective_asgi._core.limits import TokenBucket
from perspective_asgi._core.wire import read_envelope
from perspective_asgi.metrics import PrometheusObserver

from ._helpers import (
    SCENARIO_TIMEOUT,
    WAIT,
    CountingFactory,
    make_view_frame,
    reply,
    request,
    server_error,
    still_serving,
)

pytestmark = pytest.mark.anyio

OBSERVER = PrometheusObserver()


def counter(name: str, **labels: str) -> float:
    """The value of one sample of OBSERVER's metrics (0 if it was never counted)."""
    text = generate_latest(OBSERVER.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def answered(ws: websockets.ClientConnection, msg_id: int = 77) -> None:
    """One round trip: the connection was admitted and is served."""
    await ws.send(request(msg_id, "demo", 8))
    assert read_envelope(await reply(ws)).msg_id == msg_id


async def closed_with(ws: websockets.ClientConnection) -> int | None:
    """The close code of ``ws``, which the server must close before sending anything else."""
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), WAIT)
    return ws.close_code


@pytest.mark.parametrize(
    "settings", [Settings(max_connections=2, observer=OBSERVER)], ids=["max_connections=2"]
)
async def test_max_connections(url: str, factory: CountingFactory) -> None:
    before = counter("perspective_refused_connections_total", reason="max_connections")

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            await answered(first)
            await answered(second)
            sessions = factory.opened
            async with websockets.connect(url) as third:
                assert await closed_with(third) == 1013
                assert "max_connections reached" in (third.close_reason or "")
            assert factory.opened == sessions, "a refused connection must not get a session"
        # Both closed: there is room again.
        await still_serving(url)

    after = counter("perspective_refused_connections_total", reason="max_connections")
    assert after == before + 1


async def by_token(request: HandshakeRequest) -> object:
    token = request.query.get("token")
    if not token:
        raise AuthenticationFailed(401, "token required")
    return token


@pytest.mark.parametrize(
    "settings",
    [Settings(authenticate=by_token, max_connections_per_principal=2)],
    ids=["per_principal=2"],
)
async def test_max_connections_per_principal(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        alice = f"{url}?token=alice"
        async with websockets.connect(alice) as a1, websockets.connect(alice) as a2:
            await answered(a1)
            await answered(a2)
            async with websockets.connect(alice) as a3:
                assert await closed_with(a3) == 1013
                assert "max_connections_per_principal" in (a3.close_reason or "")
            async with websockets.connect(f"{url}?token=bob") as bob:
                await answered(bob)  # another principal is not affected
        await still_serving(alice)


@pytest.mark.parametrize(
    "settings",
    [Settings(max_views_per_connection=3, observer=OBSERVER)],
    ids=["max_views=3"],
)
async def test_max_views_per_connection(url: str) -> None:
    before = counter("perspective_refused_requests_total", reason="views")

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            for msg_id in (1, 2, 3):
                await ws.send(make_view_frame("demo", f"v{msg_id}", msg_id=msg_id))
                assert read_envelope(await reply(ws)).kind == 6
            await ws.send(make_view_frame("demo", "v4", msg_id=4))
            assert "too many views" in server_error(await reply(ws))[2]
            await ws.send(request(5, "v2", 11))  # view_delete frees one
            assert read_envelope(await reply(ws)).kind == 11
            await ws.send(make_view_frame("demo", "v4", msg_id=6))
            assert read_envelope(await reply(ws)).kind == 6
            # Another connection has its own allowance.
            async with websockets.connect(url) as other:
                await other.send(make_view_frame("demo", "w1", msg_id=1))
                assert read_envelope(await reply(other)).kind == 6

    assert counter("perspective_refused_requests_total", reason="views") == before + 1


@pytest.mark.parametrize(
    "settings",
    [Settings(max_requests_per_second=0.001, request_burst=5, max_violations=0,
              observer=OBSERVER)],
    ids=["burst=5"],
)
async def test_request_rate(url: str) -> None:
    before = counter("perspective_refused_requests_total", reason="rate", kind="table_size")

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            for msg_id in range(1, 6):
                await ws.send(request(msg_id, "demo", 8))
                assert read_envelope(await reply(ws)).kind == 8
            for msg_id in range(6, 26):
                await ws.send(request(msg_id, "demo", 8))
                got = server_error(await reply(ws))
                assert got[0] == msg_id and "rate limit" in got[2]
            # Throttled, not judged: even with max_violations=0 the connection stays open.
            await ws.ping()
        await still_serving(url)  # the bucket is per connection

    after = counter("perspective_refused_requests_total", reason="rate", kind="table_size")
    assert after == before + 20


def test_token_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 10.0  # refills to the burst, not beyond
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_connections", 0), ("max_views_per_connection", -1), ("max_violations", -1),
     ("max_requests_per_second", 0), ("request_burst", 0)],
)
def test_limits_are_validated(name: str, value: int) -> None:
    options: dict[str, object] = {name: value}
    if name == "request_burst":
        options["max_requests_per_second"] = 1.0
    with pytest.raises(ValueError, match=name):
        Settings(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_burst needs"):
        Settings(request_burst=3)
