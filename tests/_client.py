"""The stock ``perspective.AsyncClient`` over a real websocket, as a test would use it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import perspective
import websockets
from websockets.asyncio.client import ClientConnection

_readers: weakref.WeakKeyDictionary[ClientConnection, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def stop_reading(ws: ClientConnection) -> None:
    """Make the client stall: nothing reads the socket, so the server's sends back up."""
    _readers[ws].cancel()


@contextlib.asynccontextmanager
async def perspective_client(
    url: str,
    rewrite: Callable[[bytes], bytes] | None = None,
    sent: list[bytes] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[perspective.AsyncClient, ClientConnection]]:
    """Yield an ``AsyncClient`` wired to a websocket on ``url``, and the websocket itself.

    Each request passes through ``rewrite`` (a hostile client's edit) and is appended to
    ``sent``, when given.
    """
    options.setdefault("max_size", None)
    options.setdefault("compression", None)
    async with websockets.connect(url, **options) as ws:

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
        _readers[ws] = reader
        try:
            yield client, ws
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
