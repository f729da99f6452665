"""Writes at an edge carried to the upstream (``perspective_asgi._forward``): an upstream, an
edge of it and an edge of that edge, each a real server on loopback, written to and read by the
stock Python client.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import perspective
import pytest
import websockets

from perspective_asgi import HandshakeRequest, PerspectiveASGIApp, Policy, Settings
from perspective_asgi._core.wire import TABLE_UPDATE, read_envelope
from perspective_asgi.replica import Replica

from ._frames import length_delimited
from ._helpers import SCENARIO_TIMEOUT, connect, make_view_frame, reply, request, server_error
from ._servers import serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio

#: perspective-python 4 has no view.on_remove: a removal reaches an edge as a fresh snapshot
#: (the size check), but a clear of an indexed table, which sends nothing, only on reconnect.
CLEARS_REPLICATE = not perspective.__version__.startswith("4.")


@contextlib.asynccontextmanager
async def edge_of(upstream: str, settings: Settings | None = None,
                  **options: Any) -> AsyncIterator[tuple[str, Replica]]:
    """Serve a replica of ``upstream``'s tables, writes carried upstream; yield its URL."""
    replica = Replica(upstream, initial_delay=0.05, max_delay=0.2, **options)
    running = asyncio.ensure_future(replica.run())
    main = uvicorn_main(PerspectiveASGIApp(replica.write_through(), settings=settings),
                        ws_max_size=2**30)
    try:
        async with serve_in_background(main) as url:
            await asyncio.wait_for(replica.wait_ready(), 10)
            yield url, replica
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def rows(client: Any, name: str) -> dict[str, list[Any]]:
    table = await client.open_table(name)
    view = await table.view()
    try:
        columns: dict[str, list[Any]] = await view.to_columns()
        return columns
    finally:
        await view.delete()


async def converged(clients: list[Any], name: str, expected: dict[str, list[Any]]) -> None:
    """Wait, bounded, until every client's copy of ``name`` is ``expected``."""
    for client in clients:
        with anyio.fail_after(10):
            while (got := await rows(client, name)) != expected:
                await anyio.sleep(0.02)
        assert got == expected


def upstream_table(**columns: list[Any]) -> tuple[perspective.Server, Any]:
    server = perspective.Server()
    table = server.new_local_client().table(columns, name="t", index="id")
    return server, table


async def test_writes_at_a_leaf_reach_the_upstream_and_every_edge_and_read_back_at_once() -> None:
    server, _ = upstream_table(id=[1, 2, 3], v=[1.0, 2.0, 3.0])
    async with (
        serve_in_background(uvicorn_main(PerspectiveASGIApp(server))) as top,
        edge_of(top) as (middle, _),
        edge_of(middle) as (leaf, _),
        connect(top) as at_top,
        connect(middle) as at_middle,
        connect(leaf) as at_leaf,
    ):
        with anyio.fail_after(SCENARIO_TIMEOUT):
            table = await at_leaf.client.open_table("t")
            view = await table.view()
            steps: list[tuple[Callable[[], Awaitable[Any]], dict[str, list[Any]]]] = [
                (lambda: table.update([{"id": 4, "v": 4.0}, {"id": 1, "v": 10.0}]),
                 {"id": [1, 2, 3, 4], "v": [10.0, 2.0, 3.0, 4.0]}),
                (lambda: table.update({"id": [5], "v": [5.0]}),
                 {"id": [1, 2, 3, 4, 5], "v": [10.0, 2.0, 3.0, 4.0, 5.0]}),
                (lambda: table.remove([2, 3]), {"id": [1, 4, 5], "v": [10.0, 4.0, 5.0]}),
                (lambda: table.replace({"id": [7, 8], "v": [7.0, 8.0]}),
                 {"id": [7, 8], "v": [7.0, 8.0]}),
            ]
            if CLEARS_REPLICATE:
                steps += [
                    (table.clear, {"id": [], "v": []}),
                    (lambda: table.update([{"id": 9, "v": 9.0}]), {"id": [9], "v": [9.0]}),
                ]
            for write, expected in steps:
                await write()
                # Answered once the leaf's own copy holds it: read back at once, no waiting.
                assert await view.to_columns() == expected
                assert await rows(at_top.client, "t") == expected
                await converged([at_middle.client], "t", expected)


async def test_concurrent_writes_from_many_clients_arrive_exactly_once() -> None:
    server = perspective.Server()
    # No index: a duplicated write would be a second row, a lost one a missing row.
    server.new_local_client().table({"writer": "integer", "n": "integer"}, name="t")
    async with (
        serve_in_background(uvicorn_main(PerspectiveASGIApp(server))) as top,
        edge_of(top) as (middle, _),
        edge_of(middle) as (leaf, _),
        connect(top) as at_top,
    ):
        writers, writes = 8, 25

        async def write(url: str, writer: int) -> None:
            async with connect(url) as conn:
                table = await conn.client.open_table("t")
                # Each call waits for the last: one client's writes in order, the writers' at once.
                for n in range(writes):
                    await table.update([{"writer": writer, "n": n}])

        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with anyio.create_task_group() as group:
                for writer in range(writers):
                    group.start_soon(write, leaf if writer % 2 else middle, writer)
            got = await rows(at_top.client, "t")
            pairs = sorted(zip(got["writer"], got["n"], strict=True))
            assert pairs == [(w, n) for w in range(writers) for n in range(writes)]
            async with connect(leaf) as at_leaf, connect(middle) as at_middle:
                await converged([at_leaf.client, at_middle.client], "t", got)


async def test_what_an_edge_refuses_or_keeps_to_itself() -> None:
    server, _ = upstream_table(id=[1], v=[1.0])
    async with (
        serve_in_background(uvicorn_main(PerspectiveASGIApp(server))) as top,
        edge_of(top) as (edge, replica),
        connect(top) as at_top,
        connect(edge) as at_edge,
    ):
        with anyio.fail_after(SCENARIO_TIMEOUT):
            table = await at_edge.client.open_table("t")
            with pytest.raises(perspective.PerspectiveError, match="delete it there"):
                await table.delete()
            # The stock client sends update(view) only from the sync client: by hand, then.
            async with websockets.connect(edge) as ws:
                await ws.send(make_view_frame("t", "v1", msg_id=1))
                await reply(ws)
                from_view = length_delimited(1, length_delimited(6, b"v1"))
                await ws.send(request(2, "t", TABLE_UPDATE, from_view))
                msg_id, _, message, _ = server_error(await reply(ws))
                assert msg_id == 2 and "cannot be written to it" in message
            view = await table.view()
            # A table an edge's client makes is the edge's own: writes to it stay there.
            own = await at_edge.client.table({"id": [1]}, name="mine", index="id")
            await own.update([{"id": 2}])
            assert await rows(at_edge.client, "mine") == {"id": [1, 2]}
            assert await at_top.client.get_hosted_table_names() == ["t"]
            assert not replica.follows("mine")
            assert await rows(at_top.client, "t") == {"id": [1], "v": [1.0]}
            assert await view.to_columns() == {"id": [1], "v": [1.0]}


async def test_upstream_refusals_reach_the_edges_client() -> None:
    server, _ = upstream_table(id=[1], v=[1.0])
    upstream = PerspectiveASGIApp(server, settings=Settings(read_only=True))
    async with (
        serve_in_background(uvicorn_main(upstream)) as top,
        edge_of(top) as (edge, _),
        connect(edge) as at_edge,
    ):
        with anyio.fail_after(SCENARIO_TIMEOUT):
            table = await at_edge.client.open_table("t")
            with pytest.raises(perspective.PerspectiveError, match="read-only"):
                await table.update([{"id": 2, "v": 2.0}])
            assert await rows(at_edge.client, "t") == {"id": [1], "v": [1.0]}


async def test_an_edges_own_policy_refuses_before_anything_goes_upstream() -> None:
    server, source = upstream_table(id=[1], v=[1.0])

    async def authenticate(request: HandshakeRequest) -> object:
        return request.headers.get("x-user", "")

    settings = Settings(
        authenticate=authenticate,
        policy=lambda user: Policy(read_only=user != "writer"),
    )
    async with (
        serve_in_background(uvicorn_main(PerspectiveASGIApp(server))) as top,
        edge_of(top, settings=settings) as (edge, _),
        connect(edge, additional_headers={"x-user": "reader"}) as reader,
        connect(edge, additional_headers={"x-user": "writer"}) as writer,
    ):
        with anyio.fail_after(SCENARIO_TIMEOUT):
            refused = await reader.client.open_table("t")
            with pytest.raises(perspective.PerspectiveError, match="read-only"):
                await refused.update([{"id": 2, "v": 2.0}])
            allowed = await writer.client.open_table("t")
            await allowed.update([{"id": 3, "v": 3.0}])
            view = source.view()
            assert view.to_columns() == {"id": [1, 3], "v": [1.0, 3.0]}
            view.delete()


async def test_writes_without_an_upstream_are_refused_and_not_applied() -> None:
    server, source = upstream_table(id=[1], v=[1.0])
    async with contextlib.AsyncExitStack() as upstream:
        top = await upstream.enter_async_context(
            serve_in_background(uvicorn_main(PerspectiveASGIApp(server)))
        )
        async with edge_of(top) as (edge, replica), connect(edge) as at_edge:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                table = await at_edge.client.open_table("t")
                await table.update([{"id": 2, "v": 2.0}])
                # The upstream stops; the edge notices (its socket closes) and keeps serving.
                await upstream.aclose()
                with anyio.fail_after(10):
                    while replica.status()["connected"]:
                        await anyio.sleep(0.02)
                with pytest.raises(perspective.PerspectiveError,
                                   match="upstream unavailable: the write was not applied"):
                    await table.update([{"id": 3, "v": 3.0}])
                assert await rows(at_edge.client, "t") == {"id": [1, 2], "v": [1.0, 2.0]}
    view = source.view()
    assert view.to_columns() == {"id": [1, 2], "v": [1.0, 2.0]}
    view.delete()


async def test_a_table_without_an_index_stays_exact_through_replace_clear_and_resync() -> None:
    # With no index a change is rows appended, and a replace or clear sends only the rows
    # left: an edge applying deltas alone would keep the old rows. Each edge instead finds
    # more rows than its upstream has and takes a fresh snapshot.
    def upstream(values: list[int]) -> perspective.Server:
        server = perspective.Server()
        server.new_local_client().table({"n": values}, name="log")
        return server

    async with contextlib.AsyncExitStack() as first:
        top = await first.enter_async_context(
            serve_in_background(uvicorn_main(PerspectiveASGIApp(upstream([1, 2, 3]))))
        )
        port = urllib.parse.urlsplit(top).port
        async with (
            edge_of(top) as (middle, mid_replica),
            edge_of(middle) as (leaf, leaf_replica),
            connect(middle) as at_middle,
            connect(leaf) as at_leaf,
        ):
            with anyio.fail_after(SCENARIO_TIMEOUT):
                table = await at_leaf.client.open_table("log")
                view = await table.view()
                steps: list[tuple[Callable[[], Awaitable[Any]], list[int]]] = [
                    (lambda: table.update({"n": [4, 5]}), [1, 2, 3, 4, 5]),
                    (lambda: table.replace({"n": [7, 8]}), [7, 8]),
                    (lambda: table.update({"n": [9]}), [7, 8, 9]),
                    (table.clear, []),
                    (lambda: table.update({"n": [10, 11]}), [10, 11]),
                ]
                for write, expected in steps:
                    await write()
                    # Answered once the leaf's own copy is right: read back at once.
                    assert await view.to_columns() == {"n": expected}
                    await converged([at_middle.client], "log", {"n": expected})

                # The upstream restarts with other rows: the middle edge replaces its copy,
                # which its own follower (the leaf) receives as rows appended.
                await first.aclose()
                async with serve_in_background(
                    uvicorn_main(PerspectiveASGIApp(upstream([100, 200]))), port=port
                ) as restarted, connect(restarted) as at_top:
                    await converged([at_top.client, at_middle.client, at_leaf.client], "log",
                                    {"n": [100, 200]})
                    assert mid_replica.status()["tables"]["log"]["snapshots"] >= 2
                    assert leaf_replica.status()["tables"]["log"]["snapshots"] >= 2
                    # And writes after it arrive once.
                    await (await at_leaf.client.open_table("log")).update({"n": [300]})
                    await converged([at_top.client, at_middle.client, at_leaf.client], "log",
                                    {"n": [100, 200, 300]})


class _SwallowingSession:
    """A session that takes ``table_update`` requests and never answers them."""

    def __init__(self, session: Any, swallowed: asyncio.Event) -> None:
        self._session = session
        self._swallowed = swallowed

    def handle_request(self, request: bytes) -> Any:
        if read_envelope(request).kind == TABLE_UPDATE:
            self._swallowed.set()
            return None
        return self._session.handle_request(request)

    def close(self) -> Any:
        return self._session.close()


async def test_a_write_whose_answer_is_lost_with_the_upstream_says_it_may_have_been_applied(
) -> None:
    server, _ = upstream_table(id=[1], v=[1.0])
    swallowed = asyncio.Event()

    class Swallowing:
        def new_session(self, callback: Any) -> _SwallowingSession:
            return _SwallowingSession(server.new_session(callback), swallowed)

    async with contextlib.AsyncExitStack() as upstream:
        top = await upstream.enter_async_context(
            serve_in_background(uvicorn_main(PerspectiveASGIApp(Swallowing())))
        )
        async with edge_of(top) as (edge, _), connect(edge) as at_edge:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                table = await at_edge.client.open_table("t")
                async with anyio.create_task_group() as group:
                    async def write() -> None:
                        with pytest.raises(perspective.PerspectiveError,
                                           match="may or may not have been applied"):
                            await table.update([{"id": 2, "v": 2.0}])

                    group.start_soon(write)
                    # The upstream has the write and will never answer; then it goes away.
                    await swallowed.wait()
                    await upstream.aclose()
                # The edge still serves, and refuses the next write as not applied.
                with pytest.raises(perspective.PerspectiveError, match="was not applied"):
                    await table.update([{"id": 3, "v": 3.0}])
