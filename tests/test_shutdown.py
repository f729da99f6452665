"""Ending connections from the server's side: slow readers and server shutdown, every adapter."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import pytest

from perspective_asgi import CloseCode, Settings

from ._client import perspective_client, stop_reading
from ._servers import ADAPTERS, serve_in_thread
from .conftest import CountingFactory
from .test_protocol import local_table, run

# Slow readers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [Settings(max_send_queue_bytes=256 * 1024, close_timeout=1.0)]
)
def test_slow_reader_is_closed_with_1013(
    url: str,
    perspective_server: Any,
    factory: CountingFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    table = local_table(perspective_server)
    stop = threading.Event()

    def push_updates() -> None:
        # ~50 KB of row deltas per update (unique strings: Arrow's dictionary encoding would
        # shrink repeated ones), until the server gives up on the stalled client.
        for i in range(20_000):
            if stop.is_set() or factory.closed:
                return
            table.update(
                {
                    "id": list(range(100, 200)),
                    "name": [os.urandom(250).hex() for _ in range(100)],
                    "group": ["x"] * 100,
                    "value": [float(i)] * 100,
                }
            )

    async def scenario() -> None:
        async with perspective_client(url) as (client, ws):
            remote = await client.open_table("demo")
            view = await remote.view()
            await view.on_update(lambda *_: None, mode="row")
            await remote.size()
            stop_reading(ws)  # the client stalls; TCP fills up, then the server's queue
            pusher = threading.Thread(target=push_updates)
            pusher.start()
            try:
                async with perspective_client(url) as (healthy, _):
                    # Another client is served normally meanwhile.
                    other = await healthy.open_table("other")
                    assert await other.size() == 3
                    await asyncio.to_thread(_wait_for, lambda: factory.closed >= 1, 30)
            finally:
                stop.set()
                await asyncio.to_thread(pusher.join)
            ws.transport.abort()

    run(scenario(), timeout=90)
    overflow = [r for r in caplog.records if "1013" in r.getMessage()]
    assert overflow and overflow[0].name == "perspective_asgi", [
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _wait_for(condition: Any, timeout: float) -> None:
    deadline = threading.Event()
    for _ in range(int(timeout * 100)):
        if condition():
            return
        deadline.wait(0.01)
    raise AssertionError("condition not met in time")


def test_server_shutdown_closes_sessions(
    adapter: str, factory: CountingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    connected = threading.Event()
    release = threading.Event()
    codes: list[int | None] = []

    async def hold_connection(url: str) -> None:
        async with perspective_client(url) as (client, ws):
            table = await client.open_table("demo")
            view = await table.view()
            await view.on_update(lambda *_: None)
            await table.size()
            connected.set()
            await asyncio.wait_for(ws.wait_closed(), 30)  # the client's reader sees the close
            codes.append(ws.close_code)
            release.set()

    with serve_in_thread(ADAPTERS[adapter](factory, Settings())) as url:
        holder = threading.Thread(target=lambda: run(hold_connection(url)))
        holder.start()
        assert connected.wait(30)
    # Leaving the block stopped the server with the client still connected.
    assert release.wait(30)
    holder.join(30)
    factory.wait_all_closed()
    assert factory.opened == 1
    assert codes and codes[0] in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART), codes
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if adapter == "asgi-hypercorn":
        # Hypercorn's own shutdown logs a cancelled task of its stream protocol; not ours.
        errors = [r for r in errors if r.name != "asyncio"]
    assert not errors, [r.getMessage() for r in errors]
