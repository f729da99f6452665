"""Scripted client sessions, played against the core with view sharing on and off.

A script is a list of steps, each one request (or a hang-up) of one of a few clients, built as
raw frames with ids chosen by the script: so the two runs send the same bytes, and a client
must receive the same bytes in both, whatever engine views serve it. Every step ends with a
round trip on the acting client (a ``get_hosted_tables`` request), so the engine has run it,
and every update it caused has been queued for the other clients, before the next step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import perspective
from hypothesis import strategies as st

from perspective_asgi import Settings
from perspective_asgi._core.bridge import SessionBridge
from perspective_asgi._core.wire import read_varint

from ._frames import capture, key, length_delimited, varint
from ._fuzz import fields_of
from ._helpers import MemoryTransport

IS_4X = perspective.__version__.startswith("4.")

TABLE = "t"
COLUMNS = {"a": "integer", "b": "string", "c": "float"}
ROWS = [{"a": i, "b": "xyz"[i % 3], "c": i / 4} for i in range(8)]


def _view_configs() -> list[bytes | None]:
    """``ViewConfig`` bytes of views as the stock client encodes them, one per shape."""
    shapes: list[dict[str, Any]] = [
        {},
        {"group_by": ["b"]},
        {"group_by": ["b"], "split_by": ["a"]},
        {"split_by": ["b"]},
        {"sort": [["a", "desc"]]},
        {"filter": [["a", ">", 3]]},
        {"columns": ["a", "c"]},
        {"group_by": ["b"], "aggregates": {"c": "avg"}},
        {"columns": ["nope"]},  # the engine refuses it
        # Maps of several entries: the variant below writes them in the other order.
        {"group_by": ["b"], "columns": ["a", "c", "e"],
         "aggregates": {"a": "avg", "c": "sum", "e": "max"},
         "expressions": {"e": '"a" * 2', "f": '"c" + 1'}},
    ]
    server = perspective.Server()
    server.new_local_client().table(ROWS, name=TABLE, index="a")

    async def make_views(client: perspective.AsyncClient) -> None:
        table = await client.open_table(TABLE)
        for shape in shapes:
            with contextlib.suppress(Exception):
                await table.view(**shape)

    configs: list[bytes | None] = []
    for frame in capture(server, make_views).requests:
        body = _member(frame, 6)
        if body is not None:
            configs.append(_member(body, 2))
    assert len(configs) == len(shapes), configs
    last = configs[-1]
    assert last is not None
    return [*configs, _reversed_maps(last)]


def _reversed_maps(config: bytes) -> bytes:
    """``config`` with the entries of each map field in the opposite order: the same
    configuration as another client may encode it (the stock clients use hash order)."""
    fields = fields_of(config) or []
    plain = [config[f.start:f.end] for f in fields if f.number not in CONFIG_MAPS]
    entries = [config[f.start:f.end] for f in fields if f.number in CONFIG_MAPS]
    assert len(entries) >= 4, "the map shape lost its entries"
    return b"".join(plain) + b"".join(reversed(entries))


def _member(message: bytes, number: int) -> bytes | None:
    """The bytes of length-delimited field ``number`` of a message, if present."""
    for f in fields_of(message) or []:
        if f.number == number and f.wire_type == 2:
            return message[f.payload:f.end]
    return None


#: The map fields of a ``ViewConfig`` (expressions, aggregates, windows).
CONFIG_MAPS = frozenset({6, 7, 11})

CONFIGS = _view_configs()

# Request kinds, from perspective.proto.
READ_KINDS = [10, 12, 13, 14, 15, 16, 24, 25, 26, 36]
ON_UPDATE, REMOVE_ON_UPDATE, ON_DELETE, REMOVE_DELETE = 21, 22, 34, 35
ON_REMOVE, REMOVE_ON_REMOVE = 39, 40
EXPAND, COLLAPSE, SET_DEPTH, MIN_MAX = 19, 18, 23, 20
MAKE_VIEW, VIEW_DELETE, TABLE_UPDATE, TABLE_REMOVE, MAKE_TABLE = 6, 11, 33, 31, 27
BARRIER = 4  # get_hosted_tables

NOTIFICATIONS = frozenset({ON_UPDATE, ON_REMOVE})


def request(msg_id: int, entity_id: str, kind: int, body: bytes = b"") -> bytes:
    head = key(1, 0) + varint(msg_id) if msg_id else b""
    return head + length_delimited(2, entity_id.encode()) + length_delimited(kind, body)


def viewport(start_row: int, end_row: int, start_col: int, end_col: int) -> bytes:
    return (key(1, 0) + varint(start_row) + key(3, 0) + varint(end_row)
            + key(2, 0) + varint(start_col) + key(4, 0) + varint(end_col))


# Steps: each a tuple whose first item names it; slots pick among a client's views and
# subscriptions by index, modulo how many it has (a deleted view stays pickable).
# Views collide often: most steps pick the default view, the group-by view, or one of the two
# encodings of the map-heavy view.
_config = st.one_of(st.sampled_from([0, 1, len(CONFIGS) - 2, len(CONFIGS) - 1]),
                    st.integers(0, len(CONFIGS) - 1))
_make = st.tuples(st.just("make"), _config)
_update = st.tuples(st.just("update"), st.lists(st.integers(0, 11), min_size=1, max_size=4))
_MODES = ["none", "row"] + ([] if IS_4X else ["remove"])
_subscribe = st.tuples(st.just("subscribe"), st.integers(0, 7), st.sampled_from(_MODES))
step = st.one_of(
    _make, _update, _update, _update, _subscribe, _subscribe, _subscribe,
    st.tuples(st.just("read"), st.integers(0, 7), st.sampled_from(READ_KINDS),
              st.tuples(st.integers(0, 4), st.integers(0, 12), st.integers(0, 2),
                        st.integers(0, 5))),
    st.tuples(st.just("min_max"), st.integers(0, 7), st.sampled_from(["a", "c", "nope"])),
    st.tuples(st.just("unsubscribe"), st.integers(0, 7), st.integers(0, 7)),
    st.tuples(st.just("on_delete"), st.integers(0, 7)),
    st.tuples(st.just("remove_delete"), st.integers(0, 7)),
    st.tuples(st.sampled_from(["expand", "collapse"]), st.integers(0, 7), st.integers(0, 6)),
    st.tuples(st.just("set_depth"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("delete"), st.integers(0, 7)),
    st.tuples(st.just("remove"), st.lists(st.integers(0, 11), min_size=1, max_size=2)),
    st.tuples(st.just("from_view"), st.integers(0, 7)),
    st.tuples(st.just("hang_up"),),
)



Script = list[tuple[int, tuple[Any, ...]]]


def _opening(config: int, modes: tuple[str, ...], steps: Script) -> Script:
    # Every client starts on the same view, most of them subscribed to it as a viewer is:
    # the case sharing exists for.
    made: Script = [(who, ("make", config)) for who in range(3)]
    subscribed: Script = [(who, ("subscribe", 0, mode)) for who, mode in enumerate(modes)
                          if mode != "off"]
    return made + subscribed + steps


scripts = st.builds(
    _opening, _config, st.tuples(*[st.sampled_from(["off", *_MODES])] * 3),
    st.lists(st.tuples(st.integers(0, 2), step), max_size=40),
)


@dataclass
class _Client:
    transport: MemoryTransport
    serial: int
    received: list[bytes] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    #: (view id, msg_id, kind) of each subscribing request.
    subscriptions: list[tuple[str, int, int]] = field(default_factory=list)
    on_deletes: list[tuple[str, int]] = field(default_factory=list)
    next_msg_id: int = 1

    def msg_id(self) -> int:
        self.next_msg_id += 1
        return self.next_msg_id

    async def barrier(self) -> None:
        msg_id = self.msg_id()
        await self.transport.feed(request(msg_id, "", BARRIER))
        while True:
            with anyio.fail_after(10):
                reply = await self.transport.replies.receive()
            self.received.append(reply)
            if reply.startswith(key(1, 0) + varint(msg_id) + b'"'):
                return


class Player:
    """Plays scripts on one engine; ``received`` holds what each client got, by serial."""

    def __init__(self, share_views: bool) -> None:
        self.server = perspective.Server()
        self.server.new_local_client().table(ROWS, name=TABLE, index="a")
        self.settings = Settings(share_views=share_views, max_views_per_connection=None)
        self.received: dict[int, list[bytes]] = {}
        self._serials = iter(range(1_000_000))
        self._tables = iter(range(1_000_000))
        self._tasks: anyio.abc.TaskGroup | None = None
        self._transports: list[MemoryTransport] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Player]:
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                yield self
                tasks.cancel_scope.cancel()
        finally:
            for transport in self._transports:
                transport.dispose()

    def connect(self) -> _Client:
        transport = MemoryTransport()
        self._transports.append(transport)
        bridge = SessionBridge(self.server, self.settings)
        assert self._tasks is not None
        self._tasks.start_soon(bridge.run, transport)
        client = _Client(transport, next(self._serials))
        self.received[client.serial] = client.received
        return client

    async def play(self, script: list[tuple[int, tuple[Any, ...]]]) -> None:
        clients = [self.connect() for _ in range(3)]
        for who, action in script:
            client = clients[who]
            frame = self._frame(client, action)
            if action[0] == "hang_up":
                await client.barrier()
                client.transport.hang_up()
                clients[who] = self.connect()
                continue
            if frame is not None:
                await client.transport.feed(frame)
            await client.barrier()
        for client in clients:
            await client.barrier()
            client.transport.hang_up()

    def _frame(self, client: _Client, action: tuple[Any, ...]) -> bytes | None:
        name = action[0]
        msg_id = client.msg_id()
        if name == "make":
            view_id = f"v{client.serial}-{len(client.views)}"
            client.views.append(view_id)
            config = CONFIGS[action[1]]
            body = length_delimited(1, view_id.encode())
            if config is not None:
                body += length_delimited(2, config)
            return request(msg_id, TABLE, MAKE_VIEW, body)
        if name == "update":
            rows = [{"a": a, "b": "pq"[a % 2], "c": a * 1.5} for a in action[1]]
            data = length_delimited(4, json.dumps(rows).encode())
            return request(msg_id, TABLE, TABLE_UPDATE, length_delimited(1, data))
        if name == "remove":
            data = length_delimited(4, json.dumps(action[1]).encode())
            return request(msg_id, TABLE, TABLE_REMOVE, length_delimited(1, data))
        if name == "hang_up" or not client.views:
            return None
        view = client.views[action[1] % len(client.views)]
        if name == "read":
            kind, window = action[2], action[3]
            body = b""
            if kind in (16, 24, 25, 26, 36):
                body = length_delimited(1, viewport(window[0], window[1], window[2],
                                                    window[3]))
            elif kind == 10:
                # An end before the start makes the engine allocate gigabytes for seconds
                # (perspective-python 5.6.1, with or without sharing): not what this tests.
                start, end = sorted(window[2:])
                body = key(1, 0) + varint(start) + key(2, 0) + varint(end)
            return request(msg_id, view, kind, body)
        if name == "min_max":
            return request(msg_id, view, MIN_MAX, length_delimited(1, action[2].encode()))
        if name == "subscribe":
            kind = ON_REMOVE if action[2] == "remove" else ON_UPDATE
            client.subscriptions.append((view, msg_id, kind))
            body = key(1, 0) + varint(0) if action[2] == "row" else b""
            return request(msg_id, view, kind, body)
        if name == "unsubscribe":
            mine = [s for s in client.subscriptions if s[0] == view]
            if not mine:
                return request(msg_id, view, REMOVE_ON_UPDATE, key(1, 0) + varint(999))
            _, target, kind = mine[action[2] % len(mine)]
            end = REMOVE_ON_REMOVE if kind == ON_REMOVE else REMOVE_ON_UPDATE
            return request(msg_id, view, end, key(1, 0) + varint(target))
        if name == "on_delete":
            client.on_deletes.append((view, msg_id))
            return request(msg_id, view, ON_DELETE)
        if name == "remove_delete":
            waiting = [m for v, m in client.on_deletes if v == view] or [999]
            return request(msg_id, view, REMOVE_DELETE, key(1, 0) + varint(waiting[-1]))
        if name in ("expand", "collapse"):
            kind = EXPAND if name == "expand" else COLLAPSE
            return request(msg_id, view, kind, key(1, 0) + varint(action[2]))
        if name == "set_depth":
            return request(msg_id, view, SET_DEPTH, key(1, 0) + varint(action[2]))
        if name == "delete":
            return request(msg_id, view, VIEW_DELETE)
        if name == "from_view":
            name = f"copy{next(self._tables)}"
            data = length_delimited(6, view.encode())
            return request(msg_id, name, MAKE_TABLE, length_delimited(1, data))
        raise AssertionError(name)


def kind_of(reply: bytes) -> int:
    """The oneof member of a reply."""
    return next(f.number for f in fields_of(reply) or [] if f.number > 2)


#: Replies holding a protobuf map: the engine writes its entries in hash order, which
#: differs between two views of one configuration, shared or not.
MAP_REPLIES = frozenset({13, 14, 15})


def _comparable(reply: bytes) -> Any:
    kind = kind_of(reply)
    if kind not in MAP_REPLIES:
        return reply
    member = (fields_of(reply) or [])[-1]
    entries = fields_of(reply, member.payload, member.end) or []
    if kind == 14 and entries:  # view_get_config: one ViewConfig, maps among its fields
        config = fields_of(reply, entries[0].payload, entries[0].end) or []
        return (reply[:member.start], kind,
                [reply[f.start:f.end] for f in config if f.number not in CONFIG_MAPS],
                sorted(reply[f.start:f.end] for f in config if f.number in CONFIG_MAPS))
    return (reply[:member.start], kind, sorted(reply[f.start:f.end] for f in entries))


def in_batches(replies: list[bytes]) -> list[Any]:
    """The replies, with each run of update notifications as a sorted tuple: the engine
    dispatches one update's notifications of different subscriptions in an order of its
    own, which sharing may change; each subscription's own order is kept. Map entries are
    sorted (``MAP_REPLIES``)."""
    out: list[Any] = []
    run: dict[int, list[bytes]] = {}
    for reply in replies:
        if kind_of(reply) in NOTIFICATIONS:
            run.setdefault(read_varint(reply, 1)[0], []).append(reply)
            continue
        if run:
            out.append(sorted(run.items()))
            run = {}
        out.append(_comparable(reply))
    if run:
        out.append(sorted(run.items()))
    return out
