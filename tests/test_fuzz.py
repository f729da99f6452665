"""Hostile frames through real adapters: the server refuses or answers, and never falls over.

The server runs in this test process, so a fault in the engine (a SIGSEGV or an abort in
perspective-python) ends the whole pytest run rather than failing one test. ``scripts/fuzz``
runs the server in a subprocess instead and survives such crashes; use it for long runs.

The frames come from every request kind, table_make_view (6) and view_delete (11) included:
hostile forms of those crash perspective-python itself (a filter lacking its value: SIGSEGV;
deleting another session's view, then closing that session: abort) unless the core refuses
them, so this run also proves those guards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest

from perspective_asgi import CloseCode, Settings

from ._fuzz import FrameSource, FuzzStats, fuzz, kind_of, seed_frames
from ._helpers import CountingFactory, connect
from ._servers import ADAPTERS, serve_in_thread

pytestmark = pytest.mark.anyio

#: What the server may close a fuzzing connection with. 1007 is its answer to a frame that is
#: not a well-formed request. 1003 (text) and 1009 (too big) cannot be provoked by these small
#: binary frames, 1006 would mean the server dropped TCP without a close frame, and 1011 means
#: the core or the engine raised on client input: each of those is a bug here, not a refusal.
EXPECTED_CLOSE_CODES = {CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY, CloseCode.INVALID_PAYLOAD}


@pytest.fixture(params=["asgi-uvicorn", "aiohttp"])
def adapter(request: pytest.FixtureRequest) -> str:
    # Two adapters on different transport stacks keep this test within seconds; the envelope
    # and the engine are shared by all of them. TODO: add "tornado" once it no longer stalls
    # under this load (200 fuzzed frames did not finish within 100 s).
    return str(request.param)


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    return seed_frames()


@pytest.fixture(autouse=True)
def quiet_transport_logs(caplog: pytest.LogCaptureFixture) -> None:
    # The suite captures DEBUG; a record of every fuzzed frame would be most of the run time.
    for name in ("websockets", "tornado", "uvicorn", "asyncio"):
        caplog.set_level(logging.WARNING, logger=name)


#: The bound of one fuzzing run of a thousand frames, and of the check that follows it.
FUZZ_TIMEOUT = 60
CHECK_TIMEOUT = 30


async def run_fuzz(url: str, source: FrameSource, frames: int, batch: int) -> FuzzStats:
    with anyio.fail_after(FUZZ_TIMEOUT):
        return await fuzz(url, source, frames, batch=batch)


async def answers_correctly(url: str) -> None:
    """A fresh client gets correct answers: the server survived the fuzzing."""
    with anyio.fail_after(CHECK_TIMEOUT):
        async with connect(url) as conn:
            rows = {"x": [1, 2, 3], "y": ["a", "b", "c"]}
            table = await conn.client.table(rows, name="after-fuzz")
            view = await table.view(filter=[["x", ">", 1]])
            assert await view.to_columns() == {"x": [2, 3], "y": ["b", "c"]}
            await view.delete()
            await table.delete()


def check(stats: FuzzStats, frames: int, caplog: pytest.LogCaptureFixture) -> None:
    assert stats.frames >= frames
    assert not stats.hangs, f"no answer to the probe after {stats.hangs[0]!r}"
    assert set(stats.close_codes) <= EXPECTED_CLOSE_CODES, stats.close_codes
    # Most mutations break the envelope, so most connections end with 1007; the rest reach
    # the engine, which answers a bad request with an error reply and keeps the connection.
    assert stats.close_codes.get(CloseCode.INVALID_PAYLOAD, 0) > stats.connections // 4
    faults = [
        r for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("perspective_asgi")
    ]
    assert not faults, faults[0].getMessage()


async def test_fuzzed_frames_are_refused_or_answered(
    url: str, seeds: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # One frame at a time, each followed by a probe: the server is never asked to close a
    # connection while a request of it waits for a worker thread (see the test below).
    frames = 1000
    stats = await run_fuzz(
        url, FrameSource(20260101, seeds, allow_crashing=True), frames, batch=1
    )
    check(stats, frames, caplog)
    await answers_correctly(url)
    # The ``url`` fixture then checks that every session opened was closed.


@pytest.fixture
def pipelined_url(factory: CountingFactory) -> Iterator[str]:
    with serve_in_thread(ADAPTERS["asgi-uvicorn"](factory, Settings())) as ws_url:
        yield ws_url


async def test_pipelined_fuzzed_frames_leave_no_session_open(
    pipelined_url: str,
    factory: CountingFactory,
    seeds: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Four frames before each probe: a bad frame often arrives while an earlier good one is
    # queued for a worker thread, so the connection is cancelled with a request in flight.
    frames = 1000
    stats = await run_fuzz(
        pipelined_url, FrameSource(20260102, seeds, allow_crashing=True), frames, batch=4
    )
    check(stats, frames, caplog)
    await answers_correctly(pipelined_url)
    # A connection cancelled while one of its requests waits for a worker thread must still
    # close its session: anyio never runs an abandoned call that had not started.
    await factory.all_closed(timeout=10)


def test_seed_frames_cover_the_request_kinds(seeds: list[bytes]) -> None:
    kinds = {kind_of(frame) for frame in seeds}
    # The mutations start from these; a kind missing here is only reached by chance.
    assert {4, 6, 7, 8, 11, 12, 15, 16, 21, 24, 25, 26, 27, 28, 33} <= kinds
