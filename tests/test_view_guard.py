"""Hostile frames that crash the engine are refused with a ``ServerError``, in-process and live.

Each scenario here aborted or segfaulted the whole server process before the core refused it;
the servers run in this test process, so a guard that failed would end the test run.
"""

from __future__ import annotations

import asyncio

import anyio
import perspective
import pytest
import websockets

from perspective_asgi import SessionBridge
from perspective_asgi._core.wire import read_envelope, read_fields

from ._frames import key, length_delimited, varint
from ._helpers import (
    SCENARIO_TIMEOUT,
    WAIT,
    CountingFactory,
    NewTransport,
    connect,
    make_view_frame,
    reply,
    request,
    server_error,
    serving,
    still_serving,
)

pytestmark = pytest.mark.anyio


def view_delete_frame(view_id: str, msg_id: int = 6) -> bytes:
    return request(msg_id, view_id, 11)


def table_size_frame(table: str, msg_id: int = 7) -> bytes:
    return request(msg_id, table, 8)


#: The frame reported to segfault the engine: a ">" filter on an existing column, with no value.
CRASH_FRAME = b'\x08\x05\x12\x02t12\x0e\n\x02v1\x12\x08"\x06\n\x01a\x12\x01>'
NULL = length_delimited(3, key(7, 0) + varint(0))  # Scalar { null: NULL_VALUE }


def view_id_of(frame: bytes) -> str:
    envelope = read_envelope(frame)
    assert envelope.kind == 6
    fields = read_fields(envelope.body)
    return next(str(v, "utf-8") for n, v in fields if n == 1 and not isinstance(v, int))


def test_crash_frame_matches_the_builder() -> None:
    assert make_view_frame("t1", "v1", length_delimited(1, b"a"), length_delimited(2, b">")) == (
        CRASH_FRAME
    )


# In-process ---------------------------------------------------------------------------------


@pytest.fixture
def t1_server() -> perspective.Server:
    server = perspective.Server()
    server.new_local_client().table({"a": [1, 2, 3]}, name="t1")
    return server


async def test_filter_without_value_is_refused_in_process(
    t1_server: perspective.Server, new_transport: NewTransport
) -> None:
    transport = new_transport()
    bridge = SessionBridge(CountingFactory(t1_server))
    async with serving(bridge, transport):
        await transport.feed(CRASH_FRAME)
        msg_id, entity_id, message, _ = server_error(await transport.next_reply())
        assert (msg_id, entity_id) == (5, "t1")
        assert message == "filter on column 'a' with operator '>' needs a value"
        # The connection stays usable, and the refused view id was never claimed.
        await transport.feed(table_size_frame("t1"))
        assert read_envelope(await transport.next_reply()).kind == 8
        valued = (length_delimited(1, b"a"), length_delimited(2, b">"), NULL)
        await transport.feed(make_view_frame("t1", "v1", *valued, msg_id=8))
        assert read_envelope(await transport.next_reply()).kind == 6
        for op in (b"in", b"not in"):  # no value is legitimate for these two
            a_filter = (length_delimited(1, b"a"), length_delimited(2, op))
            await transport.feed(make_view_frame("t1", op.decode(), *a_filter))
            assert read_envelope(await transport.next_reply()).kind == 6
        await transport.feed(view_delete_frame("v1"))
        assert read_envelope(await transport.next_reply()).kind == 11


async def test_view_ownership_in_process(
    t1_server: perspective.Server, new_transport: NewTransport
) -> None:
    factory = CountingFactory(t1_server)
    owner, other = new_transport(), new_transport()
    async with serving(SessionBridge(factory), owner), serving(SessionBridge(factory), other):
        await owner.feed(make_view_frame("t1", "mine"))
        assert read_envelope(await owner.next_reply()).kind == 6
        await other.feed(view_delete_frame("mine"))
        _, entity_id, message, status = server_error(await other.next_reply())
        assert (entity_id, status) == ("mine", 1)  # VIEW_NOT_FOUND
        assert "not a view of this connection" in message
        await other.feed(make_view_frame("t1", "mine", msg_id=9))
        assert "already in use" in server_error(await other.next_reply())[2]
        await owner.feed(make_view_frame("t1", "mine", msg_id=10))  # not twice on one either
        assert "already in use" in server_error(await owner.next_reply())[2]
    # Both sessions closed without aborting the process; the id is free again.
    await factory.all_closed()
    third = new_transport()
    async with serving(SessionBridge(factory), third):
        await third.feed(make_view_frame("t1", "mine"))
        assert read_envelope(await third.next_reply()).kind == 6
    await factory.all_closed()


async def test_a_backwards_column_range_is_refused(
    t1_server: perspective.Server, new_transport: NewTransport
) -> None:
    # Unguarded, this one frame costs the engine gigabytes and tens of seconds.
    transport = new_transport()
    async with serving(SessionBridge(CountingFactory(t1_server)), transport):
        await transport.feed(make_view_frame("t1", "v"))
        assert read_envelope(await transport.next_reply()).kind == 6
        backwards = key(1, 0) + varint(2) + key(2, 0) + varint(0)
        await transport.feed(request(6, "v", 10, backwards))
        assert "ends (0) before it starts (2)" in server_error(await transport.next_reply())[2]
        await transport.feed(request(7, "v", 10, key(1, 0) + varint(0) + key(2, 0) + varint(2)))
        assert read_envelope(await transport.next_reply()).kind == 10


# Over a real websocket, every adapter ---------------------------------------------------------


async def test_hostile_frames_get_a_server_error_and_the_server_lives(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as hostile:
            no_value = (length_delimited(1, b"value"), length_delimited(2, b">"))
            await hostile.send(make_view_frame("demo", "v1", *no_value))
            msg_id, entity_id, message, _ = server_error(await reply(hostile))
            assert (msg_id, entity_id) == (5, "demo")
            assert "needs a value" in message
            for op in (b"is null", b"==", b"contains"):
                no_value = (length_delimited(1, b"name"), length_delimited(2, op))
                await hostile.send(make_view_frame("demo", "v2", *no_value))
                assert "needs a value" in server_error(await reply(hostile))[2]
            await hostile.send(table_size_frame("demo"))
            assert read_envelope(await reply(hostile)).kind == 8
            await still_serving(url)


def last_view_id(sent: list[bytes] | None) -> str:
    """The view id of the last ``table_make_view`` request among ``sent``."""
    assert sent is not None
    return next(view_id_of(f) for f in reversed(sent) if read_envelope(f).kind == 6)


async def test_views_of_other_connections_are_out_of_reach(
    url: str, factory: CountingFactory
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url, record=True) as owner:
            table = await owner.client.open_table("demo")
            view = await table.view(filter=[["name", "is null", None]])
            assert await view.to_json() == []
            await view.delete()
            view = await table.view(filter=[["value", ">", 2.0]])
            taken = last_view_id(owner.sent)
            updated = asyncio.Event()
            await view.on_update(lambda *_: updated.set())

            def steal(frame: bytes) -> bytes:
                # Swap this client's own view id for the owner's (same length, same framing).
                envelope = read_envelope(frame)
                if envelope.kind == 6:
                    return frame.replace(view_id_of(frame).encode(), taken.encode())
                if envelope.kind == 11:
                    return frame.replace(envelope.entity_id.encode(), taken.encode())
                return frame

            async with connect(url, steal) as thief:
                stolen = await thief.client.open_table("demo")
                with pytest.raises(Exception, match="already in use"):
                    await stolen.view()

            def steal_delete(frame: bytes) -> bytes:
                return steal(frame) if read_envelope(frame).kind == 11 else frame

            async with connect(url, steal_delete) as thief:
                stolen = await thief.client.open_table("demo")
                own = await stolen.view()
                # The client reports the VIEW_NOT_FOUND status as "View not found".
                with pytest.raises(Exception, match="View not found"):
                    await own.delete()  # asked under the owner's view id
                # The owner's view survived and still works.
                assert [r["name"] for r in await view.to_json()] == ["beta", "gamma", "delta"]
                await stolen.update([{"id": 4, "name": "delta", "group": "y", "value": 9.0}])
                await asyncio.wait_for(updated.wait(), WAIT)
            await view.delete()
            await still_serving(url)
        await factory.all_closed()


async def test_deleting_another_connections_view_is_refused(
    url: str, factory: CountingFactory
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url, record=True) as owner:
            view = await (await owner.client.open_table("demo")).view()
            taken = last_view_id(owner.sent)
            async with websockets.connect(url) as hostile:
                await hostile.send(view_delete_frame(taken))
                _, entity_id, message, status = server_error(await reply(hostile))
                assert (entity_id, status) == (taken, 1)
                assert "not a view of this connection" in message
                await hostile.send(make_view_frame("demo", taken, msg_id=8))
                assert "already in use" in server_error(await reply(hostile))[2]
            assert len(await view.to_json()) == 4
        # The owner's session closed cleanly (an abort would have killed this process).
        await still_serving(url)
        await factory.all_closed()


async def test_stock_client_sees_the_refusal_as_an_exception(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url, record=True) as owner:
            await (await owner.client.open_table("demo")).view()
            taken = last_view_id(owner.sent)

            def collide(frame: bytes) -> bytes:
                if read_envelope(frame).kind == 6:
                    return frame.replace(view_id_of(frame).encode(), taken.encode())
                return frame

            async with connect(url, collide) as conn:
                table = await conn.client.open_table("demo")
                with pytest.raises(Exception, match=f"view id '{taken}' is already in use"):
                    await table.view()
                assert await table.size() == 4  # still connected and usable
