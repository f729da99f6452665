"""``perspective_asgi.testing``: a Perspective client on an ASGI app in-process, no sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Annotated, Any

import anyio
import perspective
import pytest
from fastapi import Depends, FastAPI, WebSocket, WebSocketException, status
from starlette.applications import Starlette

from perspective_asgi import HandshakeRequest, PerspectiveASGIApp, Settings
from perspective_asgi.adapters.starlette import (
    PerspectiveStarletteHandler,
    PerspectiveWebSocketRoute,
)
from perspective_asgi.testing import ConnectError, InProcessApp, connect_asgi

from ._helpers import SCENARIO_TIMEOUT, load_example

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # perspective_asgi.testing runs on asyncio


# examples/fastapi_app.py (its own tests, examples/test_fastapi_app.py, run in test_examples).
fastapi_example = load_example("fastapi_app")


def demo_server() -> perspective.Server:
    server = perspective.Server()
    server.new_local_client().table({"id": [1, 2, 3], "x": [0.5, 1.5, 2.5]}, name="demo",
                                    index="id")
    return server


async def test_fastapi_dependency_override_replaces_authentication() -> None:
    app = fastapi_example.app
    app.dependency_overrides[fastapi_example.current_user] = lambda: fastapi_example.User("carol")
    try:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect_asgi(app) as client:  # no token
                assert list(await client.get_hosted_table_names()) == ["sales"]
    finally:
        app.dependency_overrides.clear()


async def require_token(request: HandshakeRequest) -> str | None:
    return "alice" if request.query.get("token") == "good" else None


def raw_asgi(settings: Settings) -> Any:
    return PerspectiveASGIApp(demo_server(), settings=settings)


def starlette_route(settings: Settings) -> Any:
    return Starlette(routes=[PerspectiveWebSocketRoute("/websocket", demo_server(),
                                                       settings=settings)])


def fastapi_endpoint(settings: Settings) -> Any:
    app = FastAPI()
    server = demo_server()

    @app.websocket("/websocket")
    async def endpoint(websocket: WebSocket) -> None:
        handler = PerspectiveStarletteHandler(
            perspective_server=server, websocket=websocket, settings=settings
        )
        await handler.run()

    return app


APPS = pytest.mark.parametrize("make_app", [raw_asgi, starlette_route, fastapi_endpoint])


@APPS
async def test_round_trip_and_update(make_app: Any) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect_asgi(make_app(Settings())) as client:
            table = await client.open_table("demo")
            view = await table.view()
            updated = asyncio.Event()
            await view.on_update(lambda *_: updated.set())
            await table.update([{"id": 4, "x": 3.5}])
            await asyncio.wait_for(updated.wait(), 10)
            assert (await view.to_columns())["x"] == [0.5, 1.5, 2.5, 3.5]


@APPS
async def test_authenticate_refusal_raises_401(make_app: Any) -> None:
    app = make_app(Settings(authenticate=require_token))

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with InProcessApp(app) as server:
            with pytest.raises(ConnectError) as caught:
                async with server.connect("/websocket?token=bad"):
                    raise AssertionError("accepted a bad token")
            assert caught.value.status == 401
            assert "authentication required" in str(caught.value)
            async with server.connect("/websocket?token=good") as client:
                assert await (await client.open_table("demo")).size() == 3


@APPS
async def test_cross_origin_refusal_raises_403(make_app: Any) -> None:
    app = make_app(Settings())

    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(ConnectError) as caught:
        async with connect_asgi(app, headers={"Origin": "https://evil.example.com"}):
            raise AssertionError("accepted a cross-origin handshake")
    assert caught.value.status == 403


async def test_fastapi_dependency_refusal_raises_403() -> None:
    app = FastAPI()

    def no_entry() -> None:
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION)

    @app.websocket("/websocket")
    async def endpoint(websocket: WebSocket, _: Annotated[None, Depends(no_entry)]) -> None:
        raise AssertionError("the dependency should have refused")

    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(ConnectError) as caught:
        async with connect_asgi(app):
            raise AssertionError("accepted despite the dependency")
    assert caught.value.status == 403


async def test_lifespan_runs_around_the_connections() -> None:
    events: list[str] = []
    server = demo_server()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/websocket")
    async def endpoint(websocket: WebSocket) -> None:
        events.append("connection")
        await PerspectiveStarletteHandler(perspective_server=server, websocket=websocket).run()

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with InProcessApp(app) as in_process:
            assert events == ["startup"]
            async with in_process.connect() as client:
                assert await (await client.open_table("demo")).size() == 3
            assert events == ["startup", "connection"]
        assert events == ["startup", "connection", "shutdown"]


async def test_calls_after_the_connection_ends_fail_promptly() -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect_asgi(raw_asgi(Settings())) as client:
            table = await client.open_table("demo")
        with pytest.raises(perspective.PerspectiveError, match="connection closed with code 1000"):
            await asyncio.wait_for(table.size(), 5)


async def test_server_side_close_fails_pending_calls() -> None:
    app = FastAPI()

    @app.websocket("/websocket")
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_bytes()  # the client's request is in flight from now on
        await websocket.close(code=1011, reason="going down")

    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect_asgi(app) as client:
            with pytest.raises(perspective.PerspectiveError, match="code 1011"):
                await asyncio.wait_for(client.get_hosted_table_names(), 5)


async def test_app_errors_while_serving_are_reraised() -> None:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            raise RuntimeError("no lifespan here")  # the spec: lifespan is then skipped
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        raise ValueError("boom")

    with anyio.fail_after(SCENARIO_TIMEOUT), pytest.raises(ValueError, match="boom"):
        async with connect_asgi(app) as client:
            with pytest.raises(perspective.PerspectiveError, match="connection closed"):
                await asyncio.wait_for(client.get_hosted_table_names(), 5)
