"""An edge's clients' writes, carried to the upstream that owns the tables.

An edge's tables are copies: a change made to one at the edge would be overwritten by the
upstream's next update of those rows and lost at the next resynchronisation. ``WriteThrough`` is
the session factory an edge serves instead of its replica's local server. Each of its sessions
hands every request to a session of that server, except those on a replicated table that
change it:

* ``update``, ``remove`` and ``replace`` (``clear`` is sent as a ``replace``) go to the
  upstream on the replica's own connection (``Replica.write``), and the upstream's reply is
  the client's. The local copy changes only through the upstream's deltas, so the upstream and
  every edge converge on the same rows, whatever order writes come in from wherever;
* ``delete`` is refused: the table belongs to the upstream;
* a write whose data is a view (``update(view)``) is refused: the view is at the edge, and the
  upstream cannot read it.

The reply comes once the write is in the local copy too, so a client that writes then reads at
one edge reads its write. In a tree of edges each level forwards to the one above and answers
once it holds the write, so a leaf's write is answered once every level above it has it.

A forwarded write's ``port_id`` is dropped: ports are made per table, and the edge's are not
the upstream's.

The bridge reads ``__wrapped__`` for the engine, so the local server's fast paths and shared
views serve an edge's reads as they do any server's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import perspective

from ._core.wire import (
    TABLE_DELETE,
    TABLE_REMOVE,
    TABLE_REPLACE,
    TABLE_UPDATE,
    encode_field,
    encode_message,
    encode_server_error,
    read_envelope,
    read_fields,
    read_source_view,
)
from ._exceptions import UpstreamUnavailable

__all__ = ["WriteThrough"]

#: Request kinds carried to the upstream.
FORWARDED_KINDS = frozenset({TABLE_UPDATE, TABLE_REMOVE, TABLE_REPLACE})
#: ``TableUpdateReq.data``: the one field of an update that is forwarded.
_UPDATE_DATA = 1

Reply = Callable[[bytes], Any]


class Upstream(Protocol):
    """What forwarding needs of ``perspective_asgi.replica.Replica``."""

    @property
    def server(self) -> perspective.Server: ...

    #: The loop writes go upstream from; ``None`` while not replicating.
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    def follows(self, name: str) -> bool: ...

    async def write(self, frame: bytes, table: str) -> bytes: ...


class WriteThrough:
    """Sessions of ``replica.server`` whose writes to replicated tables go to the upstream."""

    def __init__(self, replica: Upstream) -> None:
        self.replica = replica
        self.__wrapped__: perspective.Server = replica.server
        # Kept until done: the loop holds only weak references to tasks.
        self._writes: set[asyncio.Task[None]] = set()

    def new_session(self, callback: Reply) -> _Session:
        return _Session(self, self.__wrapped__.new_session(callback), callback)

    def submit(self, session: _Session, frame: bytes, table: str) -> None:
        """Forward ``frame``; any thread may call it, and it returns at once."""
        loop = self.replica.loop
        if loop is None or loop.is_closed():
            session.answer(_error(frame, "upstream unavailable: the write was not applied "
                                  "(the edge is not replicating)"))
            return
        # Through the loop's queue even from the loop: one session's writes, which reach
        # here one at a time, go upstream in the order they came.
        loop.call_soon_threadsafe(self._start, session, frame, table)

    def _start(self, session: _Session, frame: bytes, table: str) -> None:
        task = asyncio.ensure_future(self._forward(session, frame, table))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _forward(self, session: _Session, frame: bytes, table: str) -> None:
        try:
            answer = await self.replica.write(frame, table)
        except UpstreamUnavailable as exc:
            answer = _error(frame, str(exc))
        session.answer(answer)


class _Session:
    """One connection's session: its own on the local server, and writes sent upstream."""

    __slots__ = ("_callback", "_closed", "_factory", "_local")

    def __init__(self, factory: WriteThrough, local: Any, callback: Reply) -> None:
        self._factory = factory
        self._local = local
        self._callback = callback
        self._closed = False

    def handle_request(self, data: bytes) -> Any:
        envelope = read_envelope(data)
        kind, table = envelope.kind, envelope.entity_id
        if kind is None or not (
            kind in FORWARDED_KINDS or kind == TABLE_DELETE
        ) or not self._factory.replica.follows(table):
            return self._local.handle_request(data)
        if kind == TABLE_DELETE:
            self.answer(_error(data, f"table {table!r} is a replica of the upstream's: delete "
                                     "it there"))
        elif read_source_view(envelope.body) is not None:
            self.answer(_error(data, f"table {table!r} is a replica of the upstream's: a view "
                                     "at this edge cannot be written to it"))
        else:
            body = envelope.body
            if kind == TABLE_UPDATE:
                body = b"".join(
                    encode_field(number, bytes(value))
                    for number, value in read_fields(body)
                    if number == _UPDATE_DATA and isinstance(value, memoryview)
                )
            self._factory.submit(self, encode_message(envelope.msg_id, table, kind, body), table)
        return None

    def answer(self, reply: bytes) -> None:
        if not self._closed:
            self._callback(reply)

    def close(self) -> Any:
        self._closed = True
        return self._local.close()


def _error(request: bytes, message: str) -> bytes:
    envelope = read_envelope(request)
    return encode_server_error(envelope.msg_id, envelope.entity_id, message)
