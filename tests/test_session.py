"""The core in-process: ``SessionBridge`` over an in-memory transport, on asyncio and trio.

Requests are real frames, captured from the stock ``perspective.AsyncClient`` (``_frames``) or
sent by an ``AsyncClient`` wired to the transport; replies are matched to requests by msg_id.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import perspective
import pytest

from perspective_asgi import (
    CloseCode,
    SessionBridge,
    SessionState,
    Settings,
    close_all_connections,
)
from perspective_asgi._codes import QUIET_CLOSE_CODES
from perspective_asgi._core.costs import PROOF
from perspective_asgi._core.wire import CHEAP_REQUEST_KINDS, TABLE_MAKE_VIEW, read_envelope
from perspective_asgi._types import Frame
from perspective_asgi.polling import PollCoalescer

from ._frames import capture, length_delimited
from ._helpers import WAIT, MemoryTransport, NewTransport, serving

pytestmark = pytest.mark.anyio

DEMO_ROWS = {
    "id": [1, 2, 3, 4],
    "name": ["alpha", "beta", "gamma", "delta"],
    "group": ["x", "y", "x", "y"],
    "value": [1.5, 2.5, 3.5, 4.5],
}

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])


#: For tests that watch the connection's own session answer view requests: with shared views
#: those go to the engine's private session instead (tests/test_shared_views.py).
OWN_VIEWS = Settings(share_views=False)

@pytest.fixture(
    scope="module",
    params=[
        "asyncio",
        pytest.param(
            "trio",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("trio") is None, reason="trio is not installed"
            ),
        ),
    ],
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# Session factories that record what the core does ---------------------------------------------


class RecordingSession:
    def __init__(self, factory: RecordingFactory, inner: Any) -> None:
        self.factory = factory
        self.inner = inner

    def handle_request(self, data: bytes) -> Any:
        with self.factory.lock:
            self.factory.requests += 1
        return self.inner.handle_request(data)


class ClosableRecordingSession(RecordingSession):
    def close(self) -> Any:
        with self.factory.lock:
            self.factory.closes += 1
        self.factory.closed.set()
        return self.inner.close()


class RecordingFactory:
    """Wraps a session factory; counts requests and closes, and notes who sent each reply."""

    def __init__(self, server: Any, *, closable: bool = True, disguised: bool = False) -> None:
        self.server = server
        if not disguised:
            # The core looks through __wrapped__ to tell a Server from an AsyncServer or other;
            # disguised, a Server is served like a virtual server: every request in a thread.
            self.__wrapped__ = server
        self.closable = closable
        self.lock = threading.Lock()
        self.opened = 0
        self.requests = 0
        self.closes = 0
        self.closed = threading.Event()
        #: (msg_id, thread ident) of each reply and update, in the order the engine made them.
        self.replies: list[tuple[int, int]] = []
        self.largest_reply = 0
        self.sessions: list[RecordingSession] = []

    def new_session(self, callback: Any) -> RecordingSession:
        def note(data: bytes) -> None:
            with self.lock:
                self.replies.append((read_envelope(data).msg_id, threading.get_ident()))
                self.largest_reply = max(self.largest_reply, len(data))

        recorder: Any
        if inspect.iscoroutinefunction(callback):

            async def recorder(data: bytes) -> None:
                note(data)
                await callback(data)

        else:

            def recorder(data: bytes) -> None:
                note(data)
                callback(data)

        self.opened += 1
        inner = self.server.new_session(recorder)
        session_type = ClosableRecordingSession if self.closable else RecordingSession
        session = session_type(self, inner)
        self.sessions.append(session)
        return session

    def reply_thread(self, msg_id: int) -> int:
        with self.lock:
            return next(thread for mid, thread in self.replies if mid == msg_id)


class ScriptedSession:
    """A fake session: each request may block until released, or raise."""

    def __init__(self, *, block: bool = False, fail: bool = False) -> None:
        self.block = block
        self.fail = fail
        self.log: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()
        self.calls = 0
        self._called = threading.Condition()

    def handle_request(self, data: bytes) -> None:
        self.log.append("enter")
        self.entered.set()
        with self._called:
            self.calls += 1
            self._called.notify_all()
        if self.fail:
            raise RuntimeError("boom")
        if self.block:
            self.log.append("return" if self.release.wait(WAIT * 3) else "timed out")

    def close(self) -> None:
        self.log.append("close")
        self.closed.set()

    def wait_calls(self, count: int) -> bool:
        with self._called:
            return self._called.wait_for(lambda: self.calls >= count, WAIT)


class ScriptedFactory:
    """Hands out one ``ScriptedSession``; ``engine`` makes the core treat it as that engine."""

    def __init__(self, session: ScriptedSession, engine: Any = None) -> None:
        self.session = session
        self.opened = 0
        if engine is not None:
            self.__wrapped__ = engine

    def new_session(self, callback: Any) -> ScriptedSession:
        self.opened += 1
        return self.session


# Frames -------------------------------------------------------------------------------------


def _demo_server() -> perspective.Server:
    server = perspective.Server()
    client = server.new_local_client()
    client.table(DEMO_ROWS, name="demo", index="id")
    client.table({"k": [0, 1], "v": [0.0, 1.0]}, name="heavy")
    return server


def _heavy_rows(rows: int) -> dict[str, list[Any]]:
    return {"k": [i % 1000 for i in range(rows)], "v": [float(i) for i in range(rows)]}


@dataclass(frozen=True)
class Frames:
    hosted: bytes  # get_hosted_tables
    size: bytes  # table_size of "demo"
    make_view: bytes  # table_make_view on "demo"
    on_update: bytes  # view_on_update, row mode, of that view
    burst: list[bytes]  # views on "heavy", each made and read between two size requests


@pytest.fixture(scope="module")
def frames() -> Frames:
    async def demo(client: perspective.AsyncClient) -> None:
        table = await client.open_table("demo")
        await table.size()
        view = await table.view()
        await view.on_update(lambda *_: None, mode="row")

    async def burst(client: perspective.AsyncClient) -> None:
        table = await client.open_table("heavy")
        for _ in range(4):
            view = await table.view(group_by=["k"], sort=[["v", "desc"]])
            await table.size()
            await view.to_arrow()
            await table.size()

    server = _demo_server()
    hosted, size, make_view, on_update = capture(server, demo).requests
    return Frames(hosted, size, make_view, on_update, capture(server, burst).requests)


def msg_id(frame: bytes) -> int:
    return read_envelope(frame).msg_id


@pytest.fixture
def server() -> perspective.Server:
    return _demo_server()


@pytest.fixture
def factory(server: perspective.Server) -> Iterator[RecordingFactory]:
    recording = RecordingFactory(server)
    yield recording
    assert recording.closes <= recording.opened, "a session was closed twice"


def perspective_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("perspective_asgi") and r.levelno >= level
    ]


async def run_to_end(bridge: SessionBridge, transport: MemoryTransport) -> None:
    with anyio.fail_after(WAIT):
        await bridge.run(transport)


@contextlib.contextmanager
def released(session: ScriptedSession) -> Iterator[None]:
    """Never leave a worker thread blocked in the fake session, whatever the test did."""
    try:
        yield
    finally:
        session.release.set()


async def wait_in_thread(event: threading.Event) -> bool:
    return await anyio.to_thread.run_sync(event.wait, WAIT)


async def assert_closed_once(factory: RecordingFactory) -> None:
    """The one session was closed exactly once, by run() or by its last request's thread.

    run() may return while a request's worker thread is still finishing; the session is then
    closed by that thread a moment later, so this waits for the close instead of assuming it.
    """
    assert await wait_in_thread(factory.closed)
    assert (factory.opened, factory.closes) == (1, 1)


# Ordering and threads -----------------------------------------------------------------------


async def test_pipelined_burst_is_answered_in_request_order(
    frames: Frames,
    server: perspective.Server,
    factory: RecordingFactory,
    new_transport: NewTransport,
) -> None:
    # Heavy enough that a view or an Arrow export takes milliseconds in a worker thread,
    # while the size requests in between are answered on the event loop in microseconds.
    server.new_local_client().open_table("heavy").replace(_heavy_rows(100_000))
    transport = new_transport()
    await transport.feed(*frames.burst)  # all queued before the session starts: pipelined
    bridge = SessionBridge(factory, OWN_VIEWS)
    async with serving(bridge, transport):
        loop_thread = threading.get_ident()
        replies = [await transport.next_reply() for _ in frames.burst]

    assert [msg_id(r) for r in replies] == [msg_id(f) for f in frames.burst]
    # Same kinds back: no request was answered with an error.
    assert [read_envelope(r).kind for r in replies] == [read_envelope(f).kind for f in frames.burst]
    assert len(set(map(msg_id, frames.burst))) == len(frames.burst)
    # Cheap kinds ran on the event loop; a group-by of 100,000 rows in worker threads. The
    # Arrow export of its two-row result costs microseconds: it runs in threads until PROOF
    # of them in a row were cheap, and may move to the loop after that (if the machine is
    # quick enough that they were).
    exports_in_threads = 0
    for frame in frames.burst:
        inline = factory.reply_thread(msg_id(frame)) == loop_thread
        kind = read_envelope(frame).kind
        if kind in CHEAP_REQUEST_KINDS:
            assert inline, frame
        elif kind == TABLE_MAKE_VIEW:
            assert not inline, frame
        elif inline:
            assert exports_in_threads >= PROOF, frame  # only once proven cheap
        else:
            exports_in_threads += 1
    assert exports_in_threads >= PROOF
    await assert_closed_once(factory)


async def test_update_from_a_foreign_thread_reaches_the_transport(
    frames: Frames,
    server: perspective.Server,
    factory: RecordingFactory,
    new_transport: NewTransport,
) -> None:
    transport = new_transport()
    bridge = SessionBridge(factory, OWN_VIEWS)
    async with serving(bridge, transport):
        await transport.feed(frames.make_view, frames.on_update, frames.size)
        assert msg_id(await transport.next_reply()) == msg_id(frames.make_view)
        # The size reply shows the on_update request, sent before it, has been handled.
        assert msg_id(await transport.next_reply()) == msg_id(frames.size)

        writer_thread: list[int] = []

        def update() -> None:
            writer_thread.append(threading.get_ident())
            server.new_local_client().open_table("demo").update(
                {"id": [5], "name": ["epsilon"], "group": ["x"], "value": [9.5]}
            )

        writer = threading.Thread(target=update)
        writer.start()
        await anyio.to_thread.run_sync(writer.join, WAIT)
        update_reply = await transport.next_reply()

    assert msg_id(update_reply) == msg_id(frames.on_update)
    assert b"epsilon" in update_reply  # row mode: the delta itself
    assert factory.reply_thread(msg_id(frames.on_update)) == writer_thread[0]
    assert writer_thread[0] != threading.get_ident()
    await assert_closed_once(factory)


@ASYNCIO_ONLY
async def test_updates_polled_on_the_loop_reach_the_transport(
    frames: Frames, new_transport: NewTransport
) -> None:
    # A PollCoalescer computes notifications in loop callbacks, outside any task: the drain
    # they start must still run (a drain started there once failed silently).
    coalescer = PollCoalescer()
    server = perspective.Server(on_poll_request=coalescer.request_poll)
    server.new_local_client().table(DEMO_ROWS, name="demo", index="id")
    transport = new_transport()
    bridge = SessionBridge(server)
    async with coalescer, serving(bridge, transport):
        await transport.feed(frames.make_view, frames.on_update, frames.size)
        assert msg_id(await transport.next_reply()) == msg_id(frames.make_view)
        assert msg_id(await transport.next_reply()) == msg_id(frames.size)
        for value in (9.5, 10.5):
            writer = threading.Thread(
                target=lambda value=value: server.new_local_client().open_table("demo").update(
                    {"id": [5], "name": [f"v{value}"], "group": ["x"], "value": [value]}
                )
            )
            writer.start()
            await anyio.to_thread.run_sync(writer.join, WAIT)
            reply = await transport.next_reply()
            assert msg_id(reply) == msg_id(frames.on_update)
            assert f"v{value}".encode() in reply


@pytest.mark.parametrize("path", ["inline", "thread"])
async def test_slow_reader_holds_back_later_requests(
    frames: Frames, server: perspective.Server, new_transport: NewTransport, path: str
) -> None:
    factory = RecordingFactory(server, disguised=path == "thread")
    transport = new_transport()
    gate = transport.stall()
    burst = [frames.size] * 6
    await transport.feed(*burst)
    bridge = SessionBridge(factory)
    async with serving(bridge, transport):
        with anyio.fail_after(WAIT):
            await transport.send_entered.wait()
        for _ in range(50):  # give a core that does not wait every chance to run ahead
            await anyio.lowlevel.checkpoint()
        # The first reply is in the transport's hands; the next request waits for it.
        assert factory.requests == 1
        assert bridge.outbox_bytes == 0
        gate.set()
        replies = [await transport.next_reply() for _ in burst]
    assert [msg_id(r) for r in replies] == [msg_id(f) for f in burst]
    assert factory.requests == len(burst)
    await assert_closed_once(factory)


async def test_requests_wait_while_updates_are_queued(
    frames: Frames,
    server: perspective.Server,
    factory: RecordingFactory,
    new_transport: NewTransport,
) -> None:
    # Replies are admitted into the outbox only when it is empty: a request must not run while
    # pushed updates wait for a slow client, or its reply could overflow the queue.
    transport = new_transport()
    bridge = SessionBridge(factory, OWN_VIEWS)
    table = server.new_local_client().open_table("demo")

    def update(i: int) -> None:
        table.update({"id": [100 + i], "name": ["x"], "group": ["x"], "value": [1.0]})

    async with serving(bridge, transport):
        await transport.feed(frames.make_view, frames.on_update, frames.size)
        for _ in range(2):
            await transport.next_reply()
        gate = transport.stall()
        await anyio.to_thread.run_sync(update, 1)  # the writer takes it and blocks sending it
        with anyio.fail_after(WAIT):
            await transport.send_entered.wait()
        await anyio.to_thread.run_sync(update, 2)  # this one waits in the outbox
        assert bridge.outbox_bytes > 0
        handled = factory.requests
        await transport.feed(frames.size, frames.hosted, frames.size)
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert factory.requests == handled
        gate.set()
        replies = [await transport.next_reply() for _ in range(5)]
    on_update, size, hosted = (msg_id(f) for f in (frames.on_update, frames.size, frames.hosted))
    assert [msg_id(r) for r in replies] == [on_update, on_update, size, hosted, size]
    await assert_closed_once(factory)


async def test_full_inbox_stops_reading(frames: Frames, new_transport: NewTransport) -> None:
    session = ScriptedSession(block=True)
    factory = ScriptedFactory(session)  # not a Server: every request is queued for a thread
    transport = new_transport()
    # table_size, not make_view: twenty views with one id would be refused before the engine.
    await transport.feed(*[frames.size] * 20)
    bridge = SessionBridge(factory, Settings(max_pending_requests=2))
    with released(session):
        async with serving(bridge, transport):
            assert await wait_in_thread(session.entered)
            for _ in range(50):  # give a reader that does not stop every chance to run ahead
                await anyio.lowlevel.checkpoint()
            # 1 running, 2 queued, and 1 in the reader's hands waiting for room in the queue.
            assert transport.received <= 4
            session.release.set()
            assert await anyio.to_thread.run_sync(session.wait_calls, 20)
    assert transport.received == 20


# Closing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1005, 1006, 1012, 4000])
async def test_peer_close_closes_the_session_once(
    frames: Frames,
    factory: RecordingFactory,
    caplog: pytest.LogCaptureFixture,
    code: int,
    new_transport: NewTransport,
) -> None:
    transport = new_transport()
    bridge = SessionBridge(factory)
    async with serving(bridge, transport):
        await transport.feed(frames.size)
        await transport.next_reply()
        transport.hang_up(code)
    assert transport.closes == []  # nothing is sent to a peer that has gone
    assert bridge.close_code == code
    assert bridge.state is SessionState.CLOSED
    await assert_closed_once(factory)
    if code in QUIET_CLOSE_CODES:
        assert perspective_records(caplog, logging.INFO) == []
    else:
        (record,) = perspective_records(caplog, logging.INFO)
        assert record.levelno == logging.INFO
        assert bridge.name in record.getMessage()
        assert str(code) in record.getMessage()


async def test_peer_leaving_at_once_closes_the_session_once(
    factory: RecordingFactory, new_transport: NewTransport
) -> None:
    transport = new_transport()
    transport.hang_up(1001)
    bridge = SessionBridge(factory)
    await run_to_end(bridge, transport)
    assert factory.requests == 0
    await assert_closed_once(factory)
    assert bridge.close_code == 1001


def _padded(frame: bytes, size: int) -> bytes:
    """``frame`` grown to ``size`` bytes by an unknown field put before the request body."""
    padding = size - len(frame) - 4
    padded = length_delimited(1000, b"\x00" * padding) + frame
    assert len(padded) == size
    return padded


@pytest.mark.parametrize(
    ("frame", "settings", "code"),
    [
        ("hello", Settings(), CloseCode.UNSUPPORTED_DATA),
        ("", Settings(), CloseCode.UNSUPPORTED_DATA),
        (b"\x00", Settings(), CloseCode.INVALID_PAYLOAD),
        # An empty request aborts the whole process in perspective-python 5.x.
        (b"", Settings(), CloseCode.INVALID_PAYLOAD),
        (bytearray(b"\x12\x10short"), Settings(), CloseCode.INVALID_PAYLOAD),
        ("size+1", Settings(max_message_size=1024), CloseCode.MESSAGE_TOO_BIG),
    ],
    ids=["text", "empty-text", "field0", "empty", "truncated-bytearray", "oversized"],
)
async def test_refused_frame_closes_with_its_code(
    frames: Frames,
    factory: RecordingFactory,
    caplog: pytest.LogCaptureFixture,
    frame: Frame,
    settings: Settings,
    code: CloseCode,
    new_transport: NewTransport,
) -> None:
    if frame == "size+1":  # a valid request, one byte too big
        frame = _padded(frames.size, settings.max_message_size + 1)
    transport = new_transport()
    await transport.feed(frame)
    bridge = SessionBridge(factory, settings)
    await run_to_end(bridge, transport)

    assert [c for c, _ in transport.closes] == [code]
    assert transport.closes[0][1]  # a reason is given
    assert bridge.close_code == code
    assert bridge.state is SessionState.CLOSED
    assert factory.requests == 0  # the engine never saw it
    await assert_closed_once(factory)
    warnings = perspective_records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert bridge.name in warnings[0].getMessage()


async def test_frame_at_the_size_limit_is_served(
    frames: Frames, factory: RecordingFactory, new_transport: NewTransport
) -> None:
    frame = _padded(frames.size, 1024)
    transport = new_transport()
    bridge = SessionBridge(factory, Settings(max_message_size=1024))
    async with serving(bridge, transport):
        await transport.feed(frame, bytearray(frame), memoryview(frame))
        replies = [await transport.next_reply() for _ in range(3)]
    assert [read_envelope(r).kind for r in replies] == [read_envelope(frames.size).kind] * 3
    assert transport.closes == []


async def test_outbound_overflow_closes_with_1013(
    frames: Frames,
    server: perspective.Server,
    factory: RecordingFactory,
    caplog: pytest.LogCaptureFixture,
    new_transport: NewTransport,
) -> None:
    limit = 4096
    transport = new_transport()
    bridge = SessionBridge(factory, Settings(max_send_queue_bytes=limit, share_views=False))
    highest_outbox = 0
    pushed = 0

    def push_updates() -> None:
        # Keeps updating until the connection is closed; each update notifies the view.
        nonlocal highest_outbox, pushed
        table = server.new_local_client().open_table("demo")
        for i in range(2000):
            if transport.closed_flag.is_set():
                return
            table.update({"id": [100 + i], "name": [f"row{i}"], "group": ["x"], "value": [1.0]})
            pushed += 1
            highest_outbox = max(highest_outbox, bridge.outbox_bytes)
            if i == 0:
                # Let the writer get stuck sending the first update before queueing the rest.
                assert transport.stalled_flag.wait(WAIT)

    async with serving(bridge, transport):
        await transport.feed(frames.make_view, frames.on_update, frames.size)
        await transport.next_reply()
        await transport.next_reply()  # the size reply: on_update is registered
        transport.stall()  # the client stops reading, for good
        pusher = threading.Thread(target=push_updates)
        pusher.start()
        with anyio.fail_after(WAIT):
            await transport.closed.wait()
        await anyio.to_thread.run_sync(pusher.join, WAIT)

    assert transport.closes == [
        (CloseCode.TRY_AGAIN_LATER, "outbound queue overflow: the client reads too slowly")
    ]
    assert bridge.close_code == CloseCode.TRY_AGAIN_LATER
    assert transport.cancelled_sends == 1  # the send stuck on the slow client was abandoned
    assert pushed < 2000, "the connection was not closed while updates kept coming"
    assert pushed * factory.largest_reply > limit  # the queue really was pushed past its limit
    assert highest_outbox <= limit + factory.largest_reply
    await assert_closed_once(factory)
    warnings = perspective_records(caplog, logging.WARNING)
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "1013" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "executor",
    [
        None,
        pytest.param("pool", marks=ASYNCIO_ONLY),  # Settings.executor is for asyncio only
    ],
)
async def test_session_is_closed_after_a_running_request_returns(
    frames: Frames, executor: str | None,
    new_transport: NewTransport,
) -> None:
    session = ScriptedSession(block=True)
    factory = ScriptedFactory(session)
    pool = concurrent.futures.ThreadPoolExecutor(1) if executor else None
    transport = new_transport()
    bridge = SessionBridge(factory, Settings(executor=pool))
    try:
        with released(session):
            async with serving(bridge, transport):
                await transport.feed(frames.make_view)
                assert await wait_in_thread(session.entered)
                transport.hang_up(1001)
            # run() has returned while the engine is still inside handle_request.
            assert bridge.state is SessionState.CLOSED
            assert session.log == ["enter"]
        assert await wait_in_thread(session.closed)
        assert session.log == ["enter", "return", "close"]
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    assert session.log == ["enter", "return", "close"]
    assert factory.opened == 1


@pytest.mark.parametrize("path", ["inline", "thread"])
async def test_failing_request_closes_with_1011_and_logs_once(
    frames: Frames, caplog: pytest.LogCaptureFixture, path: str,
    new_transport: NewTransport,
) -> None:
    session = ScriptedSession(fail=True)
    # A table_size request to a Server runs inline; a view request runs in a worker thread.
    factory = ScriptedFactory(session, engine=perspective.Server())
    frame = frames.size if path == "inline" else frames.make_view
    transport = new_transport()
    await transport.feed(frame)
    bridge = SessionBridge(factory, OWN_VIEWS, peer="10.0.0.7:5555")
    await run_to_end(bridge, transport)

    assert transport.closes == [(CloseCode.INTERNAL_ERROR, "internal error")]
    assert bridge.close_code == CloseCode.INTERNAL_ERROR
    assert session.log == ["enter", "close"]
    errors = perspective_records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert bridge.name in errors[0].getMessage()
    assert "10.0.0.7:5555" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "boom"
    assert perspective_records(caplog, logging.WARNING) == errors


async def test_run_twice_raises(
    frames: Frames, factory: RecordingFactory, new_transport: NewTransport
) -> None:
    transport = new_transport()
    bridge = SessionBridge(factory)
    async with serving(bridge, transport):
        await transport.feed(frames.size)
        await transport.next_reply()
        with pytest.raises(RuntimeError, match="open"):
            await bridge.run(new_transport())
    with pytest.raises(RuntimeError, match="closed"):
        await bridge.run(new_transport())
    await assert_closed_once(factory)


async def test_wait_closed_on_a_bridge_that_never_ran_returns(factory: RecordingFactory) -> None:
    bridge = SessionBridge(factory)
    with anyio.fail_after(WAIT):
        await bridge.wait_closed()  # raised AttributeError before the core was rebuilt
    bridge.close()  # nothing to close: ignored
    assert bridge.state is SessionState.CONNECTING
    assert factory.sessions == []


async def test_close_from_the_application(
    frames: Frames,
    factory: RecordingFactory,
    caplog: pytest.LogCaptureFixture,
    new_transport: NewTransport,
) -> None:
    transport = new_transport()
    transport.stall()  # a send stuck on a client that stopped reading must not hold it up
    bridge = SessionBridge(factory)
    async with serving(bridge, transport):
        await transport.feed(frames.size)
        with anyio.fail_after(WAIT):
            await transport.send_entered.wait()
        bridge.close(4001, "bye")
        bridge.close(4002, "again")  # the first close wins
        with anyio.fail_after(WAIT):
            await bridge.wait_closed()
        bridge.close(4003, "after")  # a close after the end is ignored
    assert transport.closes == [(4001, "bye")]
    assert transport.cancelled_sends == 1
    assert bridge.close_code == 4001
    assert bridge.state is SessionState.CLOSED
    await assert_closed_once(factory)
    assert perspective_records(caplog, logging.WARNING) == []


async def test_close_all_connections(frames: Frames, new_transport: NewTransport) -> None:
    factories = [RecordingFactory(_demo_server()) for _ in range(3)]
    transports = [new_transport() for _ in factories]
    bridges = [SessionBridge(factory) for factory in factories]
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            for bridge, transport in zip(bridges, transports, strict=True):
                tasks.start_soon(bridge.run, transport)
                await transport.feed(frames.size)
                await transport.next_reply()
            await close_all_connections()
            # Every bridge has finished by now: no hang_up was needed to end the tasks.
            assert all(bridge.state is SessionState.CLOSED for bridge in bridges)
    for factory, transport in zip(factories, transports, strict=True):
        assert transport.closes == [(CloseCode.GOING_AWAY, "server shutting down")]
        await assert_closed_once(factory)


async def test_cancelled_run_closes_with_1001_and_finishes(
    frames: Frames, factory: RecordingFactory, new_transport: NewTransport
) -> None:
    # What an ASGI server does to its connections' tasks when it shuts down.
    transport = new_transport()
    bridge = SessionBridge(factory)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(bridge.run, transport)
            await transport.feed(frames.size)
            await transport.next_reply()
            tasks.cancel_scope.cancel()
    assert transport.closes == [(CloseCode.GOING_AWAY, "server shutting down")]
    assert bridge.close_code == CloseCode.GOING_AWAY
    await assert_closed_once(factory)
    assert bridge.state is SessionState.CLOSED
    with anyio.fail_after(1):
        await bridge.wait_closed()
    with anyio.fail_after(1):
        await close_all_connections()  # must not wait for the cancelled bridge


# Other engines, through the stock client ----------------------------------------------------


@contextlib.asynccontextmanager
async def client_session(
    factory: Any, new_transport: NewTransport, settings: Settings | None = None
) -> AsyncIterator[tuple[perspective.AsyncClient, SessionBridge, MemoryTransport]]:
    """Serve ``factory`` to a stock ``AsyncClient`` over a ``MemoryTransport``."""
    transport = new_transport()
    client = perspective.AsyncClient(transport.feed)
    transport.deliver = client.handle_response
    bridge = SessionBridge(factory, settings)
    async with serving(bridge, transport):
        yield client, bridge, transport


@ASYNCIO_ONLY
async def test_async_client_over_a_server(
    server: perspective.Server, factory: RecordingFactory, new_transport: NewTransport
) -> None:
    async with client_session(factory, new_transport) as (client, _, _):
        table = await client.open_table("demo")
        assert await table.size() == 4
        view = await table.view(group_by=["group"], columns=["value"], aggregates={"value": "sum"})
        assert await view.to_columns() == {
            "__ROW_PATH__": [[], ["x"], ["y"]], "value": [12.0, 5.0, 7.0]
        }
        updated = anyio.Event()
        await view.on_update(lambda *_: updated.set())
        await table.size()
        writer = threading.Thread(
            target=lambda: server.new_local_client().open_table("demo").update(
                {"id": [1], "name": ["alpha"], "group": ["x"], "value": [101.5]}
            )
        )
        writer.start()
        await anyio.to_thread.run_sync(writer.join, WAIT)
        with anyio.fail_after(WAIT):
            await updated.wait()
        assert (await view.to_columns())["value"] == [112.0, 105.0, 7.0]
    await assert_closed_once(factory)


@ASYNCIO_ONLY
async def test_async_server(
    caplog: pytest.LogCaptureFixture, new_transport: NewTransport
) -> None:
    factory = RecordingFactory(perspective.AsyncServer())
    async with client_session(factory, new_transport) as (client, bridge, _):
        table = await client.table(DEMO_ROWS, name="demo", index="id")
        assert await client.get_hosted_table_names() == ["demo"]
        assert await table.size() == 4
        view = await table.view(filter=[["value", ">", 2.0]], sort=[["id", "desc"]])
        assert [row["name"] for row in await view.to_json()] == ["delta", "gamma", "beta"]
        updated = anyio.Event()
        await view.on_update(lambda *_: updated.set())
        await table.update([{"id": 5, "name": "epsilon", "group": "x", "value": 9.5}])
        with anyio.fail_after(WAIT):
            await updated.wait()
        assert await table.size() == 5
    assert bridge.close_code == CloseCode.NO_STATUS_RECEIVED
    await assert_closed_once(factory)
    assert perspective_records(caplog, logging.INFO) == []


def _duckdb_server() -> tuple[Any, str]:
    import duckdb
    from perspective.virtual_servers.duckdb import DuckDBVirtualServer

    db = duckdb.connect(":memory:")
    db.execute(
        # DOUBLE, not the literals' DECIMAL, which perspective-python 4.4's DuckDB server rejects.
        "CREATE TABLE demo AS SELECT id, name, \"group\", CAST(value AS DOUBLE) AS value FROM"
        " (VALUES (1, 'alpha', 'x', 1.5), (2, 'beta', 'y', 2.5), (3, 'gamma', 'x', 3.5),"
        " (4, 'delta', 'y', 4.5)) AS t(id, name, \"group\", value)"
    )
    return DuckDBVirtualServer(db), "memory.demo"


def _polars_server() -> tuple[Any, str]:
    import polars
    from perspective.virtual_servers.polars import PolarsVirtualServer

    return PolarsVirtualServer({"demo": polars.DataFrame(DEMO_ROWS)}), "demo"


@ASYNCIO_ONLY
@pytest.mark.parametrize("make_server", [_duckdb_server, _polars_server], ids=["duckdb", "polars"])
@pytest.mark.parametrize("closable", [True, False], ids=["with-close", "without-close"])
async def test_virtual_server(
    caplog: pytest.LogCaptureFixture,
    make_server: Callable[[], tuple[Any, str]],
    closable: bool,
    new_transport: NewTransport,
) -> None:
    virtual_server, name = make_server()
    probe = virtual_server.new_session(lambda _: None)
    if closable and not hasattr(probe, "close"):
        pytest.skip("virtual sessions have close() from perspective-python 5")
    factory = RecordingFactory(virtual_server, closable=closable)
    async with client_session(factory, new_transport) as (client, bridge, _):
        assert await client.get_hosted_table_names() == [name]
        table = await client.open_table(name)
        assert await table.size() == 4
        view = await table.view(columns=["id", "name"], sort=[["id", "desc"]])
        assert (await view.to_columns())["name"] == ["delta", "gamma", "beta", "alpha"]
        view = await table.view(group_by=["group"], columns=["value"], aggregates={"value": "sum"})
        assert (await view.to_columns())["value"] == [12.0, 5.0, 7.0]
        loop_thread = threading.get_ident()
    # A virtual server may query a database for any request: none runs on the event loop.
    assert factory.replies
    assert all(thread != loop_thread for _, thread in factory.replies)
    assert bridge.close_code == CloseCode.NO_STATUS_RECEIVED
    if closable:
        await assert_closed_once(factory)
    else:
        assert factory.closes == 0
    assert perspective_records(caplog, logging.INFO) == []
    if not closable and hasattr(factory.sessions[0].inner, "close"):
        factory.sessions[0].inner.close()  # what the core could not do
    if hasattr(probe, "close"):
        probe.close()


# Virtual servers share one backend connection ----------------------------------------------


class ConcurrencyProbe:
    """A virtual-server-like factory whose requests block and count how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.entries = threading.Semaphore(0)
        self.release = threading.Event()

    def new_session(self, callback: Any) -> Any:
        probe = self

        class Session:
            def handle_request(self, data: bytes) -> None:
                with probe.lock:
                    probe.running += 1
                    probe.most = max(probe.most, probe.running)
                probe.entries.release()
                probe.release.wait(WAIT)
                with probe.lock:
                    probe.running -= 1

        return Session()


@pytest.mark.parametrize("threads", [1, 2])
async def test_virtual_server_requests_share_its_thread_budget(
    frames: Frames, new_transport: NewTransport, threads: int
) -> None:
    probe = ConcurrencyProbe()
    settings = Settings(virtual_server_threads=threads)
    first, second = new_transport(), new_transport()
    async with serving(SessionBridge(probe, settings), first), serving(
        SessionBridge(probe, settings), second
    ):
        await first.feed(frames.size)
        await second.feed(frames.size)
        assert await anyio.to_thread.run_sync(probe.entries.acquire, True, WAIT)
        # The second connection's request gets in only if the budget allows two threads.
        patience = 0.5 if threads == 1 else WAIT
        entered = await anyio.to_thread.run_sync(probe.entries.acquire, True, patience)
        probe.release.set()
    assert entered is (threads == 2)
    assert probe.most == threads
