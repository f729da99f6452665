"""Per-principal policies over every adapter: a table allow-list, expressions, violations.

Principals come from the ``authenticate`` hook (a ``token`` query parameter, as a browser would
send it); the policy is a function of the principal. The hostile clients are the stock
``AsyncClient`` and hand-built frames.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import perspective
import pytest
import websockets

from perspective_asgi import AuthenticationFailed, HandshakeRequest, Policy, Settings
from perspective_asgi._core.wire import (
    MAKE_JOIN_TABLE,
    TABLE_REQUEST_KINDS,
    VIEW_REQUEST_KINDS,
    read_envelope,
)

from ._frames import length_delimited
from ._helpers import (
    DEMO_ROWS,
    SCENARIO_TIMEOUT,
    WAIT,
    CountingFactory,
    connect,
    make_view_frame,
    reply,
    request,
    server_error,
    still_serving,
)

pytestmark = pytest.mark.anyio

#: alice sees "demo" and "later" (which does not exist yet); root sees everything.
POLICIES = {
    "alice": Policy(tables={"demo", "later"}),
    "root": Policy(),
    "viewer": Policy(tables={"demo"}, read_only=True, allow_expressions=False),
}


async def authenticate(request: HandshakeRequest) -> object:
    token = request.query.get("token", "")
    if token not in POLICIES:
        raise AuthenticationFailed(403, "unknown token")
    return token


def policy_for(principal: object) -> Policy:
    return POLICIES[str(principal)]


@pytest.fixture
def settings() -> Settings:
    return Settings(authenticate=authenticate, policy=policy_for, max_violations=1000)


def as_user(url: str, user: str) -> str:
    return f"{url}?token={user}"


def from_view_frame(name: str, view_id: str, msg_id: int = 9) -> bytes:
    """A ``make_table`` request copying the view ``view_id`` (``MakeTableData.from_view``)."""
    return request(msg_id, name, 27, length_delimited(1, length_delimited(6, view_id.encode())))


async def test_hidden_tables_are_not_listed_opened_or_used(
    url: str, factory: CountingFactory
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(as_user(url, "alice")) as conn:
            client = conn.client
            assert await client.get_hosted_table_names() == ["demo"]
            with pytest.raises(perspective.PerspectiveError):
                await client.open_table("other")
            demo = await client.open_table("demo")
            # Not read-only: alice may change her table, and create one on her list.
            await demo.update([{"id": 5, "name": "eps", "group": "x", "value": 5.5}])
            assert await demo.size() == 5
            with pytest.raises(perspective.PerspectiveError, match="not permitted"):
                await client.table({"x": [1]}, name="mine")
            later = await client.table({"x": [1, 2]}, name="later")
            assert sorted(await client.get_hosted_table_names()) == ["demo", "later"]
            await later.delete()

        # Hand-built frames for every request kind that names a table.
        async with websockets.connect(as_user(url, "alice")) as hostile:
            for msg_id, kind in enumerate(sorted(TABLE_REQUEST_KINDS), start=1):
                await hostile.send(request(msg_id, "other", kind))
                got = server_error(await reply(hostile))
                # Indistinguishable from a table that does not exist.
                assert got[:3] == (msg_id, "other", "Couldn't find key."), kind
            join = length_delimited(1, b"demo") + length_delimited(2, b"other")
            join += length_delimited(3, b"id")
            await hostile.send(request(90, "joined", MAKE_JOIN_TABLE, join))
            assert server_error(await reply(hostile))[0] == 90
            await hostile.send(request(91, "other", 10_000))  # a kind from a future version
            assert server_error(await reply(hostile))[0] == 91
            await hostile.send(request(92, "demo", 8))  # demo is allowed: a real answer
            answer = read_envelope(await reply(hostile))
            assert (answer.msg_id, answer.kind) == (92, 8)

        # root sees everything, and "other" is untouched.
        async with connect(as_user(url, "root")) as conn:
            client = conn.client
            assert sorted(await client.get_hosted_table_names()) == ["demo", "other"]
            assert await (await client.open_table("other")).size() == 3

    await factory.all_closed()


async def test_hosted_table_notifications_reveal_only_permitted_tables(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with (
            connect(as_user(url, "alice")) as alice_conn,
            connect(as_user(url, "root")) as root_conn,
        ):
            alice, root = alice_conn.client, root_conn.client
            changes: list[int] = []
            changed = asyncio.Event()

            def on_change(*_: Any) -> None:
                changes.append(1)
                changed.set()

            await alice.on_hosted_tables_update(on_change)
            # The subscription resolves when sent: one round trip before root acts.
            assert await alice.get_hosted_table_names() == ["demo"]

            secret = await root.table({"s": [1]}, name="secret")
            await root.table({"s": [2]}, name="secret2")
            await secret.delete()
            assert await root.get_hosted_table_names()  # root's changes are done
            later = await root.table({"x": [1]}, name="later")
            await asyncio.wait_for(changed.wait(), WAIT)
            # Round trips on both connections: anything still in flight has arrived.
            assert await (await alice.open_table("later")).size() == 1
            assert await root.get_hosted_table_names()
            assert sorted(await alice.get_hosted_table_names()) == ["demo", "later"]
            assert len(changes) == 1, "hidden tables must not cause notifications"

            changed.clear()
            await later.delete()
            await asyncio.wait_for(changed.wait(), WAIT)
            assert await alice.get_hosted_table_names() == ["demo"]
            assert len(changes) == 2
            await (await root.open_table("secret2")).delete()


async def test_guessed_and_reused_view_ids_reach_nothing(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(as_user(url, "root")) as owner:
            # root's view on the hidden table, under an id alice could guess.
            await owner.send(make_view_frame("other", "view-1", msg_id=1))
            assert read_envelope(await reply(owner)).kind == 6

            async with websockets.connect(as_user(url, "alice")) as alice:
                for msg_id, kind in enumerate(sorted(VIEW_REQUEST_KINDS), start=1):
                    await alice.send(request(msg_id, "view-1", kind))
                    _, entity, message, status = server_error(await reply(alice))
                    assert (entity, status) == ("view-1", 1), kind
                    assert "not a view of this connection" in message
                # Copying the view into a table alice may create is refused too.
                await alice.send(from_view_frame("later", "view-1"))
                assert "not a view of this connection" in server_error(await reply(alice))[2]
                # Claiming the same id for a view on her own table does not share it.
                await alice.send(make_view_frame("demo", "view-1", msg_id=20))
                assert "already in use" in server_error(await reply(alice))[2]
                # A view of hers on an allowed table works, by its own id.
                await alice.send(make_view_frame("demo", "view-2", msg_id=21))
                assert read_envelope(await reply(alice)).kind == 6
                await alice.send(request(22, "view-2", 12))
                assert read_envelope(await reply(alice)).kind == 12
            # root's view is intact.
            await owner.send(request(2, "view-1", 12))
            assert read_envelope(await reply(owner)).kind == 12
        await still_serving(url + "?token=root")


async def test_a_table_cannot_copy_another_connections_view(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(as_user(url, "root")) as owner:
            await owner.send(make_view_frame("other", "theirs", msg_id=1))
            assert read_envelope(await reply(owner)).kind == 6
            async with websockets.connect(as_user(url, "root")) as thief:
                await thief.send(from_view_frame("copy", "theirs"))
                _, _, message, status = server_error(await reply(thief))
                assert status == 1 and "not a view of this connection" in message
                # Its own view may be copied (Perspective's replication).
                await thief.send(make_view_frame("demo", "mine", msg_id=2))
                assert read_envelope(await reply(thief)).kind == 6
                await thief.send(from_view_frame("copy", "mine", msg_id=3))
                assert read_envelope(await reply(thief)).kind == 27
                await thief.send(request(4, "copy", 8))
                size_reply = read_envelope(await reply(thief))
                assert size_reply.kind == 8
                await thief.send(request(5, "copy", 28))  # table_delete
                assert read_envelope(await reply(thief)).kind == 28
                await thief.send(request(6, "mine", 11))  # view_delete
                assert read_envelope(await reply(thief)).kind == 11


async def test_read_only_viewer_without_expressions(url: str, perspective_server: Any) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(as_user(url, "viewer")) as conn:
            table = await conn.client.open_table("demo")
            with pytest.raises(perspective.PerspectiveError, match="expressions are not allowed"):
                await table.view(expressions={"double": '"value" * 2'})
            with pytest.raises(perspective.PerspectiveError, match="expressions are not allowed"):
                await table.validate_expressions({"double": '"value" * 2'})
            with pytest.raises(perspective.PerspectiveError, match="read-only"):
                await table.update([{"id": 1, "value": 0.0}])
            view = await table.view(group_by=["group"], columns=["value"])
            assert (await view.to_columns())["value"] == [12.0, 5.0, 7.0]
            await view.delete()

    view = perspective_server.new_local_client().open_table("demo").view()
    assert view.to_columns()["value"] == DEMO_ROWS["value"]
    view.delete()


@pytest.mark.parametrize(
    "settings",
    [Settings(read_only=True, max_violations=3)],
    ids=["max_violations=3"],
)
async def test_repeated_violations_close_with_1008(url: str) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with websockets.connect(url) as ws:
            for msg_id in range(1, 4):
                await ws.send(request(msg_id, "demo", 28))  # table_delete: read-only refuses
                assert server_error(await reply(ws))[0] == msg_id
            # A refusal does not count against requests that are allowed.
            await ws.send(request(10, "demo", 8))
            assert read_envelope(await reply(ws)).kind == 8
            await ws.send(request(4, "demo", 28))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
            assert ws.close_code == 1008
            assert "too many refused requests (4)" in (ws.close_reason or "")
        await still_serving(url)


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="not a string"):
        Policy(tables="demo")
    assert Policy(tables=["a", "a"]).tables == frozenset({"a"})
    with pytest.raises(ValueError, match="policy must be"):
        Settings(policy="read-only")  # type: ignore[arg-type]

