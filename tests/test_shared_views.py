"""Shared views: what a client receives is the same with sharing on and off, byte for byte.

The differential test plays scripted sessions of three clients (views of every shape,
windows, subscriptions in each mode, deletes, hang-ups, errors, expand and collapse) against
two engines, one with ``Settings.share_views`` and one without, and compares each client's
stream. The other tests pin what sharing saves and that it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import anyio
import hypothesis
import perspective
import pyarrow as pa
import pytest
from hypothesis import given

from perspective_asgi import Settings
from perspective_asgi._core import sharing
from perspective_asgi._core.bridge import SessionBridge
from perspective_asgi._core.wire import TABLE_SIZE, read_envelope

from ._differential import (
    CONFIGS,
    ON_UPDATE,
    ROWS,
    TABLE,
    TABLE_UPDATE,
    Player,
    in_batches,
    kind_of,
    request,
    scripts,
    viewport,
)
from ._frames import key, length_delimited, varint
from ._helpers import (
    SCENARIO_TIMEOUT,
    CountingFactory,
    NewTransport,
    connect,
    in_thread,
    local_table,
    serving,
    until,
)

pytestmark = pytest.mark.anyio

DIFFERENTIAL = hypothesis.settings(max_examples=300, deadline=None, database=None,
                                   suppress_health_check=list(hypothesis.HealthCheck))


async def _received(script: list[tuple[int, tuple[Any, ...]]], share: bool) -> list[Any]:
    player = Player(share_views=share)
    async with player.running():
        await player.play(script)
    return [in_batches(stream) for _, stream in sorted(player.received.items())]


@DIFFERENTIAL
@given(scripts)
async def test_sharing_is_invisible_to_clients(script: list[tuple[int, tuple[Any, ...]]]) -> None:
    shared = await _received(script, share=True)
    alone = await _received(script, share=False)
    assert shared == alone
    assert sharing.totals() == (0, 0), "an engine view outlived its aliases"


@pytest.mark.parametrize("script", [
    # A subscriber without a mode next to a row-mode one on the same shared view: the engine
    # would send the first the row delta too, where a view of its own sends none.
    [(0, ("make", 0)), (1, ("make", 0)), (0, ("subscribe", 0, "none")),
     (1, ("subscribe", 0, "row")), (0, ("update", [1]))],
    # Every kind of step at least once, in an order that exercises copy on write with
    # subscriptions in place, and a hang-up that releases aliases: a fixed regression guard
    # next to the generated scripts.
    [(0, ("make", 1)), (1, ("make", 1)), (2, ("make", 1)), (0, ("subscribe", 0, "none")),
     (1, ("subscribe", 0, "none")), (2, ("subscribe", 0, "row")), (0, ("update", [1, 9])),
     (1, ("expand", 0, 1)), (0, ("update", [2])), (1, ("read", 0, 24, (0, 9, 0, 5))),
     (0, ("read", 0, 24, (0, 9, 0, 5))), (0, ("on_delete", 0)), (0, ("delete", 0)),
     (1, ("hang_up",)), (2, ("update", [3])), (2, ("subscribe", 0, "none")),
     (2, ("update", [4])), (2, ("unsubscribe", 0, 0)), (2, ("update", [5])),
     (2, ("min_max", 0, "nope")), (2, ("from_view", 0)), (2, ("delete", 0)),
     (2, ("read", 0, 12, (0, 0, 0, 0)))],
    # The engine turns a view's row deltas on with its first row-mode subscription and never
    # off: a subscriber without a mode then gets deltas on a view of its own, even after the
    # row-mode one ended, and never on a view only another client's subscription turned on.
    [(0, ("make", 0)), (1, ("make", 0)), (2, ("make", 0)), (1, ("subscribe", 0, "row")),
     (1, ("unsubscribe", 0, 0)), (1, ("subscribe", 0, "none")), (0, ("update", [0]))],
    [(0, ("make", 0)), (1, ("make", 0)), (2, ("make", 0)), (1, ("subscribe", 0, "row")),
     (2, ("subscribe", 0, "none")), (0, ("set_depth", 0, 1)), (1, ("set_depth", 0, 1)),
     (2, ("set_depth", 0, 1)), (0, ("update", [1, 2]))],
    # A subscription the client kept on the shared view when its view was copied, then a
    # row-mode subscription of its own view: the first gets the deltas too.
    [(0, ("make", 0)), (1, ("make", 0)), (2, ("make", 0)), (2, ("subscribe", 0, "none")),
     (2, ("set_depth", 0, 1)), (2, ("subscribe", 0, "row")), (0, ("update", [1, 2]))],
    [(0, ("make", 0)), (1, ("make", 0)), (1, ("subscribe", 0, "row")),
     (0, ("subscribe", 0, "row")), (0, ("unsubscribe", 0, 0)), (0, ("subscribe", 0, "none")),
     (1, ("hang_up",)), (0, ("set_depth", 0, 1)), (2, ("update", [3]))],
    [(0, ("make", 0)), (1, ("make", 0)), (0, ("subscribe", 0, "row")),
     (0, ("unsubscribe", 0, 0)), (0, ("subscribe", 0, "none")), (0, ("set_depth", 0, 1)),
     (2, ("update", [3]))],
])
async def test_a_fixed_script_is_invisible_too(script: list[tuple[int, tuple[Any, ...]]]) -> None:
    assert await _received(script, share=True) == await _received(script, share=False)


class _CountingServer:
    """A ``perspective.Server`` that counts the ``table_make_view`` requests of the sessions
    it opens: the connections' own (the core opens its private one on the engine itself)."""

    def __init__(self) -> None:
        self.server = perspective.Server()
        self.__wrapped__ = self.server
        self.made = 0

    def new_session(self, callback: Any) -> Any:
        return _CountingSession(self, self.server.new_session(callback))

    def making_view(self) -> None:
        """Called in the requesting thread before each ``table_make_view`` reaches the engine."""
        self.made += 1


class _CountingSession:
    def __init__(self, server: _CountingServer, session: Any) -> None:
        self._server = server
        self._session = session

    def handle_request(self, data: bytes) -> None:
        if read_envelope(data).kind == 6:
            self._server.making_view()
        self._session.handle_request(data)

    def close(self) -> None:
        self._session.close()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("encodings", [
    pytest.param([CONFIGS[1]], id="one-encoding"),
    # One configuration with its map entries written in two orders, as stock clients do.
    pytest.param([CONFIGS[-2], CONFIGS[-1]], id="map-orders"),
])
async def test_fifty_identical_views_cost_one_engine_view(
    share: bool, encodings: list[bytes | None], new_transport: NewTransport
) -> None:
    counting = _CountingServer()
    counting.server.new_local_client().table(ROWS, name=TABLE, index="a")
    settings = Settings(share_views=share)
    transports = [new_transport() for _ in range(50)]
    bridges = [SessionBridge(counting, settings) for _ in transports]
    async with contextlib.AsyncExitStack() as stack:
        for bridge, transport in zip(bridges, transports, strict=True):
            await stack.enter_async_context(serving(bridge, transport))
        for number, transport in enumerate(transports):
            config = encodings[number % len(encodings)] or b""
            body = length_delimited(1, f"view-{number}".encode()) + length_delimited(2, config)
            await transport.feed(request(7, TABLE, 6, body),
                                 request(8, f"view-{number}", ON_UPDATE),
                                 request(10, TABLE, TABLE_SIZE))
            assert kind_of(await transport.next_reply()) == 6
            # A round trip after the subscription, which has no reply: it has reached the
            # engine before an update sent on another connection below is processed.
            assert kind_of(await transport.next_reply()) == TABLE_SIZE
        # Shared: no view is made on a connection's session, and the engine holds one.
        assert counting.made == (0 if share else 50)
        assert sharing.totals() == ((1, 50) if share else (0, 0))
        # One update: every subscriber hears of it once, addressed to its own ids.
        rows = length_delimited(4, b'[{"a": 1, "b": "q", "c": 2.5}]')
        await transports[0].feed(request(9, TABLE, TABLE_UPDATE, length_delimited(1, rows)))
        for number, transport in enumerate(transports):
            replies = [await transport.next_reply() for _ in range(2 if number == 0 else 1)]
            update = next(r for r in replies if kind_of(r) == ON_UPDATE)
            assert update.startswith(key(1, 0) + varint(8)
                                     + length_delimited(2, f"view-{number}".encode()))
    # A connection whose last request (a subscription, which has no reply) ran in a worker
    # thread is closed by that thread once it leaves the engine, maybe just after the
    # connection's task has ended.
    with anyio.fail_after(SCENARIO_TIMEOUT):
        await until(lambda: sharing.totals() == (0, 0))


class _HeldEngine(_CountingServer):
    """A ``perspective.Server`` whose sessions hold each ``table_make_view`` until released,
    and count them: a test makes a view in one thread while another asks for the same."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.release = (threading.Event() for _ in range(3))

    def making_view(self) -> None:
        super().making_view()
        (self.first if self.made == 1 else self.second).set()
        self.release.wait(SCENARIO_TIMEOUT)


#: How long a second ``table_make_view`` is given to reach the engine, where it must not.
NOT_MADE_WITHIN = 0.5


async def test_a_view_asked_for_while_it_is_being_made_waits_for_it() -> None:
    # The pages of a dashboard reconnecting after a restart ask for the same views at once,
    # each in a worker thread: the second must wait for the view the first is making.
    engine = _HeldEngine()
    engine.server.new_local_client().table(ROWS, name=TABLE, index="a")
    shared = sharing.SharedViews(engine)
    made: list[tuple[Any, bytes]] = []
    threads = [threading.Thread(target=lambda: made.append(shared.view_for(TABLE, None)))
               for _ in range(2)]
    try:
        threads[0].start()
        assert await in_thread(engine.first.wait, SCENARIO_TIMEOUT)
        threads[1].start()
        assert not await in_thread(engine.second.wait, NOT_MADE_WITHIN), "a second view made"
    finally:
        engine.release.set()
        for thread in threads:
            await in_thread(thread.join, SCENARIO_TIMEOUT)
    assert engine.made == 1
    [(first, _), (second, _)] = made
    assert first is not None and first is second
    assert (shared.views, shared.aliases) == (1, 2)
    shared.close()


async def test_a_view_that_could_not_be_made_is_tried_again_by_the_next() -> None:
    engine = _HeldEngine()
    shared = sharing.SharedViews(engine)
    made: list[tuple[Any, bytes]] = []
    threads = [threading.Thread(target=lambda: made.append(shared.view_for("nope", None)))
               for _ in range(2)]
    try:
        threads[0].start()
        assert await in_thread(engine.first.wait, SCENARIO_TIMEOUT)
        threads[1].start()
    finally:
        engine.release.set()
        for thread in threads:
            await in_thread(thread.join, SCENARIO_TIMEOUT)
    # Each got the engine's own error; neither waits for ever on the failed one.
    assert engine.made == 2
    assert [view for view, _ in made] == [None, None]
    assert all(b"nope" in reply for _, reply in made)
    assert (shared.views, shared.aliases) == (0, 0)
    shared.close()


async def test_viewers_reading_one_window_cost_the_engine_one_read_per_update(
    new_transport: NewTransport
) -> None:
    server = perspective.Server()
    server.new_local_client().table(ROWS, name=TABLE, index="a")
    transports = [new_transport() for _ in range(20)]
    bridges = [SessionBridge(server, Settings()) for _ in transports]
    newest_first = CONFIGS[4] or b""  # sort a desc
    window = length_delimited(1, viewport(0, 3, 0, 3))
    async with contextlib.AsyncExitStack() as stack:
        for bridge, transport in zip(bridges, transports, strict=True):
            await stack.enter_async_context(serving(bridge, transport))
        for number, transport in enumerate(transports):
            body = length_delimited(1, f"view-{number}".encode()) + length_delimited(
                2, newest_first)
            await transport.feed(request(7, TABLE, 6, body),
                                 request(8, f"view-{number}", ON_UPDATE),
                                 request(10, TABLE, TABLE_SIZE))
            assert kind_of(await transport.next_reply()) == 6
            # A round trip after the subscription, which has no reply: it has reached the
            # engine before an update sent on another connection below is processed.
            assert kind_of(await transport.next_reply()) == TABLE_SIZE
        [shared] = sharing._shared_views.values()
        for a in (100, 200):
            rows = length_delimited(4, f'[{{"a": {a}, "b": "q", "c": 2.5}}]'.encode())
            await transports[0].feed(request(9, TABLE, TABLE_UPDATE, length_delimited(1, rows)))
            engine_reads, cached_reads = shared.engine_reads, shared.cached_reads
            bodies = set()
            for number, transport in enumerate(transports):
                # As a datagrid does: hear of the update, then read the window.
                while kind_of(await transport.next_reply()) != ON_UPDATE:
                    pass
                await transport.feed(request(10, f"view-{number}", 24, window))  # to_columns
                reply = await transport.next_reply()
                assert reply.startswith(key(1, 0) + varint(10)
                                        + length_delimited(2, f"view-{number}".encode()))
                bodies.add(bytes(read_envelope(reply).body))
            # One reply for all, computed once, and of the rows after this update.
            [body] = bodies
            assert f'"a":[{a},'.encode() in body, body
            assert (shared.engine_reads - engine_reads, shared.cached_reads - cached_reads) \
                == (1, len(transports) - 1)
    with anyio.fail_after(SCENARIO_TIMEOUT):  # as in the test above
        await until(lambda: sharing.totals() == (0, 0))


# Over every adapter, with the stock client ----------------------------------------------------


def _engine_view_ids() -> list[str]:
    return [view.engine_id for shared in sharing._shared_views.values()
            for view in shared._index.values()]


async def test_fifty_clients_share_one_view_on_every_adapter(
    url: str, perspective_server: perspective.Server, factory: CountingFactory
) -> None:
    got: list[list[int]] = [[] for _ in range(50)]
    table = local_table(perspective_server)
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(connect(url)) for _ in got]
            views = []
            for conn, ids in zip(conns, got, strict=True):
                view = await (await conn.client.open_table("demo")).view(columns=["id"])
                await view.on_update(_collector(ids), mode="row")
                await view.num_rows()  # a round trip: the subscription has reached the engine
                views.append(view)
            assert sharing.totals() == (1, 50)
            [engine_view] = _engine_view_ids()
            for number in range(10):
                table.update({"id": [100 + number], "name": ["n"], "group": ["z"],
                              "value": [0.0]})
                if number == 4:
                    # Mid-stream, one client deletes its view and another hangs up.
                    await views[0].delete()
                    await conns[1].ws.close()
                    await views[2].num_rows()
            for view in views[2:]:
                await view.num_rows()
            await until(lambda: all(len(ids) == 10 for ids in got[2:]))
            for ids in got[2:]:
                assert ids == list(range(100, 110))  # every update, in order
            assert got[0] == got[1] == list(range(100, 105))
            assert sharing.totals() == (1, 48)
    await factory.all_closed()
    assert sharing.totals() == (0, 0)
    # The engine agrees: the shared view is gone.
    replies: list[bytes] = []
    session = perspective_server.new_session(replies.append)
    session.handle_request(request(3, engine_view, 12))
    session.close()
    assert read_envelope(replies[0]).kind == 50 and b"not found" in replies[0]


def _collector(ids: list[int]) -> Any:
    def on_update(port_id: int, delta: bytes) -> None:
        ids.extend(pa.ipc.open_stream(delta).read_all().column("id").to_pylist())
    return on_update
