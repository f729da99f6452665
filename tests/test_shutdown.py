"""Ending connections from the server's side, on every adapter: server shutdown, slow readers.

Each bound is the documented one plus ``MARGIN``. A client that answers the close frame is let
go at once; one that stopped reading is reset ``close_timeout`` after the close, and a shutdown
never waits longer than that (plus what the server itself waits first, ``SERVER_GRACE``). The
stacks in ``CANNOT_ABORT`` give the application no way to reset a connection: their tests
assert what happens there instead (SECURITY.md, "Not covered").
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest

from perspective_asgi import CloseCode, Settings

from ._helpers import SCENARIO_TIMEOUT, CountingFactory, connect, in_thread, local_table
from ._servers import ADAPTERS, serve_in_thread

pytestmark = pytest.mark.anyio

#: Small, so that a close which waits it out is quick to tell from one that does not.
CLOSE_TIMEOUT = 1.0
#: What a loaded test machine may add to a documented bound.
MARGIN = 1.5
#: How long a wait that should end within its bound may go on, to measure a fault.
MEASURE_UP_TO = SCENARIO_TIMEOUT / 2

#: How late a client answers the close frame: a round trip away, as across a network, and so
#: after a server that does not wait for the answer has already stopped.
CLIENT_LATENCY = 0.25

#: Seconds a server waits on its own at shutdown before the application hears of it: hypercorn
#: lets running tasks go on for ``graceful_timeout`` (2 s in ``tests/_servers.py``), then
#: cancels them.
SERVER_GRACE = {"asgi-hypercorn": 2.0}

#: ASGI hands the application no transport, and neither uvicorn nor hypercorn drops a peer
#: that stopped reading: both end the connection with an ordinary close, whose FIN waits
#: behind the bytes already queued, and both wait for it at shutdown.
CANNOT_ABORT = frozenset({"asgi-uvicorn", "asgi-hypercorn", "starlette", "fastapi"})

TCP_ESTABLISHED = 1


# Helpers ------------------------------------------------------------------------------------


class LiveServer:
    """One adapter's server in its own thread, which the test stops with clients connected."""

    def __init__(self, adapter: str, factory: CountingFactory, settings: Settings) -> None:
        self._serving = serve_in_thread(ADAPTERS[adapter](factory, settings))
        self._running = False
        self.url = ""
        #: Seconds the last ``stop`` took; ``None`` until one has returned.
        self.stop_seconds: float | None = None

    async def stop(self) -> None:
        """Stop the server as its shutdown path does, and note how long that took."""
        self._running = False
        started = time.monotonic()
        # In a thread: the clients on this event loop must go on answering the server.
        await in_thread(self._serving.__exit__, None, None, None)
        self.stop_seconds = time.monotonic() - started

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, adapter: str, factory: CountingFactory, settings: Settings
    ) -> AsyncIterator[LiveServer]:
        server = cls(adapter, factory, settings)
        server.url = await in_thread(server._serving.__enter__)
        server._running = True
        try:
            yield server
        finally:
            if server._running:
                await server.stop()


class ClientSocket:
    """The client's end of a TCP connection, watched in the kernel without reading its data."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._fd = sock.fileno()

    def state(self) -> int:
        """The kernel's TCP state (``tcpi_state``, the first byte of ``struct tcp_info``)."""
        return int(self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])

    def wait_hangup(self, timeout: float) -> float | None:
        """Wait until the server resets or half-closes the connection; return the seconds it
        took, ``None`` if it did not within ``timeout``.

        Only hang-ups are waited for: the unread data a stalled client holds does not count.
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        started = time.monotonic()
        return time.monotonic() - started if poller.poll(timeout * 1000) else None


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the garbage collector: a socket that only the collector would close (its owner in
    a reference cycle) then stays open, as it can for minutes in a busy process, instead of
    closing whenever a collection happens to run."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: What one update of ``_push_updates`` sends a subscriber, about.
UPDATE_BYTES = 50_000


def _socket_buffers_bytes() -> int:
    """The most a client's receive buffer and a server's send buffer may grow to, together."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as limits:
            total += int(limits.read().split()[-1])
    return total


def _push_updates(table: Any, count: int, stop: Callable[[], bool] = lambda: False) -> None:
    # UPDATE_BYTES of row deltas per update (unique strings: Arrow's dictionary encoding would
    # shrink repeated ones).
    for i in range(count):
        if stop():
            return
        table.update(
            {
                "id": list(range(100, 200)),
                "name": [os.urandom(250).hex() for _ in range(100)],
                "group": ["x"] * 100,
                "value": [float(i)] * 100,
            }
        )


async def _subscribe(conn: Any) -> None:
    table = await conn.client.open_table("demo")
    view = await table.view()
    await view.on_update(lambda *_: None, mode="row")
    await table.size()


def _errors(caplog: pytest.LogCaptureFixture, adapter: str) -> list[str]:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if adapter == "asgi-hypercorn":
        # Hypercorn's own shutdown logs a cancelled task of its stream protocol; not ours.
        errors = [r for r in errors if r.name != "asyncio"]
    return [r.getMessage() for r in errors]


# Server shutdown ----------------------------------------------------------------------------


# Long enough that a client which answers the close frame is let go well before it runs out.
@pytest.mark.parametrize("settings", [Settings(close_timeout=2 * CLOSE_TIMEOUT)])
async def test_server_shutdown_closes_sessions(
    adapter: str, factory: CountingFactory, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    grace = SERVER_GRACE.get(adapter, 0.0)
    with anyio.fail_after(SCENARIO_TIMEOUT), collector_paused():
        async with LiveServer.running(adapter, factory, settings) as server, connect(
            server.url
        ) as conn:
            await _subscribe(conn)
            async with anyio.create_task_group() as tasks:
                started = time.monotonic()
                conn.ws.transport.pause_reading()
                tasks.start_soon(server.stop)
                await anyio.sleep(CLIENT_LATENCY)
                conn.ws.transport.resume_reading()
                # Until the TCP connection is over, not just until the close frame came (the
                # client's own reader reads that frame meanwhile).
                await conn.ws.wait_closed()
                ended = time.monotonic() - started
    assert conn.ws.close_code in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART)
    # The client answered the close frame: the server ended the connection then, without
    # waiting for close_timeout to run out, and not later than its own shutdown.
    assert ended < grace + settings.close_timeout, f"the connection ended {ended:.2f} s in"
    assert server.stop_seconds is not None
    assert server.stop_seconds < grace + settings.close_timeout, server.stop_seconds
    await factory.all_closed()
    assert factory.opened == 1
    assert not _errors(caplog, adapter)


@pytest.mark.parametrize(
    "settings", [Settings(max_send_queue_bytes=256 * 1024 * 1024, close_timeout=CLOSE_TIMEOUT)]
)
async def test_server_shutdown_with_a_client_that_stopped_reading(
    adapter: str,
    perspective_server: Any,
    factory: CountingFactory,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bound = SERVER_GRACE.get(adapter, 0.0) + settings.close_timeout + MARGIN
    with anyio.fail_after(SCENARIO_TIMEOUT):
        # No keepalive pings: the stalled client sends nothing that could provoke a reset.
        async with LiveServer.running(adapter, factory, settings) as server, connect(
            server.url, ping_interval=None
        ) as conn:
            await _subscribe(conn)
            client_socket = ClientSocket(conn.ws.transport.get_extra_info("socket"))
            conn.stop_reading()
            # More than the socket buffers of both ends can hold: the server is stuck behind
            # the client when it stops.
            count = 2 * _socket_buffers_bytes() // UPDATE_BYTES
            await in_thread(_push_updates, local_table(perspective_server), count)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(server.stop)
                if adapter in CANNOT_ABORT:
                    hung_up = await in_thread(client_socket.wait_hangup, bound)
                    # Documented: the server holds the connection, and its own shutdown waits
                    # for it, until the client reads or leaves.
                    assert hung_up is None and client_socket.state() == TCP_ESTABLISHED
                    assert server.stop_seconds is None
                    conn.ws.transport.abort()  # the client leaves; the server can stop now
                else:
                    hung_up = await in_thread(client_socket.wait_hangup, MEASURE_UP_TO)
                    assert hung_up is not None and hung_up <= bound, hung_up
                    assert client_socket.state() != TCP_ESTABLISHED
    assert server.stop_seconds is not None
    if adapter not in CANNOT_ABORT:
        assert server.stop_seconds <= bound, server.stop_seconds
    await factory.all_closed()
    assert not _errors(caplog, adapter)


# Slow readers -------------------------------------------------------------------------------


async def _stall_until_closed(
    url: str, perspective_server: Any, factory: CountingFactory, wait: float
) -> tuple[float | None, int]:
    """Stall a subscribed client until the server closes it for reading too slowly; return
    how long after the close its connection was reset (``None``: not within ``wait``) and
    its TCP state then."""
    stop = threading.Event()
    # No keepalive pings: the stalled client sends nothing that could provoke a reset.
    async with connect(url, ping_interval=None) as conn:
        await _subscribe(conn)
        client_socket = ClientSocket(conn.ws.transport.get_extra_info("socket"))
        conn.stop_reading()  # the client stalls; TCP fills up, then the server's queue
        pusher = threading.Thread(
            target=_push_updates,
            args=(local_table(perspective_server), 20_000),
            kwargs={"stop": lambda: stop.is_set() or factory.closed > 0},
        )
        pusher.start()
        try:
            async with connect(url) as healthy:
                # Another client is served normally meanwhile.
                other = await healthy.client.open_table("other")
                assert await other.size() == 3
                # The core releases the session right before it closes the websocket.
                assert await in_thread(factory.wait_closed, 1, MEASURE_UP_TO)
                hung_up = await in_thread(client_socket.wait_hangup, wait)
                state = client_socket.state()
        finally:
            stop.set()
            await in_thread(pusher.join)
        # The client holds unread data: closing its socket resets the connection at once.
        conn.ws.transport.abort()
    return hung_up, state


def _assert_closed_with_1013(caplog: pytest.LogCaptureFixture, adapter: str) -> None:
    overflow = [r for r in caplog.records if "1013" in r.getMessage()]
    assert overflow and overflow[0].name == "perspective_asgi", [
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
    ]
    assert not _errors(caplog, adapter)


@pytest.mark.parametrize(
    "settings", [Settings(max_send_queue_bytes=256 * 1024, close_timeout=CLOSE_TIMEOUT)]
)
async def test_slow_reader_is_closed_with_1013_and_dropped(
    adapter: str,
    url: str,
    perspective_server: Any,
    factory: CountingFactory,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bound = settings.close_timeout + MARGIN
    with anyio.fail_after(SCENARIO_TIMEOUT):
        wait = bound if adapter in CANNOT_ABORT else MEASURE_UP_TO
        hung_up, state = await _stall_until_closed(url, perspective_server, factory, wait)
    _assert_closed_with_1013(caplog, adapter)
    if adapter in CANNOT_ABORT:
        # Documented: the server still holds the connection behind the queued bytes (the
        # session and its queue are freed), until the client reads them or leaves.
        assert hung_up is None and state == TCP_ESTABLISHED, (hung_up, state)
    else:
        assert hung_up is not None and state != TCP_ESTABLISHED, (hung_up, state)
        assert hung_up <= bound, f"the connection was reset {hung_up:.2f} s after the close"


#: Tornado closes a connection itself 5 s after a close frame its peer has not answered.
TORNADO_CLOSE_WAIT = 5.0


@pytest.mark.parametrize("adapter", ["tornado"])
@pytest.mark.parametrize(
    "settings",
    [Settings(max_send_queue_bytes=256 * 1024, close_timeout=TORNADO_CLOSE_WAIT + 5)],
)
async def test_tornado_resets_a_slow_reader_when_it_gives_up_first(
    adapter: str,
    url: str,
    perspective_server: Any,
    factory: CountingFactory,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tornado's own close would come first, and it is an ordinary one: the adapter turns it
    # into a reset too.
    caplog.set_level(logging.DEBUG)
    bound = TORNADO_CLOSE_WAIT + MARGIN
    with anyio.fail_after(SCENARIO_TIMEOUT):
        hung_up, state = await _stall_until_closed(url, perspective_server, factory, MEASURE_UP_TO)
    _assert_closed_with_1013(caplog, adapter)
    assert hung_up is not None and state != TCP_ESTABLISHED, (hung_up, state)
    assert hung_up <= bound, f"the connection was reset {hung_up:.2f} s after the close"
