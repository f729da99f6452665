"""Shared views: identical views of many connections cost the engine one view.

Every viewer of a dashboard asks for the same view of the same table, and the engine would
recompute each of those views on every update. With sharing, a ``table_make_view`` of a
``perspective.Server`` whose table and configuration equal those of a live view, byte for
byte but for the order of map entries (``aggregates``, ``expressions``, ``windows``: the stock
clients write them in hash order; no other matching), gets an *alias* of that view instead of
a new one:

* the engine views belong to one private session per engine (``SharedViews``), are counted
  by aliases, and are deleted with their last alias;
* a request on an alias goes to its engine view with the message and view ids rewritten, and
  its reply comes back with the client's own ids (``ViewRouter``, the session a connection's
  runner drives);
* each engine view has one engine subscription per kind and mode (a *feed*); an update is
  encoded once by the engine and sent to each subscriber with only its header replaced;
* a request that changes a view's state for everyone (``view_expand``, ``view_collapse``,
  ``view_set_depth``, any kind not known to be a pure read) first gives that alias a view of
  its own (copy on write): a fresh engine view of the same configuration, which is what the
  shared view still is, since no request ever changes a shared view.

What a client sees is what its own view would have shown, byte for byte, ids aside. Three
engine behaviours shape that:

* a view's first row-mode subscription turns its row deltas on for good, and from then on
  every subscription of it gets the delta, with a mode or without; so each alias remembers
  whether its own view would have them on, a shared feed's delta is stripped for the
  subscribers whose view would not, and a copy made for an alias whose view would is
  turned on first (a row-mode subscription, ended at once);
* on a grouped view (``group_by`` or ``split_by``) the second delta-carrying subscription
  of a view gets a different delta than the first (each one consumes the view's change set);
  so an alias asking for a delta on a grouped view, or for a second subscription of any kind,
  gets a view of its own with its subscriptions registered natively, in its order;
* a subscription without a mode carries only the port of the update, the same for every view
  of a table; so an alias that copies its view on write keeps that subscription on the
  shared view's feed (it *borrows* it), with no instant where an update could be lost,
  until it turns its own view's deltas on.

Moving a subscription to another engine view (a copy, or the alias's own view when it stops
borrowing) subscribes there before it leaves the old one: an update the engine dispatches at
that instant, on another thread, may reach the alias twice, never not at all. Only a client
that asks for a second subscription on one view, or changes the depth of a view it
subscribed to, can meet it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

from .._types import SessionFactory
from .wire import (
    SERVER_ERROR,
    TABLE_DATA_REQUEST_KINDS,
    TABLE_MAKE_VIEW,
    VIEW_DELETE,
    VIEW_ON_DELETE,
    VIEW_ON_REMOVE,
    VIEW_ON_UPDATE,
    VIEW_REMOVE_DELETE,
    VIEW_REMOVE_ON_REMOVE,
    VIEW_REMOVE_ON_UPDATE,
    VIEW_REQUEST_KINDS,
    Envelope,
    encode_field,
    encode_header,
    encode_message,
    encode_string,
    read_envelope,
    read_fields,
    read_id,
    read_make_view,
    split_header,
)

logger = logging.getLogger("perspective_asgi")

#: Subscriptions, and the request that ends each.
_SUBSCRIBE = {VIEW_ON_UPDATE: VIEW_REMOVE_ON_UPDATE, VIEW_ON_REMOVE: VIEW_REMOVE_ON_REMOVE}
_UNSUBSCRIBE = {end: start for start, end in _SUBSCRIBE.items()}

#: View requests that read a view and change nothing: safe to run on a shared view.
PURE_VIEW_KINDS = frozenset({10, 12, 13, 14, 15, 16, 20, 24, 25, 26, 36})

#: ``view_expand`` and ``view_collapse`` change nothing on a flat view (they answer
#: ``num_changed: 0``): only a grouped view has rows to expand.
_FLAT_NO_OPS = frozenset({18, 19})

#: The map fields of ``ViewConfig`` (``expressions``, ``aggregates``, ``windows``): the stock
#: clients write their entries in hash order, different for two requests of one configuration.
_CONFIG_MAPS = frozenset({6, 7, 11})

#: ``ViewOnUpdateReq`` with ``mode: ROW``.
_ROW_MODE = encode_field(1, 0)

#: Bytes of read replies a shared view keeps between two changes: a few windows of a grid.
MAX_READ_BYTES = 4 * 1024 * 1024

#: Generations of views, process-wide (``next`` of a count is atomic in CPython).
_generations = itertools.count(1)

Deliver = Callable[[bytes], object]


class _Subscriber:
    """One client subscription fed by a feed: where to send, and under which header."""

    __slots__ = ("borrowed", "deliver", "header", "strip")

    def __init__(self, deliver: Deliver, header: bytes, strip: bool) -> None:
        self.deliver = deliver
        #: The client's ``msg_id`` and view id, encoded once.
        self.header = header
        #: Send the update without its row delta: the client asked for none.
        self.strip = strip
        #: Fed by a view the alias copied away from (see the module docstring).
        self.borrowed = False


class _Feed:
    """One engine subscription (``view_on_update`` or ``view_on_remove``) of one engine view."""

    __slots__ = ("kind", "mode", "msg_id", "subscribers", "view")

    def __init__(self, kind: int, mode: bytes, msg_id: int, view: _EngineView) -> None:
        self.kind = kind
        #: The request's body, e.g. ``b""`` (no mode) or ``b"\x08\x00"`` (row mode).
        self.mode = mode
        self.msg_id = msg_id
        self.view = view
        #: Replaced, never changed in place: a dispatch on another thread reads it unlocked.
        self.subscribers: tuple[_Subscriber, ...] = ()

    def dispatch(self, data: bytes, start: int) -> None:
        self.view.changed()  # before anyone hears of the update, who may read it again
        body = data[start:]
        stripped: bytes | None = None
        for subscriber in self.subscribers:
            if subscriber.strip:
                if stripped is None:
                    stripped = _without_delta(body)
                subscriber.deliver(subscriber.header + stripped)
            else:
                subscriber.deliver(subscriber.header + body)


class _EngineView:
    """A view of the private session, and who uses it."""

    __slots__ = ("aliases", "borrowers", "config", "deltas", "engine_id", "feeds", "generation",
                 "grouped", "key", "native", "read_bytes", "reads", "table")

    def __init__(self, engine_id: str, table: str, config: bytes | None) -> None:
        self.engine_id = engine_id
        self.table = table
        #: The ``ViewConfig`` bytes as the first client sent them (``None``: none sent).
        self.config = config
        self.grouped = _is_grouped(config)
        #: The index key while other connections may alias it; ``None`` once it is private.
        self.key: tuple[str, bytes | None] | None = None
        self.aliases = 0
        #: Subscriptions of aliases that copied away, still fed from here.
        self.borrowers = 0
        #: Shared feeds, by ``(kind, mode)``.
        self.feeds: dict[tuple[int, bytes], _Feed] = {}
        #: Feeds of one subscriber each, registered in the alias's order (a private view).
        self.native: list[_Feed] = []
        #: The engine computes row deltas for this view, and sends them to every
        #: subscription of it, with a mode or not: from its first row-mode subscription on,
        #: for good (the engine never turns them off).
        self.deltas = False
        #: Replies to reads since the view last changed, by request kind and body: every
        #: viewer reads the same window after each update (see ``SharedViews.read``). Kept
        #: only while the view has a feed, which tells it of changes: its last one clears them.
        self.reads: dict[tuple[int, bytes], bytes] = {}
        self.read_bytes = 0
        #: Changes each time the view may have changed: a read computed across one is stale.
        self.generation = 0

    @property
    def unused(self) -> bool:
        return not self.aliases and not self.borrowers

    def changed(self) -> None:
        self.generation = next(_generations)
        self.reads = {}
        self.read_bytes = 0

    def cached(self, kind: int, body: bytes) -> bytes | None:
        return self.reads.get((kind, body))


class _Alias:
    """One client view id of one connection, and the engine view behind it."""

    __slots__ = ("client_id", "deltas", "on_delete", "source", "subscriptions", "view")

    def __init__(self, client_id: str, view: _EngineView) -> None:
        self.client_id = client_id
        self.view = view
        #: The client asked for a row-mode subscription of this view once: a view of its
        #: own would have deltas on (``_EngineView.deltas``) from then on.
        self.deltas = False
        #: A table was made from it: its (private) engine view must outlive the alias if
        #: the engine refuses to delete a view with a table depending on it.
        self.source = False
        #: By the ``msg_id`` of the client's subscribing request.
        self.subscriptions: dict[int, tuple[_Feed, _Subscriber]] = {}
        #: ``msg_id``s of ``view_on_delete`` requests, answered when the alias is deleted.
        self.on_delete: list[int] = []


class SharedViews:
    """One engine's shared views, served by a private session of that engine."""

    def __init__(self, factory: SessionFactory) -> None:
        self._factory = factory
        #: Opened with the first view: a connection that makes none costs the engine nothing.
        self._session: Any = None
        self._lock = threading.Lock()
        self._index: dict[tuple[str, bytes | None], _EngineView] = {}
        #: Views being made, by key, each set once its view is in ``_index`` (or failed).
        self._making: dict[tuple[str, bytes | None], threading.Event] = {}
        #: Every feed, by its engine ``msg_id``.
        self._feeds: dict[int, _Feed] = {}
        #: Replies to requests in flight, by ``msg_id``; filled within ``handle_request``.
        self._pending: dict[int, list[bytes]] = {}
        self._msg_ids = itertools.count(1)
        self._view_ids = itertools.count(1)
        # Not guessable, and not reachable anyway: the view guard admits only a connection's
        # own view ids, and with sharing those never reach the engine.
        self._prefix = f"shared-{secrets.token_hex(6)}-"
        #: Engine views alive, and aliases of them.
        self.views = 0
        self.aliases = 0
        #: Reads answered by the engine, and from a shared view's replies (``read``).
        self.engine_reads = 0
        self.cached_reads = 0
        #: Connections using these views.
        self.connections = 0

    # The engine ----------------------------------------------------------------------------

    def _next_msg_id(self) -> int:
        return next(self._msg_ids) % 0xFFFFFFFF + 1

    def call(self, kind: int, entity_id: str, body: bytes | memoryview) -> bytes:
        """Run one request on the private session and return the engine's reply to it."""
        msg_id = self._next_msg_id()
        replies: list[bytes] = []
        self._pending[msg_id] = replies
        try:
            self._open().handle_request(encode_message(msg_id, entity_id, kind, body))
        finally:
            del self._pending[msg_id]
        if not replies:
            raise RuntimeError(f"the engine did not answer request kind {kind} in its call")
        return replies[0]

    def _open(self) -> Any:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._factory.new_session(self._on_reply)
        return self._session

    def _on_reply(self, data: bytes) -> None:
        # Perspective's callback: any thread, and it must never raise into the engine.
        try:
            data = bytes(data)
            msg_id, start = split_header(data)
            replies = self._pending.get(msg_id)
            if replies is not None:
                replies.append(data)
                return
            feed = self._feeds.get(msg_id)
            if feed is not None:
                feed.dispatch(data, start)
        except Exception:
            logger.exception("shared views: dropped an engine message")

    # Views ---------------------------------------------------------------------------------

    def view_for(self, table: str, config: bytes | None) -> tuple[_EngineView | None, bytes]:
        """Return a shared view of ``table`` with ``config`` and its ``table_make_view``
        reply, or ``None`` and the engine's error."""
        key = (table, _config_key(config))
        while True:
            with self._lock:
                view = self._index.get(key)
                if view is not None:
                    view.aliases += 1
                    self.aliases += 1
                    return view, b""
                making = self._making.get(key)
                if making is None:
                    making = self._making[key] = threading.Event()
                    break
            # Another connection is making this view, in another thread: wait for it rather
            # than make a second one (the pages of a dashboard reconnecting after a restart
            # all ask at once). If it failed, the next attempt makes its own.
            making.wait()
        try:
            view, reply = self._create(table, config)
            if view is not None:
                with self._lock:
                    self._index[key] = view
                    view.key = key
        finally:
            with self._lock:
                del self._making[key]
            making.set()
        return view, reply

    def _create(self, table: str, config: bytes | None) -> tuple[_EngineView | None, bytes]:
        engine_id = self._prefix + str(next(self._view_ids))
        body = encode_string(1, engine_id)
        if config is not None:
            body += encode_field(2, config)
        reply = self.call(TABLE_MAKE_VIEW, table, body)
        if _is_error(reply):
            return None, reply
        view = _EngineView(engine_id, table, config)
        with self._lock:
            view.aliases = 1
            self.views += 1
            self.aliases += 1
        return view, reply

    def read(self, view: _EngineView, kind: int, body: bytes) -> bytes:
        """The engine's reply to a pure read of ``view``, computed once per change of it.

        A shared view with a feed hears of every change before its subscribers do (the feed
        clears the replies kept first), so a reply kept since is what the engine would say
        again. One without a feed is never told, and keeps nothing.
        """
        kept = view.cached(kind, body)
        if kept is not None:
            self.cached_reads += 1
            return kept
        generation = view.generation
        reply = self.call(kind, view.engine_id, body)
        self.engine_reads += 1
        if (view.feeds and view.generation == generation and not _is_error(reply)
                and view.read_bytes + len(reply) <= MAX_READ_BYTES):
            view.reads[(kind, body)] = reply
            view.read_bytes += len(reply)
        return reply

    def make_private(self, alias: _Alias, *, borrow: bool) -> None:
        """Give ``alias`` an engine view no other alias uses, before it changes its state.

        ``borrow``: keep the alias's subscriptions without a mode on the old view's feed.
        """
        view = alias.view
        with self._lock:
            if view.key is None and view.aliases == 1:
                return  # private already
            if view.aliases == 1 and not view.borrowers and view.deltas == alias.deltas:
                # Nobody else sees this view: it becomes the alias's own, as it is.
                self._unindex(view)
                for feed in view.feeds.values():
                    for subscriber in feed.subscribers:
                        subscriber.strip = False
                    view.native.append(feed)
                view.feeds = {}
                return
        copy, reply = self._create(view.table, view.config)
        if copy is None:
            raise RuntimeError(f"the engine refused to copy a view it made: {reply!r}")
        if alias.deltas:
            self._enable_deltas(copy)
            borrow = False  # the copy sends deltas to every subscription: the shared one may not
        alias.view = copy
        moved = [
            (msg_id, feed, subscriber)
            for msg_id, (feed, subscriber) in alias.subscriptions.items()
            if not (borrow and subscriber.strip)
        ]
        with self._lock:
            for feed, subscriber in alias.subscriptions.values():
                if borrow and subscriber.strip and not subscriber.borrowed:
                    subscriber.borrowed = True
                    feed.view.borrowers += 1
            view.aliases -= 1
            self.aliases -= 1  # the copy counted the alias again
        for msg_id, feed, subscriber in moved:
            self._move(alias, msg_id, feed, subscriber)
        with self._lock:
            actions = self._drop(view) if view.unused else []
        self._run(actions)

    def _enable_deltas(self, view: _EngineView) -> None:
        # The one way there is: a row-mode subscription, ended at once.
        msg_id = self._next_msg_id()
        self._open().handle_request(encode_message(msg_id, view.engine_id, VIEW_ON_UPDATE,
                                                   _ROW_MODE))
        self._run([(VIEW_REMOVE_ON_UPDATE, view.engine_id, encode_field(1, msg_id))])
        view.deltas = True

    def stop_borrowing(self, alias: _Alias) -> None:
        """Feed the borrowed subscriptions of a private ``alias`` from its own view: it is
        about to ask for a delta, which its own view then sends them too."""
        for msg_id, (feed, subscriber) in list(alias.subscriptions.items()):
            if subscriber.borrowed:
                self._move(alias, msg_id, feed, subscriber)

    def _move(self, alias: _Alias, msg_id: int, feed: _Feed, subscriber: _Subscriber) -> None:
        # Subscribed before it leaves the old feed: an update at that instant may come twice
        # (a client rereads the view), never not at all.
        native = self.subscribe(alias.view, feed.kind, feed.mode, subscriber.deliver,
                                subscriber.header, strip=False)
        alias.subscriptions[msg_id] = (native, native.subscribers[0])
        self._run(self._leave(feed, subscriber))

    def release(self, alias: _Alias, *, deleted: bool = False) -> None:
        """End every subscription of ``alias`` and drop its view, if it was the last user.

        ``deleted``: the engine view is deleted already.
        """
        actions: list[tuple[int, str, bytes]] = []
        subscriptions = list(alias.subscriptions.values())
        alias.subscriptions.clear()
        with self._lock:
            view = alias.view
            view.aliases -= 1
            self.aliases -= 1
            for feed, subscriber in subscriptions:
                actions += self._leave(feed, subscriber)
            if view.unused:
                dropping = self._drop(view)
                if not deleted:
                    actions += dropping
        self._run(actions)

    def unsubscribe(self, feed: _Feed, subscriber: _Subscriber) -> None:
        with self._lock:
            actions = self._leave(feed, subscriber)
        self._run(actions)

    def subscribe(
        self, view: _EngineView, kind: int, mode: bytes, deliver: Deliver, header: bytes,
        *, strip: bool,
    ) -> _Feed:
        """Feed ``deliver`` from ``view``: a shared feed, or a native one on a private view."""
        subscriber = _Subscriber(deliver, header, strip)
        with self._lock:
            private = view.key is None
            feed = None if private else view.feeds.get((kind, mode))
            if feed is not None:
                feed.subscribers += (subscriber,)
                return feed
            feed = _Feed(kind, mode, self._next_msg_id(), view)
            feed.subscribers = (subscriber,)
            view.deltas |= _enables_deltas(kind, mode)
            if private:
                view.native.append(feed)
            else:
                view.feeds[(kind, mode)] = feed
            self._feeds[feed.msg_id] = feed
        # The engine answers a subscription with nothing until its first update.
        self._open().handle_request(encode_message(feed.msg_id, view.engine_id, kind, mode))
        # A reply kept before the engine had the feed may miss a change nobody was told of.
        view.changed()
        return feed

    # Under the lock: what to change, and which engine requests that takes -----------------

    def _leave(self, feed: _Feed, subscriber: _Subscriber) -> list[tuple[int, str, bytes]]:
        feed.subscribers = tuple(s for s in feed.subscribers if s is not subscriber)
        view = feed.view
        actions: list[tuple[int, str, bytes]] = []
        if not feed.subscribers:
            self._forget(feed)
            if view.aliases or view.borrowers > int(subscriber.borrowed):
                actions.append((_SUBSCRIBE[feed.kind], view.engine_id,
                                encode_field(1, feed.msg_id)))
        if subscriber.borrowed:
            subscriber.borrowed = False
            view.borrowers -= 1
            if view.unused:
                actions += self._drop(view)
        return actions

    def _forget(self, feed: _Feed) -> None:
        self._feeds.pop(feed.msg_id, None)
        view = feed.view
        if view.feeds.get((feed.kind, feed.mode)) is feed:
            del view.feeds[(feed.kind, feed.mode)]
            if not view.feeds:
                view.changed()  # nobody will tell it of changes any more
        if feed in view.native:
            view.native.remove(feed)

    def _drop(self, view: _EngineView) -> list[tuple[int, str, bytes]]:
        self._unindex(view)
        for feed in [*view.feeds.values(), *view.native]:
            self._forget(feed)
        self.views -= 1
        # Deleting the view ends its subscriptions in the engine too.
        return [(VIEW_DELETE, view.engine_id, b"")]

    def _unindex(self, view: _EngineView) -> None:
        if view.key is not None and self._index.get(view.key) is view:
            del self._index[view.key]
        view.key = None

    def _run(self, actions: list[tuple[int, str, bytes]]) -> None:
        for kind, entity_id, body in actions:
            reply = self.call(kind, entity_id, body)
            if _is_error(reply):
                logger.warning("shared views: the engine refused kind %d on %s", kind, entity_id)

    def close(self) -> None:
        """Close the private session (its last connection has ended)."""
        session, self._session = self._session, None
        close = getattr(session, "close", None)
        if close is not None:
            close()


class ViewRouter:
    """The session a connection's runner drives when its views are shared.

    View requests on the connection's aliases go to the shared views; everything else goes
    to the connection's own Perspective session, unchanged.
    """

    __slots__ = ("_aliases", "_deliver", "_on_close", "_own", "_shared", "_zombies")

    def __init__(
        self, shared: SharedViews, own: Any, deliver: Deliver, *, on_close: Callable[[], None]
    ) -> None:
        self._shared = shared
        self._own = own
        #: Called once the connection's session is closed.
        self._on_close = on_close
        #: The connection's own reply callback: replies from shared views go the same way.
        self._deliver = deliver
        self._aliases: dict[str, _Alias] = {}
        #: Aliases deleted while a table depends on their engine view.
        self._zombies: list[_Alias] = []

    def may_run_inline(self, envelope: Envelope) -> bool:
        """Whether a request that is cheap for the engine stays cheap here: a subscription
        that copies a view makes one, which may take long."""
        kind = envelope.kind
        if kind not in _SUBSCRIBE:
            return True
        alias = self._aliases.get(envelope.entity_id)
        return alias is None or not self._copies_on(alias, kind, bytes(envelope.body))

    def answers_at_once(self, envelope: Envelope) -> bool:
        """Whether a request is a read the engine answered since its view last changed: its
        reply is at hand, so it may run on the loop even while the engine is busy."""
        kind = envelope.kind
        if kind not in PURE_VIEW_KINDS:
            return False
        alias = self._aliases.get(envelope.entity_id)
        return (alias is not None and alias.view.key is not None
                and alias.view.cached(kind, bytes(envelope.body)) is not None)

    def handle_request(self, data: bytes) -> None:
        envelope = read_envelope(data)
        kind = envelope.kind
        if kind == TABLE_MAKE_VIEW:
            self._make_view(envelope)
            return
        if kind in VIEW_REQUEST_KINDS:
            alias = self._aliases.get(envelope.entity_id)
            if alias is not None:
                self._on_alias(alias, envelope)
                return
        elif kind in TABLE_DATA_REQUEST_KINDS:
            data = self._readdress_source(envelope, data)
        self._own.handle_request(data)

    def close(self) -> None:
        try:
            aliases, self._aliases = [*self._aliases.values(), *self._zombies], {}
            self._zombies = []
            for alias in aliases:
                self._shared.release(alias)
        finally:
            try:
                self._own.close()
            finally:
                self._on_close()

    # Requests ------------------------------------------------------------------------------

    def _make_view(self, envelope: Envelope) -> None:
        view_id, config = read_make_view(envelope.body)
        table = envelope.entity_id
        view, reply = self._shared.view_for(table, config)
        if view is None:
            self._deliver(_readdressed(reply, envelope.msg_id, table))
            return
        self._aliases[view_id] = _Alias(view_id, view)
        self._deliver(encode_message(envelope.msg_id, table, TABLE_MAKE_VIEW,
                                     encode_string(1, view_id)))

    def _on_alias(self, alias: _Alias, envelope: Envelope) -> None:
        kind = envelope.kind
        assert kind is not None
        if kind == VIEW_DELETE:
            self._delete(alias, envelope)
        elif kind in _SUBSCRIBE:
            self._subscribe(alias, kind, envelope)
        elif kind in _UNSUBSCRIBE:
            self._unsubscribe(alias, kind, envelope)
        elif kind == VIEW_ON_DELETE:
            alias.on_delete.append(envelope.msg_id)  # the engine answers it at the delete
        elif kind == VIEW_REMOVE_DELETE:
            target = read_id(envelope.body)
            alias.on_delete = [msg_id for msg_id in alias.on_delete if msg_id != target]
            self._answer(envelope, alias)
        elif kind in PURE_VIEW_KINDS and alias.view.key is not None:
            reply = self._shared.read(alias.view, kind, bytes(envelope.body))
            self._deliver(_readdressed(reply, envelope.msg_id, alias.client_id))
        else:
            if kind not in PURE_VIEW_KINDS and (alias.view.grouped or kind not in _FLAT_NO_OPS):
                self._shared.make_private(alias, borrow=True)
            reply = self._shared.call(kind, alias.view.engine_id, envelope.body)
            self._deliver(_readdressed(reply, envelope.msg_id, alias.client_id))

    def _copies_on(self, alias: _Alias, kind: int, mode: bytes) -> bool:
        if alias.view.key is None:
            return False  # private: subscriptions are native already
        return bool(alias.subscriptions) or (_wants_delta(kind, mode) and alias.view.grouped)

    def _subscribe(self, alias: _Alias, kind: int, envelope: Envelope) -> None:
        mode = bytes(envelope.body)
        enables = _enables_deltas(kind, mode)
        if self._copies_on(alias, kind, mode):
            self._shared.make_private(alias, borrow=False)
        elif alias.view.key is None and enables:
            self._shared.stop_borrowing(alias)
        feed = self._shared.subscribe(
            alias.view, kind, mode, self._deliver,
            encode_header(envelope.msg_id, alias.client_id),
            strip=(kind == VIEW_ON_UPDATE and not mode and alias.view.key is not None
                   and not alias.deltas),
        )
        alias.subscriptions[envelope.msg_id] = (feed, feed.subscribers[-1])
        alias.deltas |= enables

    def _unsubscribe(self, alias: _Alias, kind: int, envelope: Envelope) -> None:
        target = read_id(envelope.body)
        entry = alias.subscriptions.get(target)
        if entry is not None and entry[0].kind == _UNSUBSCRIBE[kind]:
            del alias.subscriptions[target]
            self._shared.unsubscribe(*entry)
        self._answer(envelope, alias)

    def _delete(self, alias: _Alias, envelope: Envelope) -> None:
        del self._aliases[alias.client_id]
        reply = None
        if alias.source:
            # Its view is its own: the engine decides, as it would for the client's own view.
            reply = self._shared.call(VIEW_DELETE, alias.view.engine_id, b"")
            if _is_error(reply):
                # The client may no longer use the id (the view guard freed it), but the
                # engine keeps the view for the table made from it, until the connection ends.
                self._zombies.append(alias)
                self._deliver(_readdressed(reply, envelope.msg_id, alias.client_id))
                return
        # In the engine's order: each on_delete notification, then the delete's own reply.
        for msg_id in alias.on_delete:
            self._deliver(encode_message(msg_id, alias.client_id, VIEW_ON_DELETE))
        self._shared.release(alias, deleted=reply is not None)
        self._answer(envelope, alias)

    def _answer(self, envelope: Envelope, alias: _Alias) -> None:
        """Send the reply the engine gives these requests: an empty message of their kind."""
        assert envelope.kind is not None
        self._deliver(encode_message(envelope.msg_id, alias.client_id, envelope.kind))

    def _readdress_source(self, envelope: Envelope, data: bytes) -> bytes:
        """Point a table made or updated from one of the connection's views at its engine
        view."""
        body = b""
        changed = False
        for number, value in read_fields(envelope.body):
            if number == 1 and isinstance(value, memoryview):
                table_data = b""
                for data_number, data_value in read_fields(value):
                    if data_number == 6 and isinstance(data_value, memoryview):
                        alias = self._aliases.get(str(data_value, "utf-8", "replace"))
                        if alias is not None:
                            if not alias.source:
                                self._shared.make_private(alias, borrow=True)
                                alias.source = True
                            data_value = memoryview(alias.view.engine_id.encode())
                            changed = True
                    table_data += _field(data_number, data_value)
                value = memoryview(table_data)
            body += _field(number, value)
        if not changed:
            return data
        assert envelope.kind is not None
        return encode_message(envelope.msg_id, envelope.entity_id, envelope.kind, body)


_registry_lock = threading.Lock()
#: Each engine's shared views, by ``id`` of the engine; dropped with its last connection
#: (engines take no weak references, and an id may be reused once one is collected).
_shared_views: dict[int, SharedViews] = {}


def router_for(engine: SessionFactory, own: Any, deliver: Deliver) -> ViewRouter:
    """The session a connection's runner drives in place of ``own``, its session of
    ``engine``: its views are shared with the engine's other connections."""
    key = id(engine)
    # The core's own session is opened on the engine itself, past any wrapper of a factory.
    shared = join(key, engine)
    return ViewRouter(shared, own, deliver, on_close=lambda: leave(key, shared))


def join(engine_key: int, factory: SessionFactory) -> SharedViews:
    """The shared views of the engine ``engine_key``, for one more connection."""
    with _registry_lock:
        shared = _shared_views.get(engine_key)
        if shared is None:
            shared = _shared_views[engine_key] = SharedViews(factory)
        shared.connections += 1
        return shared


def leave(engine_key: int, shared: SharedViews) -> None:
    """One connection of the engine ``engine_key`` has ended."""
    with _registry_lock:
        shared.connections -= 1
        if shared.connections or _shared_views.get(engine_key) is not shared:
            return
        del _shared_views[engine_key]
    shared.close()


def totals() -> tuple[int, int]:
    """Engine views serving aliases, and aliases, across the process."""
    with _registry_lock:
        every = list(_shared_views.values())
    return sum(s.views for s in every), sum(s.aliases for s in every)


def _field(number: int, value: int | memoryview) -> bytes:
    return encode_field(number, value if isinstance(value, int) else bytes(value))


def _is_error(reply: bytes) -> bool:
    return read_envelope(reply).kind == SERVER_ERROR


def _readdressed(reply: bytes, msg_id: int, entity_id: str) -> bytes:
    _, start = split_header(reply)
    return encode_header(msg_id, entity_id) + reply[start:]


def _wants_delta(kind: int, mode: bytes) -> bool:
    """Whether a subscription's updates carry rows: any but ``on_update`` without a mode."""
    return kind != VIEW_ON_UPDATE or bool(mode)


def _enables_deltas(kind: int, mode: bytes) -> bool:
    """Whether a subscription turns its view's row deltas on: ``on_update`` in row mode."""
    if kind != VIEW_ON_UPDATE:
        return False
    chosen = [value for number, value in read_fields(mode) if number == 1]
    return bool(chosen) and chosen[-1] == 0


def _config_key(config: bytes | None) -> bytes | None:
    """``config`` with the entries of its map fields sorted: two configurations equal but for
    that order share a view. Anything else keeps its bytes as they are."""
    if not config:
        return config
    plain = b""
    maps: dict[int, dict[bytes, bytes]] = {}
    for number, value in read_fields(config):
        if number in _CONFIG_MAPS and isinstance(value, memoryview):
            name = b""
            for inner, inner_value in read_fields(value):
                if inner == 1 and isinstance(inner_value, memoryview):
                    name = bytes(inner_value)
            # A name given twice: the last entry is the one the engine keeps.
            maps.setdefault(number, {})[name] = bytes(value)
        else:
            plain += _field(number, value)
    key = plain + b"".join(encode_field(number, maps[number][name])
                           for number in sorted(maps) for name in sorted(maps[number]))
    # Shorter when a field was left out by ``read_fields`` (fixed-width) or re-encoded
    # shorter (an overlong varint), or when a name was given twice: keep the bytes then.
    return key if len(key) == len(config) else config


def _is_grouped(config: bytes | None) -> bool:
    """Whether a view of ``config`` has rows to expand: any ``group_by`` or ``split_by``."""
    if not config:
        return False
    return any(number in (1, 2) for number, _ in read_fields(config))


def _without_delta(body: bytes) -> bytes:
    """A ``ViewOnUpdateResp`` member with its row delta left out (the port kept)."""
    port = 0
    for number, value in read_fields(body):
        if number != VIEW_ON_UPDATE or not isinstance(value, memoryview):
            return body  # an error, not an update: pass it on as it is
        for inner, inner_value in read_fields(value):
            if inner == 2 and isinstance(inner_value, int):
                port = inner_value
    return encode_field(VIEW_ON_UPDATE, encode_field(2, port) if port else b"")
