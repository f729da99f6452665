"""Keepalive pings find dead peers (Tornado, aiohttp); the idle timeout closes silent clients."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from urllib.parse import urlsplit

import anyio
import pytest
import websockets

from perspective_asgi import Settings

from ._helpers import SCENARIO_TIMEOUT, WAIT, CountingFactory, make_view_frame, reply, request
from ._servers import ADAPTERS, serve_in_thread

pytestmark = pytest.mark.anyio


def open_silent_peer(url: str) -> socket.socket:
    """Complete a websocket handshake on a raw socket that will never answer a ping."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the server closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """Read (and ignore) what the server sends until it closes the TCP connection."""
    started = time.monotonic()
    sock.settimeout(limit)
    while sock.recv(4096):
        pass
    return time.monotonic() - started


@pytest.mark.parametrize("adapter", ["tornado", "aiohttp"])
def test_a_peer_that_stops_answering_pings_is_dropped(
    adapter: str, factory: CountingFactory
) -> None:
    settings = Settings(ping_interval=0.3, ping_timeout=0.3)
    with serve_in_thread(ADAPTERS[adapter](factory, settings)) as url:
        peer = open_silent_peer(url)
        try:
            assert factory.wait_opened(1), "the silent peer got no session"
            # Pings every 0.3 s, no pong within 0.3 s (aiohttp: half the interval): closed.
            # Tornado then waits 5 s more for the peer's closing handshake, its own rule.
            factory.wait_all_closed(timeout=8.0 if adapter == "tornado" else 3.0)
            assert factory.opened == 1
            assert seconds_until_closed(peer, WAIT) < WAIT
        finally:
            peer.close()


@pytest.mark.parametrize("adapter", ["tornado", "aiohttp"])
def test_pings_off(adapter: str, factory: CountingFactory) -> None:
    with serve_in_thread(ADAPTERS[adapter](factory, Settings(ping_interval=None))) as url:
        peer = open_silent_peer(url)
        try:
            with pytest.raises(TimeoutError):
                seconds_until_closed(peer, 1.5)
        finally:
            peer.close()


@pytest.fixture
def settings() -> Settings:
    return Settings(idle_timeout=0.5)


async def test_idle_connections_are_closed_unless_they_hold_views(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as silent:
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(silent.recv(), WAIT)
            assert (silent.close_code, silent.close_reason) == (1000, "idle timeout")
            assert 0.4 < time.monotonic() - started < 3.0

        async with websockets.connect(url) as watcher:
            await watcher.send(make_view_frame("demo", "watched", msg_id=1))
            assert (await reply(watcher))
            # Idle on purpose, the subject of the test: three idle periods, and a view
            # holder stays.
            await asyncio.sleep(1.5)
            await watcher.send(request(2, "watched", 12))  # view_dimensions
            assert (await reply(watcher))
            await watcher.send(request(3, "watched", 11))  # view_delete: nothing held now
            assert (await reply(watcher))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(watcher.recv(), WAIT)
            assert watcher.close_code == 1000


@pytest.mark.parametrize(
    ("name", "value"), [("ping_interval", 0), ("ping_timeout", -1), ("idle_timeout", 0)]
)
def test_timeouts_are_validated(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})  # type: ignore[arg-type]
