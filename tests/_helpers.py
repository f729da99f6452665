"""Helpers shared by the test modules: demo data, a counting session factory, and a client.

Test modules import from here only (never from ``conftest`` or from one another).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import perspective
import websockets
from websockets.asyncio.client import ClientConnection

from perspective_asgi import CloseCode, ConnectionClosed, SessionBridge
from perspective_asgi._types import Frame

#: How long any single wait in these tests may take before the test fails.
WAIT = 10

DEMO_ROWS = {
    "id": [1, 2, 3, 4],
    "name": ["alpha", "beta", "gamma", "delta"],
    "group": ["x", "y", "x", "y"],
    "value": [1.5, 2.5, 3.5, 4.5],
}


# A session factory that counts -----------------------------------------------------------------


class CountingSession:
    """Forwards to a Perspective session and tells its factory when it is closed."""

    def __init__(self, factory: CountingFactory, session: Any) -> None:
        self._factory = factory
        self._session = session
        self.handle_request = session.handle_request
        if hasattr(session, "close"):
            self.close = self._close

    def _close(self) -> Any:
        result = self._session.close()
        self._factory.closed_one()
        return result


class CountingFactory:
    """A session factory wrapping a real server that counts opened and closed sessions."""

    def __init__(self, server: Any) -> None:
        self.__wrapped__ = server
        self.opened = 0
        self.closed = 0
        self.without_close = 0
        self._changed = threading.Condition()

    def new_session(self, callback: Any) -> CountingSession:
        session = self.__wrapped__.new_session(callback)
        with self._changed:
            # Virtual servers' sessions have no close() before perspective-python 5.
            if hasattr(session, "close"):
                self.opened += 1
            else:
                self.without_close += 1
        return CountingSession(self, session)

    def closed_one(self) -> None:
        with self._changed:
            self.closed += 1
            if self.closed > self.opened:
                raise AssertionError("a session was closed twice")
            self._changed.notify_all()

    def wait_closed(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` sessions are closed; return whether they were."""
        with self._changed:
            return self._changed.wait_for(lambda: self.closed >= count, timeout)

    def wait_all_closed(self, timeout: float = 10.0) -> None:
        with self._changed:
            done = self._changed.wait_for(lambda: self.closed == self.opened, timeout)
            assert done, f"{self.opened} sessions opened but {self.closed} closed"
            assert self.closed == self.opened


# An in-memory transport, for the core in-process -------------------------------------------------


class MemoryTransport:
    """A ``Transport`` over memory streams: the test plays the peer at the other end."""

    def __init__(self) -> None:
        self._peer, self._inbound = anyio.create_memory_object_stream[Frame](64)
        self._sent, self.replies = anyio.create_memory_object_stream[bytes](10_000)
        #: Called with each message sent to the peer, e.g. ``AsyncClient.handle_response``.
        self.deliver: Callable[[bytes], Any] | None = None
        self.received = 0
        self.closes: list[tuple[int, str]] = []
        self.closed = anyio.Event()
        #: The same as ``closed``, for threads other than the event loop's.
        self.closed_flag = threading.Event()
        self.send_entered = anyio.Event()
        #: Set when a send starts waiting on a stalled client, for other threads to wait on.
        self.stalled_flag = threading.Event()
        self.cancelled_sends = 0
        self._gate: anyio.Event | None = None
        self._hangup_code: int = CloseCode.NO_STATUS_RECEIVED
        self._hung_up = False

    # The peer's side.

    async def feed(self, *frames: Frame) -> None:
        for frame in frames:
            await self._peer.send(frame)

    def hang_up(self, code: int = CloseCode.NO_STATUS_RECEIVED) -> None:
        """The peer goes away: ``receive`` raises ``ConnectionClosed(code)`` once drained."""
        if not self._hung_up:
            self._hung_up = True
            self._hangup_code = code
        self._peer.close()

    def stall(self) -> anyio.Event:
        """Make every later ``send`` wait until the returned event is set: a slow reader."""
        self._gate = anyio.Event()
        self.send_entered = anyio.Event()  # set again by the first send to stall
        return self._gate

    async def next_reply(self) -> bytes:
        with anyio.fail_after(WAIT):
            return await self.replies.receive()

    # The core's side.

    async def receive(self) -> Frame:
        try:
            frame = await self._inbound.receive()
        except anyio.EndOfStream:
            raise ConnectionClosed(self._hangup_code) from None
        self.received += 1
        return frame

    async def send(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        assert not self.closes, "send after close"
        self.send_entered.set()
        if self._gate is not None:
            self.stalled_flag.set()
            try:
                await self._gate.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled_sends += 1
                raise
        self._sent.send_nowait(data)
        if self.deliver is not None:
            result = self.deliver(data)
            if inspect.isawaitable(result):
                await result

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        self.closed.set()
        self.closed_flag.set()

    def dispose(self) -> None:
        for stream in (self._peer, self._inbound, self._sent, self.replies):
            stream.close()


NewTransport = Callable[[], MemoryTransport]


@contextlib.asynccontextmanager
async def serving(bridge: SessionBridge, transport: MemoryTransport) -> AsyncIterator[None]:
    """Run ``bridge`` while the body runs; the peer hangs up when it ends (if not before)."""
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(bridge.run, transport)
            try:
                yield
            finally:
                transport.hang_up()


# The stock client over a real websocket --------------------------------------------------------


@dataclass
class Connection:
    """The stock ``perspective.AsyncClient`` wired to one websocket, as a test drives it."""

    client: perspective.AsyncClient
    ws: ClientConnection
    #: Every request sent, after ``rewrite``, when recording was asked for.
    sent: list[bytes] | None = None
    _reader: asyncio.Task[None] | None = field(default=None, repr=False)

    def stop_reading(self) -> None:
        """Stall the client: nothing reads the socket, so the server's sends back up."""
        if self._reader is not None:
            self._reader.cancel()

    async def closed_with(self, timeout: float = 10) -> int | None:
        """Wait until the server closes the websocket; return the close code it sent."""
        return await closed_with(self.ws, timeout)


@contextlib.asynccontextmanager
async def connect(
    url: str,
    rewrite: Callable[[bytes], bytes] | None = None,
    record: bool = False,
    **options: Any,
) -> AsyncIterator[Connection]:
    """Yield a ``Connection`` to ``url``; each request passes through ``rewrite`` (a hostile
    client's edit) and is recorded in ``Connection.sent`` when ``record`` is true."""
    options.setdefault("max_size", None)
    options.setdefault("compression", None)
    async with websockets.connect(url, **options) as ws:
        sent: list[bytes] | None = [] if record else None

        async def send(data: bytes) -> None:
            data = rewrite(bytes(data)) if rewrite else bytes(data)
            if sent is not None:
                sent.append(data)
            await ws.send(data)

        client = perspective.AsyncClient(send)

        async def pump() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for message in ws:
                    result = client.handle_response(message)
                    if inspect.isawaitable(result):
                        await result

        reader = asyncio.create_task(pump())
        try:
            yield Connection(client, ws, sent, reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def closed_with(ws: ClientConnection, timeout: float = 10) -> int | None:
    """Wait until the server closes ``ws``; return the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    await ws.wait_closed()
    return ws.close_code


async def resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable: a few client methods are sync in one version."""
    return await value if inspect.isawaitable(value) else value


async def still_serving(url: str) -> None:
    """A fresh connection gets a correct answer: the server survived what came before."""
    async with connect(url) as conn:
        table = await conn.client.open_table("demo")
        assert await table.size() == len(DEMO_ROWS["id"])


def local_table(server: perspective.Server, name: str = "demo") -> Any:
    """The table ``name`` of ``server`` through an in-process client."""
    return server.new_local_client().open_table(name)
