"""The edge tier end to end: an upstream (``perspective-asgi serve``) and two edge processes
(``perspective-asgi edge``) on loopback, driven by the stock Python client.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import perspective
import pytest

from perspective_asgi import HandshakeRequest, PerspectiveASGIApp, Settings
from perspective_asgi.edge import create_edge_app, edge_options_from_env
from perspective_asgi.replica import Replica

from ._helpers import (
    SCENARIO_TIMEOUT,
    ServerProcess,
    command,
    connect,
    environment,
    free_port,
    in_thread,
    readiness,
)
from ._servers import serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio

IDS = 2_000
#: perspective-python 4 has no view.on_remove: a removal reaches an edge as a fresh snapshot
#: (the size check), but a clear of an indexed table, which sends nothing, only on reconnect.
CLEARS_REPLICATE = not perspective.__version__.startswith("4.")


def write_ticks(path: Path) -> None:
    lines = ["id,price,tag"] + [f"{i},{i * 0.5},t{i % 7}" for i in range(IDS)]
    path.write_text("\n".join(lines) + "\n")


async def start(args: list[str], tmp_path: Path, port: int | None = None) -> ServerProcess:
    """Start ``perspective-asgi`` with ``args`` on ``port`` (or a free one); return it once
    it listens."""
    port = port or free_port()
    server = ServerProcess(
        [*args, "--port", str(port)], port, tmp_path, env=environment(), cwd=tmp_path
    )
    try:
        await in_thread(server.wait_listening)
    except BaseException:
        server.kill()
        raise
    return server


def wait_for_status(server: ServerProcess, status: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the ``/readyz`` of ``server`` (another process: it has no event to wait on) until
    it answers ``status``; return the body. Fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = readiness(server.port)
        if code == status:
            return body
        if time.monotonic() > deadline:
            pytest.fail(
                f"/readyz on {server.port} answered {code}, not {status}, for {timeout} s: {body}"
            )
        # Waiting on the process is the pause between polls, and notices an early exit.
        try:
            exit_code = server.popen.wait(0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"exited with {exit_code} while waiting for /readyz:\n{server.stderr}")


async def status_of(server: ServerProcess, status: int, timeout: float = 30.0) -> dict[str, Any]:
    """``wait_for_status`` without blocking the event loop."""
    body: dict[str, Any] = await in_thread(wait_for_status, server, status, timeout)
    return body


async def rows(url: str, table: str = "ticks") -> dict[str, list[Any]]:
    async with connect(url) as conn:
        source = await conn.client.open_table(table)
        # Columns named: a DuckDB virtual server has no default column list.
        columns = list(await source.schema())
        view = await source.view(columns=columns, sort=[["id", "asc"]])
        try:
            return dict(await view.to_columns())
        finally:
            await view.delete()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Wait until ``check()`` is true; return the seconds it took.

    A poll, not a wait on an event: what it checks is a replica's copy of a table, which
    signals nothing when it catches up (and, for the edge processes, lives in another process).
    """
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        await anyio.sleep(0.05)
    return time.monotonic() - started


async def test_two_edges_follow_recover_and_survive_each_other(tmp_path: Path) -> None:
    data = tmp_path / "ticks.csv"
    write_ticks(data)
    up_port = free_port()
    serve = command("serve", str(data), "--no-demo", "--index", "id")
    upstream = await start(serve, tmp_path, up_port)
    edges: list[ServerProcess] = []
    try:
        edges = [await start(command("edge", upstream.url), tmp_path) for _ in range(2)]
        for edge in edges:
            status = await status_of(edge, 200)
            assert status["tables"]["ticks"]["synced"] is True

        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with (
                connect(upstream.url) as up,
                connect(edges[0].url) as e0,
                connect(edges[1].url) as e1,
            ):
                source = await up.client.open_table("ticks")
                seen: list[asyncio.Event] = []
                for conn in (e0, e1):
                    replica = await conn.client.open_table("ticks")
                    assert replica.get_index() == "id"
                    view = await replica.view(filter=[["id", "==", 0]], columns=["price"])
                    arrived = asyncio.Event()
                    seen.append(arrived)
                    await view.on_update(lambda *_, arrived=arrived: arrived.set())
                    assert await replica.size() == IDS  # one round trip: subscribed
                # One update reaches both edges' clients promptly.
                sent = time.monotonic()
                await source.update([{"id": 0, "price": -1.0, "tag": "x"}])
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in seen)), 10)
                assert time.monotonic() - sent < 5.0

                # A burst of 100,000 row updates (1,000 batches of 100), some new rows, and
                # removals: the edges end up with exactly the upstream's rows.
                rng = random.Random(7)
                for batch in range(1_000):
                    await source.update([
                        {"id": rng.randrange(IDS + 500), "price": rng.random(), "tag": f"b{batch}"}
                        for _ in range(100)
                    ])
                    if batch % 100 == 99:
                        await source.remove([rng.randrange(IDS) for _ in range(20)])
                expected = await rows(upstream.url)
                assert len(expected["id"]) > IDS - 200

                for edge in edges:
                    async def same(url: str = edge.url) -> bool:
                        return await rows(url) == expected

                    await eventually(same, 60, f"edge {edge.port} has the upstream's rows")

        # The upstream goes away: edges keep serving the last state, and are not ready.
        # (On perspective-python 4 each burst of removals cost a snapshot already.)
        before = [(await status_of(edge, 200))["tables"]["ticks"]["snapshots"] for edge in edges]
        upstream.kill()
        for edge in edges:
            body = await status_of(edge, 503, timeout=10)
            assert body["connected"] is False
        with anyio.fail_after(SCENARIO_TIMEOUT):
            served = await rows(edges[0].url)
        assert len(served["id"]) > IDS - 200

        # It comes back (from its file: the burst is gone): the edges resynchronise to it.
        upstream = await start(serve, tmp_path, up_port)
        for edge, snapshots in zip(edges, before, strict=True):
            body = await status_of(edge, 200, timeout=30)
            assert body["tables"]["ticks"]["snapshots"] == snapshots + 1
        with anyio.fail_after(SCENARIO_TIMEOUT):
            fresh = await rows(upstream.url)
        assert len(fresh["id"]) == IDS
        for edge in edges:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                assert await rows(edge.url) == fresh

        # Killing one edge does not affect the other.
        edges[0].kill()

        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(upstream.url) as up:
                await (await up.client.open_table("ticks")).update([{"id": 5, "price": 55.5}])

            async def updated() -> bool:
                return (await rows(edges[1].url))["price"][5] == 55.5

            await eventually(updated, 10, "the remaining edge follows the upstream")

        assert (await in_thread(readiness, edges[1].port))[0] == 200
    finally:
        for server in [upstream, *edges]:
            server.kill()


def upstream_connections(port: int) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("perspective_connections "):
                return float(line.split()[1])
    return 0.0


async def test_each_edge_worker_is_its_own_replica(tmp_path: Path) -> None:
    data = tmp_path / "ticks.csv"
    write_ticks(data)
    upstream = await start(command("serve", str(data), "--no-demo", "--index", "id"), tmp_path)
    edge: ServerProcess | None = None
    try:
        edge = await start(command("edge", upstream.url, "--workers", "2"), tmp_path)

        async def two_subscribers() -> bool:
            return await in_thread(upstream_connections, upstream.port) >= 2

        await eventually(two_subscribers, 30, "two workers, two upstream subscribers")
        await status_of(edge, 200)
        with anyio.fail_after(SCENARIO_TIMEOUT):
            assert len((await rows(edge.url))["id"]) == IDS
        # Idle on purpose: no worker opens a third upstream connection in the meantime.
        await anyio.sleep(0.5)
        assert await in_thread(upstream_connections, upstream.port) == 2
        # SIGTERM: the supervisor stops its workers (SIGKILL would orphan them).
        await in_thread(edge.stop_cleanly)
    finally:
        for server in (upstream, edge):
            if server is not None:
                server.kill()


async def test_a_duckdb_file_served_through_an_edge(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    path = tmp_path / "shop.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute("CREATE TABLE sales AS SELECT CAST(range AS INTEGER) AS id, "
                   "CAST(range * 1.5 AS DOUBLE) AS amount FROM range(5000)")
    upstream = await start(command("serve", str(path)), tmp_path)
    edge: ServerProcess | None = None
    try:
        # Name the tables: a DuckDB server also lists a temporary table per open view.
        edge = await start(command("edge", upstream.url, "--tables", "shop.sales"), tmp_path)
        status = await status_of(edge, 200)
        assert list(status["tables"]) == ["shop.sales"]
        with anyio.fail_after(SCENARIO_TIMEOUT):
            direct = await rows(upstream.url, "shop.sales")
        assert len(direct["id"]) == 5000
        with anyio.fail_after(SCENARIO_TIMEOUT):
            assert await rows(edge.url, "shop.sales") == direct
    finally:
        for server in (upstream, edge):
            if server is not None:
                server.kill()


async def test_edge_follows_new_tables_and_named_tables_only(tmp_path: Path) -> None:
    upstream_server = perspective.Server()
    upstream_server.new_local_client().table({"a": [1, 2]}, name="first")

    async def scenario(url: str) -> None:
        everything = Replica(url)
        only_second = Replica(url, tables=["second"], initial_delay=0.05)
        runs = [asyncio.ensure_future(r.run()) for r in (everything, only_second)]
        try:
            await asyncio.wait_for(everything.wait_ready(), 10)
            local = everything.server.new_local_client()
            assert local.get_hosted_table_names() == ["first"]
            assert not only_second.ready  # "second" does not exist upstream yet
            async with connect(url) as conn:
                await conn.client.table({"b": [1, 2, 3]}, name="second", limit=5)

            async def both_have_second() -> bool:
                return all(
                    "second" in r.server.new_local_client().get_hosted_table_names()
                    for r in (everything, only_second)
                )

            await eventually(both_have_second, 20, "both replicas host the new table")
            await asyncio.wait_for(only_second.wait_ready(), 20)
            copy = only_second.server.new_local_client().open_table("second")
            assert copy.size() == 3
            assert copy.get_limit() == 5
            assert only_second.server.new_local_client().get_hosted_table_names() == ["second"]
        finally:
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    main = uvicorn_main(PerspectiveASGIApp(upstream_server), ws_max_size=2**30)
    async with serve_in_background(main) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            await scenario(url)


async def test_removals_replace_and_clear_reach_the_replica() -> None:
    upstream_server = perspective.Server()
    source = upstream_server.new_local_client().table(
        {"id": [1, 2, 3], "v": [1.0, 2.0, 3.0]}, name="t", index="id"
    )

    async def scenario(url: str) -> None:
        replica = Replica(url)
        task = asyncio.ensure_future(replica.run())
        try:
            await asyncio.wait_for(replica.wait_ready(), 10)
            copy = replica.server.new_local_client().open_table("t")

            async def matches() -> bool:
                view = copy.view()
                try:
                    return bool(view.to_columns() == expected)
                finally:
                    view.delete()

            steps: list[Callable[[], object]] = [
                lambda: source.update([{"id": 4, "v": 4.0}, {"id": 1, "v": 10.0}]),
                lambda: source.remove([2]),
                lambda: source.replace({"id": [7, 8], "v": [7.0, 8.0]}),
            ]
            if CLEARS_REPLICATE:
                steps += [lambda: source.clear(), lambda: source.update([{"id": 9, "v": 9.0}])]
            for step in steps:
                step()
                view = source.view()
                expected = view.to_columns()
                view.delete()
                await eventually(matches, 10, f"the replica has {expected}")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    main = uvicorn_main(PerspectiveASGIApp(upstream_server), ws_max_size=2**30)
    async with serve_in_background(main) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            await scenario(url)


async def test_an_edge_writes_through_with_its_own_rotated_credentials(tmp_path: Path) -> None:
    """``perspective-asgi edge --header ... --header-file F``: the upstream sees both headers;
    the edge's clients' writes are applied upstream; while the upstream is down they are
    refused; after it comes back with a new token, which the edge reads again from F, they are
    applied once each."""
    valid = {"t1"}
    seen: list[tuple[str, str]] = []

    async def authenticate(request: HandshakeRequest) -> object:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        seen.append((token, request.headers.get("x-edge", "")))
        return token if token in valid else None

    server = perspective.Server()
    source = server.new_local_client().table({"id": "integer", "note": "string"}, name="notes")
    main = uvicorn_main(PerspectiveASGIApp(server, settings=Settings(authenticate=authenticate)))
    headers = tmp_path / "upstream.headers"
    headers.write_text("# the upstream's token, rotated by the test\nAuthorization: Bearer t1\n")
    port = free_port()

    async def write(edge: ServerProcess, note_id: int) -> None:
        async with connect(edge.url) as conn:
            table = await conn.client.open_table("notes")
            await table.update([{"id": note_id, "note": f"from the edge {note_id}"}])

    def upstream_ids() -> list[int]:
        view = source.view()
        try:
            return sorted(view.to_columns()["id"])
        finally:
            view.delete()

    edge: ServerProcess | None = None
    try:
        async with serve_in_background(main, port=port) as url:
            edge = await start(command("edge", url, "--header", "X-Edge: e1",
                                       "--header-file", str(headers)), tmp_path)
            await status_of(edge, 200)
            with anyio.fail_after(SCENARIO_TIMEOUT):
                await write(edge, 1)
            assert upstream_ids() == [1]
            assert seen and set(seen) == {("t1", "e1")}
        await status_of(edge, 503)
        with anyio.fail_after(SCENARIO_TIMEOUT):
            with pytest.raises(perspective.PerspectiveError, match="upstream unavailable"):
                await write(edge, 2)
        valid.clear()
        valid.add("t2")
        headers.write_text("Authorization: Bearer t2\n")
        async with serve_in_background(main, port=port):
            await status_of(edge, 200)
            with anyio.fail_after(SCENARIO_TIMEOUT):
                await write(edge, 3)
                await write(edge, 4)
            assert upstream_ids() == [1, 3, 4]
            assert seen[-1] == ("t2", "e1")
    finally:
        if edge is not None:
            await in_thread(edge.stop)


def test_edge_options_from_the_environment() -> None:
    options = edge_options_from_env({
        "PERSPECTIVE_ASGI_UPSTREAM": "ws://10.0.0.5:8000/websocket",
        "PERSPECTIVE_ASGI_EDGE_TABLES": "b, a,,",
        "PERSPECTIVE_ASGI_READ_ONLY": "1",
    })
    assert options["upstream"] == "ws://10.0.0.5:8000/websocket"
    assert options["tables"] == ["b", "a"]
    assert options["settings"].read_only is True
    assert edge_options_from_env({"PERSPECTIVE_ASGI_UPSTREAM": "ws://h/ws"})["tables"] is None
    with pytest.raises(ValueError, match="PERSPECTIVE_ASGI_UPSTREAM"):
        edge_options_from_env({"PERSPECTIVE_ASGI_UPSTREAM": "http://h/"})
    with pytest.raises(ValueError, match="an edge serves its replica's tables only"):
        from perspective_asgi.app import create_app

        create_app(demo=True, replica=Replica("ws://h/ws"))
    app = create_edge_app("ws://127.0.0.1:9/websocket", tables=["t"])
    assert isinstance(app.state.replica, Replica)
    assert app.state.replica.tables == ["t"]
