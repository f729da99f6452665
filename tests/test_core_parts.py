"""The core's parts one at a time: outbox, request runner, guard chain and hosted-tables gate.

The bridge's own tests (test_session.py) drive them together; these pin each part's contract,
its states and its edge cases, with no transport at all.
"""

from __future__ import annotations

import platform
import threading
from typing import Any

import anyio
import perspective
import pytest

from perspective_asgi import Policy, SessionObserver, Settings
from perspective_asgi._core import memory
from perspective_asgi._core.costs import (
    BUDGET,
    COOLDOWN,
    MAX_FRAME,
    PROOF,
    THREAD_WALL_LIMIT,
    CostBook,
    close_book,
    loop_cost,
    open_book,
)
from perspective_asgi._core.guards import GuardChain
from perspective_asgi._core.hosted import GateState, HostedTablesGate, HostedTablesProbe
from perspective_asgi._core.idle import IdleWatch
from perspective_asgi._core.outbox import Outbox, OutboxState
from perspective_asgi._core.policy import resolve_policy
from perspective_asgi._core.runner import EngineKind, Handoff, RequestRunner
from perspective_asgi._core.wire import SERVER_ERROR, encode_field, read_envelope
from perspective_asgi._exceptions import ProtocolError

from ._helpers import DEMO_ROWS

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Outbox ------------------------------------------------------------------------------------


def test_outbox_asks_for_one_drain_per_burst() -> None:
    outbox = Outbox(limit=100)
    assert outbox.put(b"a") is True  # idle: the caller must start a drain
    assert outbox.put(b"b") is False  # a drain is due already
    assert outbox.state is OutboxState.DRAINING
    assert outbox.queued_bytes == 2
    assert outbox.take() == b"a"
    assert outbox.take() == b"b"
    assert outbox.take() is None  # empty: the drain ends
    assert outbox.state is OutboxState.IDLE
    assert outbox.put(b"c") is True  # the next burst needs a new drain


def test_outbox_admits_any_message_into_an_empty_queue() -> None:
    outbox = Outbox(limit=10)
    assert outbox.put(b"x" * 1000) is True
    assert outbox.state is OutboxState.DRAINING
    assert outbox.take() == b"x" * 1000


def test_outbox_overflow_drops_everything_and_asks_to_close() -> None:
    outbox = Outbox(limit=10)
    outbox.put(b"12345")
    outbox.put(b"12345")
    assert outbox.put(b"1") is True  # past the bound: the caller must close the connection
    assert outbox.state is OutboxState.OVERFLOWED
    assert outbox.queued_bytes == 0
    assert outbox.take() is None
    assert outbox.put(b"more") is False  # nothing more is held
    assert outbox.queued_bytes == 0


def test_outbox_claim_takes_only_an_idle_outbox() -> None:
    outbox = Outbox(limit=10)
    assert outbox.claim() is True
    assert outbox.put(b"reply") is False  # the claimer drains it; nobody else is woken
    assert outbox.claim() is False
    assert outbox.take() == b"reply"
    assert outbox.take() is None
    assert outbox.claim() is True


def test_closed_outbox_drops_puts() -> None:
    outbox = Outbox(limit=10)
    outbox.put(b"a")
    outbox.close()
    assert outbox.state is OutboxState.CLOSED
    assert outbox.put(b"b") is False
    assert outbox.take() is None
    assert outbox.claim() is False


def test_outbox_counts_bytes_exactly_under_concurrent_puts() -> None:
    outbox = Outbox(limit=10**9)
    drains = []

    def producer() -> None:
        for _ in range(5000):
            drains.append(outbox.put(b"12345678"))

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outbox.queued_bytes == 4 * 5000 * 8
    assert drains.count(True) == 1  # one drain for the whole burst
    taken = 0
    while outbox.take() is not None:
        taken += 1
    assert taken == 20000 and outbox.queued_bytes == 0


# Request runner ----------------------------------------------------------------------------


class BlockingSession:
    """A session whose requests block in the engine until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.handled: list[bytes] = []
        self.closes = 0

    def handle_request(self, data: bytes) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.handled.append(data)

    def close(self) -> None:
        self.closes += 1


def make_runner(session: Any, closed: list[str], kind: EngineKind = EngineKind.SERVER) -> Any:
    return RequestRunner(
        session, kind, engine_key=id(session), inline_kinds=frozenset({8}),
        limiter=anyio.CapacityLimiter(2), on_closed=lambda: closed.append("closed"),
    )


async def test_close_while_a_thread_is_in_the_engine_is_left_to_that_thread() -> None:
    session, closed = BlockingSession(), []
    runner = make_runner(session, closed)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(runner.run, b"slow", 6)  # kind 6 (make view) runs in a thread
        assert await anyio.to_thread.run_sync(session.entered.wait, 10)
        assert runner._handoff is Handoff.IN_ENGINE
        assert runner.close_session() is None
        assert session.closes == 0  # closing under the thread would be unsafe
        assert runner._handoff is Handoff.CLOSE_ON_RETURN
        session.release.set()
    assert session.closes == 1 and closed == ["closed"]
    assert runner._handoff is Handoff.CLOSED
    assert runner.close_session() is None  # exactly once
    assert session.closes == 1
    await runner.run(b"after", 6)  # a closed session gets no more requests
    assert session.handled == [b"slow"]


async def test_close_with_no_thread_closes_at_once() -> None:
    session, closed = BlockingSession(), []
    runner = make_runner(session, closed)
    assert runner.close_session() is None
    assert session.closes == 1 and closed == ["closed"]
    runner.close_session()
    assert session.closes == 1


async def test_a_request_cancelled_before_its_thread_started_never_runs() -> None:
    session, closed = BlockingSession(), []
    busy = anyio.CapacityLimiter(1)
    runner = RequestRunner(
        session, EngineKind.SERVER, engine_key=1, inline_kinds=frozenset(), limiter=busy,
        on_closed=lambda: closed.append("closed"),
    )
    taken, done = anyio.Event(), anyio.Event()

    async def hold_the_only_thread() -> None:
        async with busy:
            taken.set()
            await done.wait()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(hold_the_only_thread)
        await taken.wait()
        with anyio.move_on_after(0.05):  # the request waits for a thread, then gives up
            await runner.run(b"never", 6)
        assert runner._handoff is Handoff.IDLE
        runner.close_session()
        done.set()
    assert session.closes == 1
    assert session.handled == []


async def test_inline_kinds_run_on_the_loop_and_others_in_threads() -> None:
    threads: list[int] = []

    class Recording:
        def handle_request(self, data: bytes) -> None:
            threads.append(threading.get_ident())

    runner = make_runner(Recording(), [])
    assert runner.runs_inline(8) and not runner.runs_inline(6)
    await runner.run(b"size", 8)
    await runner.run(b"view", 6)
    assert threads[0] == threading.get_ident() != threads[1]
    virtual = make_runner(Recording(), [], EngineKind.VIRTUAL)
    assert not virtual.runs_inline(8)  # a virtual server may run SQL for any request
    runner.close_session()


async def test_undecodable_request_of_a_virtual_server_is_the_clients_fault() -> None:
    class Decoding:
        def handle_request(self, data: bytes) -> None:
            raise ValueError("failed to decode request")

    runner = make_runner(Decoding(), [], EngineKind.VIRTUAL)
    with pytest.raises(ProtocolError) as raised:
        await runner.run(b"junk", 8)
    assert raised.value.code == 1007


def test_engine_kind_of_each_factory() -> None:
    assert EngineKind.of(perspective.Server()) is EngineKind.SERVER
    assert EngineKind.of(perspective.AsyncServer()) is EngineKind.ASYNC_SERVER
    assert EngineKind.of(object()) is EngineKind.VIRTUAL


# Guard chain -------------------------------------------------------------------------------


class Refusals(SessionObserver):
    def __init__(self) -> None:
        self.refused: list[tuple[int | None, str]] = []

    def request_refused(self, kind: int | None, reason: str) -> None:
        self.refused.append((kind, reason))


def frame(msg_id: int, entity: str, kind: int, body: bytes = b"") -> bytes:
    return encode_field(1, msg_id) + encode_field(2, entity.encode()) + encode_field(kind, body)


def chain(settings: Settings, policy: Policy | None = None) -> tuple[GuardChain, Refusals]:
    observer = Refusals()
    resolved = resolve_policy(policy, None, read_only=settings.read_only)
    return GuardChain.for_connection(object(), resolved, settings, observer), observer


def test_guard_chain_refuses_by_policy_and_counts_violations() -> None:
    guards, observer = chain(Settings(max_violations=1), Policy(read_only=True))
    size = read_envelope(frame(1, "demo", 8))
    update = read_envelope(frame(2, "demo", 33))
    assert guards.admit(size) is None
    refusal = guards.admit(update)
    assert refusal is not None
    reply = read_envelope(refusal)
    assert (reply.msg_id, reply.entity_id, reply.kind) == (2, "demo", SERVER_ERROR)
    assert guards.violations == 1 and observer.refused == [(33, "read_only")]
    with pytest.raises(ProtocolError) as raised:
        guards.admit(update)  # one more than max_violations
    assert raised.value.code == 1008


def test_guard_chain_refuses_foreign_views_as_not_found() -> None:
    guards, observer = chain(Settings())
    refusal = guards.admit(read_envelope(frame(3, "someone-elses-view", 15)))
    assert refusal is not None and b"View not found" in refusal
    assert observer.refused == [(15, "view")]


def test_rate_refusals_are_not_violations() -> None:
    guards, observer = chain(Settings(max_requests_per_second=1, request_burst=2, max_violations=0))
    size = read_envelope(frame(1, "demo", 8))
    assert guards.admit(size) is None and guards.admit(size) is None
    assert guards.admit(size) is not None  # the bucket is empty: throttled, not judged
    assert guards.violations == 0 and observer.refused == [(8, "rate")]


def test_read_only_setting_applies_whatever_the_policy() -> None:
    assert resolve_policy(Policy(tables={"demo"}), None, read_only=True).read_only
    assert resolve_policy(lambda user: Policy(read_only=user == "guest"), "guest").read_only
    with pytest.raises(TypeError):
        resolve_policy(lambda user: "not a policy", None)  # type: ignore[arg-type, return-value]


# Hosted-tables gate ------------------------------------------------------------------------


async def test_gate_passes_on_a_change_only_when_the_visible_tables_change() -> None:
    server = perspective.Server()
    client = server.new_local_client()
    client.table(DEMO_ROWS, name="demo")
    policy = resolve_policy(Policy(tables={"demo", "later"}), None)
    guards = GuardChain.for_connection(server, policy, Settings(), SessionObserver())
    gate = HostedTablesGate(HostedTablesProbe(server, False), guards.policy.visible, None)
    subscribe = read_envelope(frame(7, "", 4, encode_field(1, 1)))
    await gate.before(subscribe)
    delivered: list[bytes] = []
    notification = encode_field(1, 7)

    client.table({"x": [1]}, name="hidden")
    assert gate.changed(notification) is True  # the first one schedules a check
    assert gate.changed(notification) is False  # the check under way takes it too
    await gate.check(delivered.append)
    assert delivered == [] and gate.state is GateState.IDLE  # a hidden table: not told

    client.table({"x": [1]}, name="later")
    assert gate.changed(notification) is True
    await gate.check(delivered.append)
    assert delivered == [notification]  # a permitted table appeared
    await gate.close()
    assert gate.changed(notification) is False


# Cost book ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_kind_runs_on_the_loop_only_after_proving_cheap() -> None:
    clock = Clock()
    book = CostBook(clock)
    key = (6, "small")
    for _ in range(PROOF - 1):
        book.record(key, BUDGET / 10)
        assert not book.cheap(key)
    book.record(key, BUDGET / 10)
    assert book.cheap(key)
    assert not book.cheap((6, "other"))  # learnt per table


def test_one_slow_run_sends_a_kind_back_to_threads_for_the_cooldown() -> None:
    clock = Clock()
    book = CostBook(clock)
    key = (24, "big")
    for _ in range(PROOF):
        book.record(key, 0)
    book.record(key, BUDGET * 2)
    assert not book.cheap(key)
    for _ in range(PROOF):
        book.record(key, 0)  # cheap again, but within the cooldown
    assert not book.cheap(key)
    clock.now += COOLDOWN
    assert book.cheap(key)


async def test_a_small_view_moves_to_the_loop_and_a_large_update_never_does() -> None:
    server = perspective.Server()
    server.new_local_client().table({"a": [1, 2, 3]}, name="small")
    threads: list[int] = []

    class Recording:
        def handle_request(self, data: bytes) -> None:
            threads.append(threading.get_ident())

    runner = RequestRunner(
        Recording(), EngineKind.SERVER, engine_key=id(server), inline_kinds=frozenset({8}),
        limiter=anyio.CapacityLimiter(2), on_closed=lambda: None,
    )
    for _ in range(PROOF + 2):
        await runner.run(b"view", 6, "small")
    here = threading.get_ident()
    assert [thread == here for thread in threads] == [False] * PROOF + [True, True]
    for _ in range(PROOF):
        await runner.run(b"update", 33, "small")
    assert runner.runs_inline(33, "small", MAX_FRAME)
    assert not runner.runs_inline(33, "small", MAX_FRAME + 1)  # its rows decide its cost
    runner.close_session()


def test_an_engines_book_ends_with_its_last_session() -> None:
    # Engines take no weak references and are keyed by id, which a new engine may reuse.
    key = -12345
    first = open_book(key)
    assert open_book(key) is first  # a second session of the same engine shares it
    close_book(key)
    first.record((6, "t"), 0)
    assert open_book(key) is first
    close_book(key)
    close_book(key)
    assert open_book(key) is not first  # a new engine with that id learns from scratch
    close_book(key)


def test_a_thread_run_costs_its_cpu_time_unless_it_ran_long() -> None:
    # Waiting for the engine's lock or a core is not what it would cost the loop...
    assert loop_cost(wall=THREAD_WALL_LIMIT, cpu=BUDGET / 2) == BUDGET / 2
    # ...but a long run may have computed on the engine's own threads.
    assert loop_cost(wall=THREAD_WALL_LIMIT * 2, cpu=BUDGET / 2) == THREAD_WALL_LIMIT * 2


# Memory ------------------------------------------------------------------------------------


def test_large_sends_trim_the_allocator_and_small_ones_do_not() -> None:
    if platform.libc_ver()[0] == "glibc":
        assert memory._trim is not None  # found on glibc, where arenas hold freed replies
    assert memory.release_after_send(memory.TRIM_AFTER - 1) is False
    assert memory.release_after_send(memory.TRIM_AFTER) is (memory._trim is not None)


# Idle watch --------------------------------------------------------------------------------


async def test_idle_watch_waits_while_busy_and_fires_once_idle() -> None:
    watch = IdleWatch(0.05)
    busy = [True]
    fired = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch.watch, lambda: busy[0], fired.set)
            await anyio.sleep(0.15)  # three periods: busy all along, so nothing fires
            assert not fired.is_set()
            busy[0] = False
            await fired.wait()
