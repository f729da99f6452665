"""The client side of the core: one Perspective client bridged to one websocket-like channel.

``perspective.AsyncClient`` (and the sync ``perspective.Client``) match replies to requests by
``msg_id`` and wait for a reply for as long as it takes: neither has a way to be told that the
connection is gone, so a request in flight when the socket drops would wait forever.
``ClientBridge`` reads the envelope of every request it sends and of every reply it receives,
keeping the ids still awaiting an answer; when the connection ends it answers each of them
itself with a ``ServerError`` naming the close code, which fails the pending call at once with
``perspective.PerspectiveError``. Calls made after that fail in the send callback.

Subscriptions (``on_update``, ``on_delete``, ``on_hosted_tables_update``) are never answered
once, so they are not tracked: they simply stop firing when the connection ends.

``request`` sends a frame that did not come from the Perspective client (an edge forwards its
own clients' writes this way) under a ``msg_id`` the client never uses, and picks its reply out
before the client would see it.

This module imports no websocket library; ``perspective_asgi.client`` (websockets) and
``perspective_asgi.testing`` (an in-process ASGI app) supply the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import perspective

from ._codes import CloseCode
from ._core.wire import (
    TABLE_MAKE_VIEW,
    encode_header,
    encode_server_error,
    read_envelope,
    read_fields,
    read_make_view,
    split_header,
)
from ._exceptions import ConnectionClosed, PerspectiveASGIError, ProtocolError

logger = logging.getLogger("perspective_asgi.client")

#: Request kinds that register a callback answered any number of times, starting with none:
#: ``view_on_update``, ``table_on_delete``, ``view_on_delete``, ``view_on_remove`` (5.x).
_SUBSCRIPTION_KINDS = frozenset({21, 29, 34, 39})
#: ``get_hosted_tables``, a subscription when its ``subscribe`` field (1) is set.
_GET_HOSTED_TABLES = 4

SendFrame = Callable[[bytes], Awaitable[None]]

#: The first ``msg_id`` of ``ClientBridge.request``: Perspective's clients count theirs up from
#: 1, and would need two billion requests on one connection to reach it.
RAW_MSG_IDS = 1 << 31


def readdress(frame: bytes, msg_id: int, entity_id: str) -> bytes:
    """``frame`` (a request or a reply) with its ``msg_id`` replaced; the rest is untouched."""
    _, start = split_header(frame)
    return encode_header(msg_id, entity_id) + frame[start:]


class ConnectError(PerspectiveASGIError):
    """A connection could not be opened; ``status`` is the HTTP status of a refused handshake.

    ``status`` is ``None`` when no HTTP answer came at all: connection refused, unknown host,
    timeout, or a response that was not a websocket handshake. ``body`` is the refusal's
    response body (``b""`` when it had none, ``None`` when there was no HTTP answer). The
    message quotes the start of the body, so a refusal that says why ("authentication
    required") reads differently from a bare 403.

    Args:
        url: the URL the connection was for.
        reason: what went wrong; for an HTTP refusal, its status line's reason phrase.
        status: the HTTP status of a refused handshake.
        body: the HTTP refusal's response body.
    """

    def __init__(
        self, url: str, reason: str, status: int | None = None, body: bytes | None = None
    ) -> None:
        super().__init__(f"cannot connect to {url}: {_describe(reason, status, body)}")
        self.url = url
        self.reason = reason
        self.status = status
        self.body = body


#: Characters of a refusal's body quoted in a ``ConnectError`` message: enough for a reason,
#: not a whole error page.
BODY_EXCERPT_CHARS = 200


def _describe(reason: str, status: int | None, body: bytes | None) -> str:
    if status is None:
        return reason
    if body is None:
        return f"HTTP {status}: {reason}"
    status_line = f"HTTP {status} {reason}".rstrip()
    # One line, so a command-line error stays one line, whatever the body's layout.
    excerpt = " ".join(body.decode("utf-8", "replace").split())
    if not excerpt:
        return f"{status_line}, with an empty body"
    if len(excerpt) > BODY_EXCERPT_CHARS:
        excerpt = excerpt[: BODY_EXCERPT_CHARS - 3] + "..."
    return f"{status_line}: {excerpt}"


def _is_subscription(data: bytes) -> bool:
    envelope = read_envelope(data)
    if envelope.kind in _SUBSCRIPTION_KINDS:
        return True
    if envelope.kind == _GET_HOSTED_TABLES and envelope.body:
        return any(number == 1 and value for number, value in read_fields(envelope.body))
    return False


class ClientBridge:
    """A Perspective client whose outstanding requests fail when its connection ends.

    Args:
        send_frame: sends one binary message to the server; raises once it cannot.
        sync_loop: the running loop, to build a synchronous ``perspective.Client`` whose
            calls, made from any other thread, are carried out on it; ``None`` builds an
            ``AsyncClient``.
    """

    def __init__(
        self, send_frame: SendFrame, *, sync_loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._send_frame = send_frame
        #: msg_id -> entity_id of every request sent and not yet answered.
        self._awaiting_reply: dict[int, str] = {}
        #: msg_id -> the reply's future, for ``request``.
        self._raw: dict[int, asyncio.Future[bytes]] = {}
        #: msg_id -> what to call with the reply the moment it is read, for ``request``.
        self._on_reply: dict[int, Callable[[bytes], None]] = {}
        #: table name -> the id of the last view the client made on it (see ``view_made_on``).
        self._made_views: dict[str, str] = {}
        self._next_raw = RAW_MSG_IDS
        self._closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._loop = sync_loop
        # Built on the loop that will deliver replies: a sync call from there would deadlock.
        self._loop_thread = threading.get_ident()
        self.client: Any
        if sync_loop is None:
            self.client = perspective.AsyncClient(self._send)
        else:
            self.client = perspective.Client(self._send_from_thread)

    @property
    def closed(self) -> bool:
        """Whether the connection has ended; every later call fails."""
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once the connection has ended, whichever side ended it."""
        await self._closed.wait()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(
            self.close_code if self.close_code is not None else CloseCode.ABNORMAL_CLOSURE,
            self.close_reason,
        )

    async def _send(self, data: bytes) -> None:
        if self.closed:
            raise self._closed_error()
        try:
            subscription = _is_subscription(data)
        except ProtocolError:
            subscription = True  # not ours to judge; the server will refuse it
        msg_id: int | None = None
        if not subscription:
            envelope = read_envelope(data)
            msg_id = envelope.msg_id
            self._awaiting_reply[msg_id] = envelope.entity_id
            if envelope.kind == TABLE_MAKE_VIEW:
                self._made_views[envelope.entity_id] = read_make_view(envelope.body)[0]
        try:
            await self._send_frame(data)
        except BaseException:
            # The call fails with this error; no reply must be forged for it later.
            if msg_id is not None:
                self._awaiting_reply.pop(msg_id, None)
            raise
        if self.closed:
            # The connection ended while this frame was being written; its reply never comes.
            await self._fail_awaiting()

    def _send_from_thread(self, data: bytes) -> None:
        loop = self._loop
        assert loop is not None
        if threading.get_ident() == self._loop_thread:
            # The reply can only arrive on this thread, which would be blocked waiting for it.
            raise RuntimeError(
                "a synchronous perspective.Client cannot be called from its own event loop "
                "thread (e.g. inside an on_update callback); use the AsyncClient there"
            )
        if self.closed or loop.is_closed():
            raise self._closed_error()
        asyncio.run_coroutine_threadsafe(self._send(data), loop).result()

    def view_made_on(self, table: str) -> str | None:
        """The id of the last view ``client`` asked the server to make on ``table``: the entity
        a ``request`` of one's own on that view is addressed to."""
        return self._made_views.get(table)

    async def request(
        self, frame: bytes, on_reply: Callable[[bytes], None] | None = None
    ) -> bytes:
        """Send a request frame of one's own and return the server's reply to it.

        The frame goes out under a ``msg_id`` of this bridge's; the reply comes back addressed
        as ``frame`` was. Raises ``ConnectionClosed`` if the connection ends first: the server
        may or may not have carried the request out.

        ``on_reply`` is called with the reply as soon as it is read, after every message the
        server sent before it has been handled (subscription callbacks included) and before any
        sent after it: the one point where the reply's place in the stream is known. The
        caller of ``request`` resumes only later, when messages behind it may have been
        handled too.
        """
        if self.closed:
            raise self._closed_error()
        envelope = read_envelope(frame)
        msg_id = self._next_raw
        self._next_raw = msg_id + 1 if msg_id + 1 < 1 << 32 else RAW_MSG_IDS
        reply = self._raw[msg_id] = asyncio.get_running_loop().create_future()
        if on_reply is not None:
            self._on_reply[msg_id] = on_reply
        try:
            try:
                await self._send_frame(readdress(frame, msg_id, envelope.entity_id))
            except Exception as exc:
                # The channel's own error (websockets' ConnectionClosed, say): one kind for
                # callers, who cannot know which channel they are on.
                raise ConnectionClosed(
                    self.close_code if self.close_code is not None
                    else CloseCode.ABNORMAL_CLOSURE,
                    self.close_reason or f"sending failed: {exc}",
                ) from exc
            answer = await reply
        finally:
            self._raw.pop(msg_id, None)
            self._on_reply.pop(msg_id, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # failed by connection_lost while the send failed: seen
        return readdress(answer, envelope.msg_id, envelope.entity_id)

    async def deliver(self, frame: bytes) -> None:
        """Hand one reply from the server to the client."""
        try:
            msg_id = read_envelope(frame).msg_id
        except ProtocolError:
            logger.warning("dropped an undecodable %d-byte message from the server", len(frame))
            return
        reply = self._raw.get(msg_id)
        if reply is not None:
            on_reply = self._on_reply.pop(msg_id, None)
            if on_reply is not None and not reply.done():
                try:
                    on_reply(frame)
                except Exception as exc:
                    reply.set_exception(exc)
                    return
            if not reply.done():
                reply.set_result(frame)
            return
        self._awaiting_reply.pop(msg_id, None)
        await self._handle_response(frame)

    async def _handle_response(self, frame: bytes) -> None:
        try:
            result = self.client.handle_response(frame)
            if inspect.isawaitable(result):
                await result
        except perspective.PerspectiveError as exc:
            # A subscription's callback failed; the client keeps working.
            logger.warning("the Perspective client rejected a reply: %s", exc)

    async def connection_lost(self, code: int, reason: str = "") -> None:
        """Record that the connection ended and fail every request still awaiting a reply."""
        if self.closed:
            return
        self.close_code = code
        self.close_reason = reason
        self._closed.set()
        for reply in self._raw.values():
            if not reply.done():
                reply.set_exception(self._closed_error())
        await self._fail_awaiting()

    async def _fail_awaiting(self) -> None:
        message = f"perspective-asgi: {self._closed_error()}"
        while self._awaiting_reply:
            msg_id, entity_id = self._awaiting_reply.popitem()
            with contextlib.suppress(perspective.PerspectiveError):
                result = self.client.handle_response(
                    encode_server_error(msg_id, entity_id, message)
                )
                if inspect.isawaitable(result):
                    await result
