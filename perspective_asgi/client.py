"""Connect the stock Perspective Python client to a Perspective websocket server.

Works with every perspective-asgi adapter and with Perspective's own handlers: each websocket
message carries one binary protobuf frame, both ways. Needs ``websockets`` (the ``client``
extra: ``pip install "perspective-asgi[client]"``).

One connection, as a ``perspective.AsyncClient``::

    async with connect("ws://127.0.0.1:8000/websocket") as client:
        table = await client.open_table("prices")
        print(await table.size())

When the connection drops, every call waiting for a reply fails at once with
``perspective.PerspectiveError`` ("perspective-asgi: connection closed with code 1006"), later
calls fail the same way, and ``on_update`` callbacks stop firing. A handshake that cannot be
completed raises ``ConnectError``, whose ``status`` is the HTTP status the server refused it
with (401, 403, ...), or ``None`` when no HTTP answer came (refused, timeout), and whose
``body`` is the refusal's response body; its message quotes the start of that body
("HTTP 401 Unauthorized: authentication required").

Reconnecting is a loop, as in ``websockets``: tables, views and subscriptions belong to one
connection, so the body of the loop opens what it needs by name, each time::

    async for conn in reconnect(url, headers=fresh_headers):   # re-called on every attempt
        async with conn:
            table = await conn.client.open_table("prices")
            view = await table.view()
            await view.on_update(on_update, mode="row")
            await conn.wait_closed()

``reconnect`` retries with exponential backoff and jitter. ``async with conn`` closes the
connection when the block ends and swallows the errors raised *because* it dropped, so the loop
goes on to the next connection; any other error propagates. A callable ``headers`` is called
before every attempt, which is where an expired token is refreshed; with one, handshakes
refused with 401 or 403 are retried too.

``connect_sync`` gives the synchronous ``perspective.Client``, for scripts and notebooks; its
websocket runs on an event loop in a background thread. ``python -m perspective_asgi.client URL``
prints the hosted tables with their sizes and schemas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import inspect
import logging
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO, Union

import perspective

try:
    import websockets
    from websockets.asyncio.client import ClientConnection
    from websockets.asyncio.client import connect as ws_connect
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'perspective_asgi.client needs websockets>=13: pip install "perspective-asgi[client]"'
    ) from exc

from ._auth import parse_header
from ._client import ClientBridge, ConnectError
from ._codes import CloseCode
from ._exceptions import ConnectionClosed

__all__ = [
    "ConnectError",
    "Connection",
    "Reconnect",
    "connect",
    "connect_sync",
    "open_connection",
    "reconnect",
]

logger = logging.getLogger("perspective_asgi.client")

MiB = 1024 * 1024

#: Headers for the handshake, or a function (sync or async) returning them on every attempt.
HeadersSource = Union[  # noqa: UP007 - a runtime alias on 3.10
    Mapping[str, str],
    Callable[[], Union[Mapping[str, str], Awaitable[Mapping[str, str]]]],  # noqa: UP007
    None,
]

#: What a failed call's ``perspective.PerspectiveError`` says when the connection was lost.
_CLOSED_MARKER = "connection closed with code"


async def _resolve_headers(headers: HeadersSource) -> Mapping[str, str] | None:
    if headers is None or isinstance(headers, Mapping):
        return headers
    result = headers()
    if inspect.isawaitable(result):
        result = await result
    return result


class Connection:
    """One websocket to a Perspective server, and the client (``.client``) speaking over it.

    ``async with conn`` closes it when the block ends and swallows an error raised because
    the connection had dropped (see the module docstring).
    """

    def __init__(self, url: str, websocket: ClientConnection, bridge: ClientBridge) -> None:
        self.url = url
        self.websocket = websocket
        self._bridge = bridge
        #: ``perspective.AsyncClient``, or ``perspective.Client`` under ``connect_sync``.
        self.client: Any = bridge.client
        self._reader = asyncio.ensure_future(self._read())
        self._closing = False

    @property
    def closed(self) -> bool:
        """Whether the connection has ended; every call made on ``client`` now fails."""
        return self._bridge.closed

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (1006 if the connection dropped), once closed."""
        return self._bridge.close_code

    async def wait_closed(self) -> None:
        """Return once the connection has ended, whichever side ended it."""
        await self._bridge.wait_closed()

    async def request(
        self, frame: bytes, on_reply: Callable[[bytes], None] | None = None
    ) -> bytes:
        """Send one Perspective request frame of one's own and return the server's reply.

        For frames that did not come from ``client``, e.g. a request an edge forwards for one of
        its own clients: the reply is addressed as ``frame`` was (its ``msg_id`` and entity),
        and ``client`` never sees it. Raises ``ConnectionClosed`` if the connection ends
        before the reply arrives, when the server may or may not have carried it out.

        ``on_reply`` sees the reply at its place in the stream of the server's messages (see
        ``ClientBridge.request``): what a caller needs to order it among subscription callbacks.
        """
        return await self._bridge.request(frame, on_reply)

    def view_made_on(self, table: str) -> str | None:
        """The id of the last view ``client`` made on ``table``, to address ``request``s to."""
        return self._bridge.view_made_on(table)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the websocket; calls still waiting for a reply fail."""
        self._closing = True
        await self.websocket.close(code, reason)
        # The reader ends once the closing handshake is over (bounded by close_timeout).
        await asyncio.shield(self._reader)

    async def _read(self) -> None:
        ws = self.websocket
        code: int = CloseCode.ABNORMAL_CLOSURE
        reason = ""
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, str):
                    # Perspective speaks binary protobuf only; a text frame is not its protocol.
                    await ws.close(CloseCode.UNSUPPORTED_DATA, "text frame")
                    code, reason = CloseCode.UNSUPPORTED_DATA, "server sent a text frame"
                    break
                await self._bridge.deliver(message)
        except websockets.ConnectionClosed as exc:
            closing_frame = exc.rcvd
            if closing_frame is not None:
                code, reason = closing_frame.code, closing_frame.reason
        except Exception:
            logger.exception("the client's reader failed; closing the connection to %s", self.url)
            code, reason = CloseCode.INTERNAL_ERROR, "client error"
            await ws.close(code, reason)
        finally:
            await self._bridge.connection_lost(code, reason)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        dropped = self.closed and not self._closing
        await self.close()
        return dropped and _caused_by_drop(exc)


def _caused_by_drop(exc: BaseException | None) -> bool:
    if isinstance(exc, ConnectionClosed):
        return True
    return isinstance(exc, perspective.PerspectiveError) and _CLOSED_MARKER in str(exc)


def _status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _open(
    url: str,
    headers: HeadersSource,
    *,
    max_message_size: int | None,
    open_timeout: float | None,
    close_timeout: float | None,
    compression: bool,
    sync: bool,
    websocket_options: Mapping[str, Any],
) -> Connection:
    try:
        websocket = await ws_connect(
            url,
            additional_headers=await _resolve_headers(headers),
            max_size=max_message_size,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            compression="deflate" if compression else None,
            **websocket_options,
        )
    except websockets.InvalidURI as exc:
        raise ValueError(f"not a websocket URL: {url!r} ({exc})") from exc
    except websockets.InvalidStatus as exc:
        response = exc.response
        status = response.status_code
        # Some servers (hypercorn) send no reason phrase.
        reason = response.reason_phrase or _status_phrase(status)
        raise ConnectError(url, reason, status, bytes(response.body or b"")) from exc
    except websockets.InvalidHandshake as exc:
        raise ConnectError(url, f"not a websocket handshake: {exc}") from exc
    except TimeoutError as exc:
        raise ConnectError(url, f"no handshake within {open_timeout} s") from exc
    except ConnectionRefusedError as exc:
        raise ConnectError(url, "connection refused") from exc
    except OSError as exc:
        raise ConnectError(url, exc.strerror or str(exc)) from exc

    bridge = ClientBridge(websocket.send, sync_loop=asyncio.get_running_loop() if sync else None)
    return Connection(url, websocket, bridge)


async def open_connection(
    url: str,
    *,
    headers: HeadersSource = None,
    max_message_size: int | None = 256 * MiB,
    open_timeout: float | None = 10.0,
    close_timeout: float | None = 5.0,
    compression: bool = False,
    **websocket_options: Any,
) -> Connection:
    """Open a websocket to ``url`` and return the ``Connection``; ``close()`` it when done.

    Args:
        url: ``ws://`` or ``wss://`` URL of the Perspective endpoint.
        headers: extra handshake headers (e.g. ``Authorization``), or a function returning them.
        max_message_size: largest message accepted from the server, in bytes; ``None`` for no
            limit. A view's ``to_arrow()`` arrives as one message.
        open_timeout: seconds allowed for the TCP connection and the handshake.
        close_timeout: seconds allowed for the closing handshake.
        compression: offer permessage-deflate; it costs both sides CPU and pays off only on
            slow links.
        websocket_options: passed on to ``websockets.asyncio.client.connect``.
    """
    return await _open(
        url,
        headers,
        max_message_size=max_message_size,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        compression=compression,
        sync=False,
        websocket_options=websocket_options,
    )


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    headers: HeadersSource = None,
    max_message_size: int | None = 256 * MiB,
    open_timeout: float | None = 10.0,
    close_timeout: float | None = 5.0,
    compression: bool = False,
    **websocket_options: Any,
) -> AsyncIterator[perspective.AsyncClient]:
    """Yield a ``perspective.AsyncClient`` connected to ``url``; see ``open_connection``."""
    connection = await open_connection(
        url,
        headers=headers,
        max_message_size=max_message_size,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        compression=compression,
        **websocket_options,
    )
    try:
        yield connection.client
    finally:
        await connection.close()


def _retry_by_default(error: ConnectError, headers: HeadersSource) -> bool:
    status = error.status
    if status is None or status in (408, 429) or status >= 500:
        return True
    # A refused credential may be refreshed by the next call of a headers function.
    return status in (401, 403) and callable(headers)


class Reconnect:
    """An async iterator of connections to ``url``: the next one opens when the last ended.

    Args:
        url: ``ws://`` or ``wss://`` URL of the Perspective endpoint.
        headers: handshake headers, or a function (sync or async) called before every
            attempt to return fresh ones.
        initial_delay: seconds before the first retry and before reconnecting after a drop.
        max_delay: the longest wait between attempts.
        factor: how much the wait grows after each failed attempt.
        max_attempts: consecutive failed attempts before the last ``ConnectError`` is raised;
            ``None`` retries forever.
        retry: decides whether a ``ConnectError`` is worth retrying; by default network
            errors, timeouts, 408, 429 and 5xx are, and 401/403 when ``headers`` is callable.
        options: passed on to ``open_connection``.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: HeadersSource = None,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        factor: float = 2.0,
        max_attempts: int | None = None,
        retry: Callable[[ConnectError], bool] | None = None,
        **options: Any,
    ) -> None:
        if initial_delay < 0 or max_delay < initial_delay or factor < 1:
            raise ValueError("need 0 <= initial_delay <= max_delay and factor >= 1")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive integer, got {max_attempts!r}")
        self.url = url
        self._headers = headers
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._factor = factor
        self._max_attempts = max_attempts
        self._retry = retry or (lambda error: _retry_by_default(error, headers))
        self._options = options
        self._current: Connection | None = None
        #: Connections opened so far.
        self.connections = 0

    def __aiter__(self) -> Reconnect:
        return self

    def _delay(self, failures: int) -> float:
        delay = min(self._max_delay, self._initial_delay * self._factor ** max(failures - 1, 0))
        # Jitter keeps many clients of one restarted server from reconnecting in lockstep.
        return delay * random.uniform(0.5, 1.0)

    async def __anext__(self) -> Connection:
        failures = 0
        if self._current is not None:
            await self._current.close()
            self._current = None
            await asyncio.sleep(self._delay(0))
        while True:
            try:
                connection = await open_connection(self.url, headers=self._headers,
                                                   **self._options)
            except ConnectError as error:
                failures += 1
                if not self._retry(error) or failures == self._max_attempts:
                    raise
                delay = self._delay(failures)
                logger.info("%s; retrying in %.2f s", error, delay)
                await asyncio.sleep(delay)
                continue
            self._current = connection
            self.connections += 1
            return connection

    async def aclose(self) -> None:
        """Close the current connection, if any."""
        if self._current is not None:
            await self._current.close()
            self._current = None


def reconnect(url: str, **options: Any) -> Reconnect:
    """Return an async iterator of connections to ``url``; see ``Reconnect``."""
    return Reconnect(url, **options)


@contextlib.contextmanager
def connect_sync(
    url: str,
    *,
    headers: HeadersSource = None,
    max_message_size: int | None = 256 * MiB,
    open_timeout: float | None = 10.0,
    close_timeout: float | None = 5.0,
    compression: bool = False,
    **websocket_options: Any,
) -> Iterator[perspective.Client]:
    """Yield a synchronous ``perspective.Client`` connected to ``url``; see ``open_connection``.

    The websocket runs on an event loop in a background thread. Calls may come from any
    other thread; one made on that loop's thread (in an ``on_update`` callback) raises
    instead of waiting forever for a reply only that thread could deliver.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="perspective-asgi-client",
                              daemon=True)
    thread.start()
    try:
        connection = asyncio.run_coroutine_threadsafe(
            _open(
                url,
                headers,
                max_message_size=max_message_size,
                open_timeout=open_timeout,
                close_timeout=close_timeout,
                compression=compression,
                sync=True,
                websocket_options=websocket_options,
            ),
            loop,
        ).result()
        try:
            yield connection.client
        finally:
            asyncio.run_coroutine_threadsafe(connection.close(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


# python -m perspective_asgi.client URL ---------------------------------------------------------


async def _describe(url: str, headers: Mapping[str, str], out: TextIO) -> None:
    async with connect(url, headers=headers) as client:
        for name in sorted(await client.get_hosted_table_names()):
            table = await client.open_table(name)
            size = await table.size()
            columns = await table.columns()
            schema = await table.schema()
            index = table.get_index()
            suffix = f", index {index}" if index else ""
            out.write(f"{name}: {size} rows, {len(columns)} columns{suffix}\n")
            width = max((len(column) for column in columns), default=0)
            for column in columns:
                out.write(f"  {column:<{width}}  {schema[column]}\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """List the tables a Perspective websocket server hosts; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m perspective_asgi.client",
        description="Print the tables a Perspective websocket server hosts, with their "
        "sizes and schemas.",
    )
    parser.add_argument("url", help="e.g. ws://127.0.0.1:8000/websocket")
    parser.add_argument("-H", "--header", action="append", type=parse_header, default=[],
                        metavar="NAME:VALUE", help="a handshake header; repeatable")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds allowed for the whole listing (default 30)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(
            _describe(args.url, dict(args.header), out or sys.stdout), args.timeout
        ))
    except (ConnectError, ConnectionClosed, perspective.PerspectiveError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, asyncio.TimeoutError):
        elapsed = time.monotonic() - started
        print(f"error: {args.url} did not answer within {elapsed:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
