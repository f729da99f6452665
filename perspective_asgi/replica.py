"""Replicas of an upstream Perspective server's tables, kept in a local ``perspective.Server``.

An edge process holds a ``Replica``: it connects to the upstream with
``perspective_asgi.client``, and for each table it follows opens a flat view there and copies
it into a local table of the same name, index and limit. It then applies the view's row
deltas (``on_update(mode="row")``) and, on perspective-python 5, its removals (``on_remove``)
as they arrive. These are the steps of Perspective's own replication (``client.table(view)``),
which this module repeats on a table it keeps, rather than calling, for one reason: after the
upstream is lost, ``table(view)`` could only build a *new* table, and the edge's own clients
hold views on the old one. On reconnect the replica instead ``replace``s the local table's
rows with a fresh snapshot, and the edge's clients simply see an update.

Ordering makes the copy exact: the view is subscribed before its snapshot is taken, and the
snapshot is queued at the place its reply takes among the deltas (``Connection.request``'s
``on_reply``), so a delta that arrives before it is already in it (the snapshot replaces it),
and every later delta is applied on top. All changes to a local table are applied by one task,
in arrival order, in a worker thread (the engine releases the GIL), so the event loop keeps
serving the edge's clients.

Deltas alone are not enough for a table with no index: its replace or clear sends only the
rows left, which appended would join the old ones (and an edge of an edge receives its
parent's resynchronisation so). Nor, on perspective-python 4, for removals. For those tables
each burst of deltas, and each snapshot, is followed by a ``table_size`` request upstream; a
copy found holding more rows than the upstream takes a fresh snapshot on the same connection.
Fewer rows is normal at first (the upstream answers on several threads, so a cheap request's
reply can overtake the deltas of an update still being sent); a copy found short twice,
``RECHECK_DELAY`` apart with no delta applied between, takes a fresh snapshot too.

While the upstream is unreachable the local tables keep their last state and keep being
served; ``ready`` is false until every table is synchronised again.

The edge's clients' writes to replicated tables go upstream (``write``, used by
``perspective_asgi._forward.WriteThrough``), so the copies change only as the upstream does.

perspective-python 4.x has no ``on_remove``: a removal reaches the edge as a fresh snapshot
after the size check above, and a ``clear`` of an indexed table (which sends nothing) only at
the next resynchronisation (a reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import perspective

from ._core.wire import (
    SERVER_ERROR,
    TABLE_SIZE,
    VIEW_TO_ARROW,
    encode_field,
    encode_message,
    read_arrow,
    read_envelope,
    read_error_message,
    read_table_size,
)
from ._exceptions import ConnectionClosed, UpstreamUnavailable
from ._forward import WriteThrough
from .client import Connection, HeadersSource, reconnect

__all__ = ["Replica", "TableStatus", "UpstreamUnavailable"]

logger = logging.getLogger("perspective_asgi.replica")

MiB = 1024 * 1024

#: The upstream connection's keepalive: a ping every 2 s, given up if unanswered in 4 s; then
#: 1 s for the closing handshake, which over a dead link cannot complete (websockets waits the
#: close timeout before dropping the connection). A lost upstream is noticed within 7 s
#: (websockets' defaults take 45 s), so writes are refused as undeliverable rather than left
#: waiting for a link that may not come back.
PING_INTERVAL = 2.0
PING_TIMEOUT = 4.0
CLOSE_TIMEOUT = 1.0
#: Seconds before checking again a copy found short of rows: time for deltas on their way.
RECHECK_DELAY = 0.1


@dataclass
class TableStatus:
    """How one replicated table stands."""

    #: The local table holds the upstream's rows and follows its changes.
    synced: bool = False
    #: Snapshots taken: 1 after the first synchronisation, one more per resynchronisation.
    snapshots: int = 0
    #: Deltas (updates and removals) applied since the table was created.
    deltas: int = 0


class _Copy(enum.Enum):
    """How a copy's size compared with the upstream's at the last check."""

    MATCHES = "matches"
    #: Fewer rows here, and no delta applied since: deltas may still be on their way.
    SHORT = "short"
    #: Wrong: a fresh snapshot is due; until it is applied, checks are skipped.
    STALE = "stale"
    #: Wrong, and the fresh snapshot has been asked for.
    REFRESHING = "refreshing"


@dataclass
class _Op:
    kind: str  # "snapshot", "update", "remove" or "check"
    data: bytes
    generation: int
    #: For "check": the upstream table's size at this point of the stream.
    size: int = 0


@dataclass
class _Follower:
    """Applies one table's changes in order, off the event loop."""

    name: str
    local: Any  # perspective.Client
    #: Called with the reason when a change cannot be applied: the replica resynchronises.
    on_error: Callable[[str], None]
    status: TableStatus = field(default_factory=TableStatus)
    table: Any = None
    index: str | None = None
    limit: int | None = None
    generation: int = 0
    ops: deque[_Op] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    #: Changes received, and changes applied (or skipped as stale), so far.
    pushed: int = 0
    applied: int = 0
    #: Set, and replaced, after each batch: what ``wait_applied`` waits on.
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether deltas alone keep the copy exact; if not, each burst of them is followed by a
    #: size check (see ``Replica._check_size``).
    exact: bool = True
    #: A delta arrived that no size check has covered yet; a check is on its way.
    unchecked: bool = False
    checking: bool = False
    copy: _Copy = _Copy.MATCHES
    #: Another check is due (after a snapshot, or a check that found fewer rows).
    recheck: bool = False
    #: Ask the upstream for a fresh snapshot, and for a size check soon, on the current
    #: connection.
    refresh: Callable[[], None] | None = None
    check: Callable[[], None] | None = None

    @property
    def stale(self) -> bool:
        """A check found the copy wrong, and its fresh snapshot has not been applied yet."""
        return self.copy in (_Copy.STALE, _Copy.REFRESHING)

    def push(self, kind: str, data: bytes, generation: int, size: int = 0) -> None:
        self.ops.append(_Op(kind, bytes(data), generation, size))
        self.pushed += 1
        self.wakeup.set()

    def push_check(self, reply: bytes, generation: int) -> None:
        """Queue a check against the upstream's size in ``reply`` (a ``table_size`` answer),
        where the reply falls among the deltas."""
        envelope = read_envelope(reply)
        if envelope.kind == TABLE_SIZE:
            self.push("check", b"", generation, read_table_size(envelope.body))

    async def wait_applied(self, mark: int) -> None:
        """Return once the first ``mark`` changes received have been applied."""
        while self.applied < mark:
            await self.progress.wait()

    async def run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.ops:
                batch = list(self.ops)
                self.ops.clear()
                try:
                    await anyio.to_thread.run_sync(self._apply, batch)
                except Exception as exc:
                    logger.exception("table %r: applying the upstream's changes failed", self.name)
                    self.status.synced = False
                    self.on_error(f"table {self.name!r}: {exc}")
                finally:
                    self.applied += len(batch)
                    self.progress.set()
                    self.progress = asyncio.Event()
                if self.copy is _Copy.STALE and self.refresh is not None:
                    self.copy = _Copy.REFRESHING
                    logger.info("table %r: the copy's size differs from the upstream's (a "
                                "replace or clear); taking a fresh snapshot", self.name)
                    self.refresh()
                elif self.recheck and self.check is not None:
                    self.recheck = False
                    self.check()

    def _apply(self, batch: list[_Op]) -> None:
        for op in batch:
            if op.generation != self.generation:
                continue  # from a connection that has since been replaced
            if op.kind == "snapshot":
                if self.table is None:
                    options: dict[str, Any] = {"name": self.name}
                    if self.index:
                        options["index"] = self.index
                    elif self.limit:
                        options["limit"] = self.limit
                    self.table = self.local.table(op.data, **options)
                else:
                    self.table.replace(op.data)
                self.status.snapshots += 1
                self.status.synced = True
                self.copy = _Copy.MATCHES
                # Its reply may have passed deltas it holds, or been passed by some it lacks.
                self.recheck = not self.exact
            elif self.table is None or not self.status.synced:
                continue  # before the snapshot: already part of it
            elif op.kind == "check":
                if not self.stale:
                    self._check(op.size)
            else:
                if op.kind == "update":
                    self.table.update(op.data)
                else:
                    self.table.remove(op.data)
                self.status.deltas += 1
                if self.copy is _Copy.SHORT:
                    self.copy = _Copy.MATCHES  # as far as is known, until the next check

    def _check(self, upstream: int) -> None:
        # The upstream answers on several threads, so a reply and the deltas around it can
        # arrive a little out of order. More rows here than upstream: a replace or clear (or,
        # without on_remove, a removal) that deltas cannot carry, or a snapshot that overlapped
        # deltas. Fewer: deltas still on their way, unless a second check finds the same with
        # none applied in between (a snapshot that missed some).
        size = self.table.size()
        if size > upstream or (size < upstream and self.copy is _Copy.SHORT):
            self.copy = _Copy.STALE
        elif size < upstream:
            self.copy = _Copy.SHORT
            self.recheck = True
        else:
            self.copy = _Copy.MATCHES


class Replica:
    """Keeps local copies of an upstream server's tables; run it with ``await run()``.

    Args:
        upstream: websocket URL of the upstream Perspective server.
        tables: names of the tables to replicate; ``None`` follows the upstream's hosted
            tables list, adding tables as they appear.
        server: the local server to host the replicas in; a new ``perspective.Server`` by
            default. Serve it with any adapter.
        headers: handshake headers for the upstream, or a function returning fresh ones.
        initial_delay: the first wait before reconnecting, in seconds; the wait grows with
            each failure (exponential backoff with jitter).
        max_delay: the longest wait between reconnection attempts, in seconds.
        connect_options: passed on to ``perspective_asgi.client.open_connection``.
    """

    def __init__(
        self,
        upstream: str,
        *,
        tables: Collection[str] | None = None,
        server: perspective.Server | None = None,
        headers: HeadersSource = None,
        initial_delay: float = 0.25,
        max_delay: float = 10.0,
        **connect_options: Any,
    ) -> None:
        if isinstance(tables, str):
            raise ValueError("tables must be a collection of table names, not a string")
        self.upstream = upstream
        self.tables = None if tables is None else list(dict.fromkeys(tables))
        self.server = server if server is not None else perspective.Server()
        self._local = self.server.new_local_client()
        self._headers = headers
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        connect_options.setdefault("max_message_size", 1024 * MiB)
        connect_options.setdefault("ping_interval", PING_INTERVAL)
        connect_options.setdefault("ping_timeout", PING_TIMEOUT)
        connect_options.setdefault("close_timeout", CLOSE_TIMEOUT)
        self._connect_options = connect_options
        self._followers: dict[str, _Follower] = {}
        self._connection: Connection | None = None
        self._closing: asyncio.Future[None] | None = None
        self._follower_tasks: list[asyncio.Task[None]] = []
        #: Snapshot and size-check requests in flight.
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = False
        self._ready = asyncio.Event()
        #: Connections to the upstream made so far.
        self.connections = 0
        #: Why the last connection ended or failed, if it did.
        self.last_error: str | None = None
        #: The loop ``run`` runs on, while it runs.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._write_through: WriteThrough | None = None

    @property
    def ready(self) -> bool:
        """Connected, and every followed table holds the upstream's current rows."""
        return self._ready.is_set()

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary, for health endpoints."""
        return {
            "ready": self.ready,
            "upstream": self.upstream,
            "connected": self._connected,
            "connections": self.connections,
            "last_error": self.last_error,
            "tables": {
                name: {
                    "synced": follower.status.synced,
                    "snapshots": follower.status.snapshots,
                    "deltas": follower.status.deltas,
                }
                for name, follower in sorted(self._followers.items())
            },
        }

    async def wait_ready(self) -> None:
        """Wait until ``ready``."""
        await self._ready.wait()

    def write_through(self) -> WriteThrough:
        """The session factory to serve the edge's clients with: ``server``'s sessions, whose
        writes to replicated tables are carried to the upstream (``perspective_asgi._forward``).
        Serve ``server`` itself to let them change the local copies instead."""
        if self._write_through is None:
            self._write_through = WriteThrough(self)
        return self._write_through

    def follows(self, name: str) -> bool:
        """Whether ``name`` is a table this replica copies (or will, once it is hosted)."""
        return name in self._followers or (self.tables is not None and name in self.tables)

    async def write(self, frame: bytes, table: str) -> bytes:
        """Carry a write request on ``table`` to the upstream; return the upstream's reply.

        A reply that is not an error is returned once the local copy holds the write too:
        after it, one more request on the same connection (``table_size``), which the
        upstream answers after it has sent every delta the write caused; then the wait for
        the table's follower to apply the deltas received up to it.

        Raises ``UpstreamUnavailable`` if there is no upstream connection (the write was not
        applied) or it ends before the reply (it may have been).
        """
        connection = self._connection
        if connection is None or not self._connected or connection.closed:
            reason = self.last_error or "not connected yet"
            raise UpstreamUnavailable(f"upstream unavailable: the write was not applied ({reason})")
        try:
            answer = await connection.request(frame)
        except ConnectionClosed as exc:
            raise UpstreamUnavailable(
                f"the upstream connection was lost before it answered ({exc}): the write may "
                "or may not have been applied"
            ) from None
        if read_envelope(answer).kind == SERVER_ERROR:
            return answer
        follower = self._followers.get(table)
        mark = 0

        def barrier(reply: bytes) -> None:
            # Every delta the write caused was sent before this reply, and is queued by now.
            nonlocal mark
            if follower is not None:
                if not follower.exact:
                    follower.push_check(reply, follower.generation)
                mark = follower.pushed

        try:
            await connection.request(encode_message(0, table, TABLE_SIZE), on_reply=barrier)
        except ConnectionClosed:
            return answer  # accepted; the next connection's snapshot holds it
        if follower is not None:
            await follower.wait_applied(mark)
            # A replace or clear of a table with no index is right here only once the fresh
            # snapshot it called for has arrived (or the connection, and with it the wait, ends).
            while follower.stale and not connection.closed:
                waits = {asyncio.ensure_future(follower.progress.wait()),
                         asyncio.ensure_future(connection.wait_closed())}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()
        return answer

    async def run(self) -> None:
        """Replicate until cancelled, reconnecting with backoff whenever the upstream is lost."""
        self.loop = asyncio.get_running_loop()
        connections = reconnect(
            self.upstream,
            headers=self._headers,
            initial_delay=self._initial_delay,
            max_delay=self._max_delay,
            # An edge keeps trying whatever went wrong; each failure is logged.
            retry=self._log_failure,
            **self._connect_options,
        )
        try:
            async for connection in connections:
                self.connections += 1
                self._connection = connection
                try:
                    async with connection:
                        await self._serve(connection)
                except Exception as exc:
                    # Not the connection dropping (that is swallowed above): a table that
                    # cannot be opened, say. Wait the longest backoff before trying again.
                    logger.exception("upstream %s: replication failed", self.upstream)
                    self._lost(f"replication failed: {exc}")
                    await asyncio.sleep(self._max_delay)
                    continue
                self._lost(f"the upstream connection closed (code {connection.close_code})")
        finally:
            self.loop = None
            self._lost("stopped")
            await connections.aclose()
            tasks = [*self._tasks, *self._follower_tasks]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _log_failure(self, error: Exception) -> bool:
        self.last_error = str(error)
        logger.warning("upstream %s: %s; retrying", self.upstream, error)
        return True

    def _resync(self, reason: str) -> None:
        # Drop the connection: the next one starts from fresh snapshots.
        connection = self._connection
        if connection is not None and not connection.closed:
            logger.warning("upstream %s: resynchronising: %s", self.upstream, reason)
            self._lost(reason)
            self._closing = asyncio.ensure_future(connection.close())

    def _lost(self, reason: str) -> None:
        if self._connected:
            logger.warning("upstream %s lost: %s; serving the last state", self.upstream, reason)
        self._connected = False
        self._ready.clear()
        self.last_error = reason
        for follower in self._followers.values():
            follower.status.synced = False
            follower.generation += 1  # deltas still queued from that connection are stale

    async def _serve(self, connection: Connection) -> None:
        client = connection.client
        self._connected = True
        listed = asyncio.Event()
        # Tables may appear upstream later (or, when named, not exist yet): follow the list.
        await client.on_hosted_tables_update(lambda *_: listed.set())
        started: set[str] = set()
        while True:
            listed.clear()
            available = await client.get_hosted_table_names()
            wanted = available if self.tables is None else [
                name for name in self.tables if name in available
            ]
            for name in wanted:
                if name not in started:
                    await self._follow(connection, name)
                    started.add(name)
            missing = [] if self.tables is None else [
                name for name in self.tables if name not in started
            ]
            if missing:
                self.last_error = f"not hosted upstream yet: {', '.join(missing)}"
                logger.warning("upstream %s: %s", self.upstream, self.last_error)
            else:
                await self._check_ready(started)
            closed = asyncio.ensure_future(connection.wait_closed())
            changed = asyncio.ensure_future(listed.wait())
            await asyncio.wait({closed, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            closed.cancel()
            if connection.closed:
                return

    async def _check_ready(self, names: Collection[str]) -> None:
        # Ready once every table's snapshot has been applied.
        followers = [self._followers[name] for name in names]
        while not all(f.status.synced for f in followers) and self._connected:
            await asyncio.sleep(0.01)
        if self._connected and not self._ready.is_set():
            self._ready.set()
            logger.info("upstream %s: %d table(s) synchronised", self.upstream, len(followers))

    async def _follow(self, connection: Connection, name: str) -> None:
        client = connection.client
        follower = self._followers.get(name)
        if follower is None:
            follower = self._followers[name] = _Follower(name, self._local, self._resync)
            self._follower_tasks.append(asyncio.ensure_future(follower.run()))
        generation = follower.generation
        remote = await client.open_table(name)
        if follower.table is None:
            # The first copy takes the upstream table's index or limit; later snapshots
            # replace rows only.
            follower.index = remote.get_index()
            follower.limit = remote.get_limit()
        # Every column, named: virtual servers (DuckDB) have no default column list.
        view = await remote.view(columns=list(await remote.schema()))

        view_id = connection.view_made_on(name)
        if view_id is None:
            raise RuntimeError(f"no view was made on table {name!r}")
        # Without on_remove (perspective-python 4) removals send an update with no rows of
        # theirs; and a replace or clear of a table with no index sends only the new rows, which
        # appending would add to the old. Deltas alone keep only a 5.x indexed copy exact;
        # the others are checked against the upstream's size after each burst of changes.
        follower.exact = bool(follower.index) and hasattr(view, "on_remove")

        def pusher(kind: str) -> Callable[..., None]:
            def push(*args: Any) -> None:
                # (port_id, arrow bytes) from the in-memory engine; virtual servers call with
                # no rows, which there is nothing to apply from.
                if len(args) == 2 and isinstance(args[1], bytes):
                    follower.push(kind, args[1], generation)
                    if not follower.exact:
                        self._check_size(connection, follower, generation)

            return push

        try:
            await view.on_update(pusher("update"), mode="row")
            if hasattr(view, "on_remove"):
                await view.on_remove(pusher("remove"))
        except perspective.PerspectiveError as exc:
            # Virtual servers push no updates: the edge holds a snapshot per connection.
            logger.info("table %r pushes no updates (%s); replicating a snapshot", name, exc)

        def refresh() -> None:
            if generation == follower.generation:
                self._spawn(self._snapshot(connection, follower, view_id, generation))

        def check() -> None:
            asyncio.get_running_loop().call_later(
                RECHECK_DELAY, self._check_size, connection, follower, generation
            )

        follower.refresh = refresh
        follower.check = check
        await self._snapshot(connection, follower, view_id, generation)

    async def _snapshot(
        self, connection: Connection, follower: _Follower, view_id: str, generation: int
    ) -> None:
        """Queue the view's rows as the table's snapshot, at the reply's place among the
        deltas: those before it are in it, those after go on top. Awaiting the Perspective
        client's ``to_arrow`` would place it later, after deltas that arrived meanwhile and
        that the snapshot does not hold."""

        def queue(reply: bytes) -> None:
            envelope = read_envelope(reply)
            if envelope.kind != VIEW_TO_ARROW:
                raise perspective.PerspectiveError(f"no snapshot of {follower.name!r}: "
                                                   f"{read_error_message(envelope.body)}")
            follower.push("snapshot", read_arrow(envelope.body), generation)

        # The whole view: an empty viewport (which virtual servers need to be present).
        request = encode_message(0, view_id, VIEW_TO_ARROW, encode_field(1, b""))
        # If the connection ends first, the next one takes its own.
        with contextlib.suppress(ConnectionClosed):
            await connection.request(request, on_reply=queue)

    def _check_size(self, connection: Connection, follower: _Follower, generation: int) -> None:
        follower.unchecked = True
        if not follower.checking:
            follower.checking = True
            self._spawn(self._size_checks(connection, follower, generation))

    async def _size_checks(
        self, connection: Connection, follower: _Follower, generation: int
    ) -> None:
        """Ask the upstream for the table's size until a reply follows every delta received;
        each reply queues a check of the copy's size at its place among them."""
        request = encode_message(0, follower.name, TABLE_SIZE)
        try:
            while follower.unchecked and generation == follower.generation:
                follower.unchecked = False
                await connection.request(
                    request, on_reply=lambda reply: follower.push_check(reply, generation)
                )
        except ConnectionClosed:
            pass
        finally:
            follower.checking = False

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
