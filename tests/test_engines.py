"""Other session factories through every adapter: AsyncServer and the virtual servers."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import perspective
import pytest
import websockets

from perspective_asgi import CloseCode, HandshakeRequest, Policy, Settings
from perspective_asgi._core.wire import read_envelope

from ._helpers import SCENARIO_TIMEOUT, WAIT, CountingFactory, closed_with, connect, reply
from ._servers import ADAPTERS, serve_in_background

pytestmark = pytest.mark.anyio

ROWS = {"id": [1, 2, 3, 4], "group": ["x", "y", "x", "y"], "value": [1.5, 2.5, 3.5, 4.5]}


def _duckdb() -> Any:
    duckdb = pytest.importorskip("duckdb")
    from perspective.virtual_servers.duckdb import DuckDBVirtualServer

    db = duckdb.connect(":memory:")
    db.execute("CREATE TABLE demo (id INTEGER, \"group\" VARCHAR, value DOUBLE)")
    db.executemany("INSERT INTO demo VALUES (?, ?, ?)", list(zip(*ROWS.values(), strict=True)))
    return DuckDBVirtualServer(db)


def _polars() -> Any:
    polars = pytest.importorskip("polars")
    from perspective.virtual_servers.polars import PolarsVirtualServer

    return PolarsVirtualServer({"demo": polars.DataFrame(ROWS)})


@pytest.fixture(params=["duckdb", "polars"])
def perspective_server(request: pytest.FixtureRequest) -> Any:
    return {"duckdb": _duckdb, "polars": _polars}[request.param]()


async def test_virtual_server(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(url) as conn:
            client = conn.client
            (name,) = await client.get_hosted_table_names()
            assert name.endswith("demo")  # DuckDB qualifies it with its catalog: memory.demo
            table = await client.open_table(name)
            assert await table.size() == 4
            view = await table.view(columns=["id", "value"], sort=[["value", "desc"]])
            assert await view.to_columns() == {"id": [4, 3, 2, 1], "value": [4.5, 3.5, 2.5, 1.5]}
            await view.delete()


async def test_async_server(adapter: str) -> None:
    counting = CountingFactory(perspective.AsyncServer())

    async with serve_in_background(ADAPTERS[adapter](counting, Settings())) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(url) as writer, connect(url) as reader:
                await writer.client.table(ROWS, name="made-remotely", index="id")
                table = await reader.client.open_table("made-remotely")
                view = await table.view(group_by=["group"], columns=["value"])
                assert await view.to_columns() == {
                    "__ROW_PATH__": [[], ["x"], ["y"]], "value": [12.0, 5.0, 7.0]
                }
        await counting.all_closed()


async def test_virtual_server_refuses_undecodable_request(
    url: str, factory: CountingFactory
) -> None:
    # Well-formed at the top level (get_hosted_tables_req), garbage inside: the engine would
    # answer with a ServerError, the virtual servers' Python layer raises instead.
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.send(b"\x08\x01\x22\x03\xff\xff\xff")
            assert await closed_with(ws, WAIT) == CloseCode.INVALID_PAYLOAD
        async with connect(url) as conn:
            assert len(await conn.client.get_hosted_table_names()) == 1


async def _by_token(request: HandshakeRequest) -> object:
    return request.query.get("token") or None


POLICIES = {"alice": Policy(tables={"visible", "later"}), "root": Policy()}


async def test_async_server_hides_tables_from_a_principal(adapter: str) -> None:
    counting = CountingFactory(perspective.AsyncServer())
    settings = Settings(authenticate=_by_token, policy=lambda user: POLICIES[str(user)])

    async with serve_in_background(ADAPTERS[adapter](counting, settings)) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with (
                connect(f"{url}?token=root") as root_conn,
                connect(f"{url}?token=alice") as alice_conn,
            ):
                root, alice = root_conn.client, alice_conn.client
                await root.table(ROWS, name="visible")
                notified = asyncio.Event()
                calls: list[int] = []

                def on_change(*_: Any) -> None:
                    calls.append(1)
                    notified.set()

                await alice.on_hosted_tables_update(on_change)
                assert await alice.get_hosted_table_names() == ["visible"]
                await root.table(ROWS, name="hidden")
                await root.table(ROWS, name="later")
                await asyncio.wait_for(notified.wait(), 10)
                assert sorted(await alice.get_hosted_table_names()) == ["later", "visible"]
                assert await root.get_hosted_table_names()
                assert calls == [1], "the hidden table must not notify"
                with pytest.raises(perspective.PerspectiveError):
                    await alice.open_table("hidden")
        await counting.all_closed()


async def test_virtual_server_hides_tables(adapter: str) -> None:
    polars = pytest.importorskip("polars")
    from perspective.virtual_servers.polars import PolarsVirtualServer

    server = PolarsVirtualServer({"demo": polars.DataFrame(ROWS), "secret": polars.DataFrame(ROWS)})
    settings = Settings(policy=Policy(tables={"demo"}))

    async with serve_in_background(ADAPTERS[adapter](CountingFactory(server), settings)) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(url) as conn:
                client = conn.client
                assert await client.get_hosted_table_names() == ["demo"]
                table = await client.open_table("demo")
                assert await table.size() == 4
                with pytest.raises(perspective.PerspectiveError):
                    await client.open_table("secret")
            async with websockets.connect(url) as ws:
                # table_size on the hidden table, by hand: refused before the backend sees it.
                await ws.send(b"\x08\x01\x12\x06secret\x42\x00")
                answer = read_envelope(await reply(ws))
                assert (answer.msg_id, answer.kind) == (1, 50)
