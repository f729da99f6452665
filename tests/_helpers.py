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

import perspective
import websockets
from websockets.asyncio.client import ClientConnection

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
