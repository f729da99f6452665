"""Refuses view requests that would crash the engine, before they reach it.

The engine trusts its clients with view ids, and a websocket client is not to be trusted:

* view ids are chosen by the client, and any session may act on any view. When one session
  deletes a view another created, or two sessions create views with the same id, closing those
  sessions aborts the process (the engine throws ``PerspectiveViewNotFoundException`` out of a
  destructor). So each connection may act only on the views it created, and a view id may be
  live on one connection of an engine at a time.
* a table made from a view (``client.table(view)``) names the view by id: it must be one of
  the connection's own views too, or it would copy another connection's view.
* a filter with no value, for any operator but ``in`` and ``not in``, dereferences a null
  pointer (perspective-python 4.4 and 5.6). The stock clients always send a value (``null`` for
  ``is null``), so only hand-built frames are refused.
* ``view_column_paths`` with an end column before its start column makes the engine allocate
  gigabytes for tens of seconds (perspective-python 5.6.1; found by the shared-views
  differential test). The stock clients never send one.

A refused request is answered with Perspective's own ``ServerError``, so the client's promise
rejects and the connection stays usable.
"""

from __future__ import annotations

import threading

from .._exceptions import ProtocolError
from .policy import Refused
from .wire import (
    SERVER_ERROR,
    TABLE_DATA_REQUEST_KINDS,
    TABLE_MAKE_VIEW,
    VIEW_COLUMN_PATHS,
    VIEW_DELETE,
    VIEW_REQUEST_KINDS,
    Envelope,
    read_envelope,
    read_fields,
    read_make_view,
    read_source_view,
)

#: ``StatusCode.VIEW_NOT_FOUND``: what the engine answers for a view it does not know.
VIEW_NOT_FOUND = 1

#: Filter operators the engine accepts with no value: the empty set.
_OPERATORS_WITHOUT_VALUE = frozenset({"in", "not in"})

_registry_lock = threading.Lock()
#: Live view ids per engine (keyed by ``id``; an engine outlives the connections that hold it).
_live_views: dict[int, set[str]] = {}


class ViewGuard:
    """One connection's views; answers whether each request may reach the engine."""

    __slots__ = ("_creating", "_engine", "_max_views", "_owned")

    def __init__(self, engine: object, max_views: int | None = None) -> None:
        self._engine = id(engine)
        self._max_views = max_views
        #: The table of each view this connection created and has not deleted.
        self._owned: dict[str, str] = {}
        #: The msg_id and view id of the view being created, until the engine answers.
        self._creating: tuple[int, str] | None = None

    @property
    def holds_views(self) -> bool:
        """Whether this connection has a live view."""
        return bool(self._owned)

    def table_of(self, view_id: str) -> str | None:
        """The table a view of this connection was made on."""
        return self._owned.get(view_id)

    def refuse(self, envelope: Envelope) -> Refused | None:
        """Return why ``envelope`` is refused, or ``None`` to let it through.

        Called in the order requests are handed to the engine, one at a time.
        """
        kind = envelope.kind
        if kind in VIEW_REQUEST_KINDS:
            if envelope.entity_id not in self._owned:
                return _not_found(envelope.entity_id)
            if kind == VIEW_COLUMN_PATHS:
                return _check_column_range(envelope.body)
            return None
        if kind in TABLE_DATA_REQUEST_KINDS:
            source = read_source_view(envelope.body)
            if source is not None and source not in self._owned:
                return _not_found(source)
            return None
        if kind == TABLE_MAKE_VIEW:
            return self._claim(envelope)
        return None

    def _claim(self, envelope: Envelope) -> Refused | None:
        try:
            view_id, reason = _check_make_view(envelope.body)
        except ProtocolError as exc:
            return Refused("invalid", exc.reason)
        if reason is not None:
            return Refused("invalid", reason)
        if self._max_views is not None and len(self._owned) >= self._max_views:
            return Refused(
                "views", f"too many views: a connection may hold {self._max_views} at a time"
            )
        with _registry_lock:
            live = _live_views.setdefault(self._engine, set())
            if view_id in live:
                return Refused("view", f"view id '{view_id}' is already in use")
            live.add(view_id)
            self._owned[view_id] = envelope.entity_id
            self._creating = (envelope.msg_id, view_id)
        return None

    def handled(self, envelope: Envelope) -> None:
        """Note that the engine has handled ``envelope``: a deleted view's id is free again."""
        if envelope.kind == VIEW_DELETE:
            self._release(envelope.entity_id)

    def on_response(self, data: bytes) -> None:
        """Free the view id of a ``table_make_view`` the engine refused; any thread may call it."""
        creating = self._creating
        if creating is None:
            return
        try:
            reply = read_envelope(data)
        except ProtocolError:
            return
        if reply.msg_id == creating[0]:
            self._creating = None
            if reply.kind == SERVER_ERROR:
                self._release(creating[1])

    def release_all(self) -> None:
        """Free every view id of this connection, once its session is closed."""
        with _registry_lock:
            live = _live_views.get(self._engine, set())
            live.difference_update(self._owned.keys())
            if not live:
                _live_views.pop(self._engine, None)
            self._owned.clear()

    def _release(self, view_id: str) -> None:
        with _registry_lock:
            if view_id not in self._owned:
                return
            del self._owned[view_id]
            live = _live_views.get(self._engine, set())
            live.discard(view_id)
            if not live:
                _live_views.pop(self._engine, None)


def _not_found(view_id: str) -> Refused:
    return Refused(
        "view", f"View not found: '{view_id}' is not a view of this connection", VIEW_NOT_FOUND
    )


def _check_column_range(body: bytes | memoryview) -> Refused | None:
    fields = dict(read_fields(body))
    start, end = fields.get(1, 0), fields.get(2)
    if isinstance(start, int) and isinstance(end, int) and end < start:
        return Refused("invalid", f"column range ends ({end}) before it starts ({start})")
    return None


def _check_make_view(body: bytes | memoryview) -> tuple[str, str | None]:
    """Return a ``TableMakeViewReq``'s view id, and why it must be refused (``None`` if not)."""
    view_id, config = read_make_view(body)
    return view_id, None if config is None else _check_config(memoryview(config))


def _check_config(config: memoryview) -> str | None:
    for number, value in read_fields(config):
        if number != 4 or isinstance(value, int):
            continue
        column, operator, values = "", "", 0
        for filter_number, filter_value in read_fields(value):
            if isinstance(filter_value, int):
                continue
            if filter_number == 1:
                column = str(filter_value, "utf-8", "replace")
            elif filter_number == 2:
                operator = str(filter_value, "utf-8", "replace")
            elif filter_number == 3:
                values += 1
        if not values and operator not in _OPERATORS_WITHOUT_VALUE:
            return f"filter on column '{column}' with operator '{operator}' needs a value"
    return None
