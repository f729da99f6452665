"""``Settings.authenticate`` on every adapter: who is accepted, how refusals look on the wire."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import pytest
from fastapi import Depends, FastAPI, WebSocket, WebSocketException

from perspective_asgi import (
    AuthenticationFailed,
    HandshakeRequest,
    SessionBridge,
    SessionObserver,
    Settings,
)

from ._helpers import DEMO_ROWS, SCENARIO_TIMEOUT, CountingFactory, connect, refused_status
from ._servers import serve_in_background, uvicorn_main

pytestmark = pytest.mark.anyio

USERS = {"s3cret": "alice", "other": "bob"}


class AuthObserver(SessionObserver):
    """Records the principal of every accepted connection and the reason of every refusal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.principals: list[object] = []
        self.refusals: list[str] = []

    def connection_opened(self, bridge: SessionBridge) -> None:
        with self._lock:
            self.principals.append(bridge.principal)

    def connection_refused(self, reason: str) -> None:
        with self._lock:
            self.refusals.append(reason)


class TokenHook:
    """A bearer token from the Authorization header, the ``token`` query parameter or cookie."""

    def __init__(self) -> None:
        self.requests: list[HandshakeRequest] = []

    async def __call__(self, request: HandshakeRequest) -> object | None:
        self.requests.append(request)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        token = credentials if scheme.lower() == "bearer" else None
        token = token or request.query.get("token") or request.cookies.get("token")
        if token == "explode":
            raise RuntimeError("the user database is down")
        if token == "banned":
            raise AuthenticationFailed(403, "banned")
        return USERS.get(token or "")


@pytest.fixture
def settings() -> Settings:
    return Settings(authenticate=TokenHook(), observer=AuthObserver())


def observer_of(settings: Settings) -> AuthObserver:
    assert isinstance(settings.observer, AuthObserver)
    return settings.observer


async def still_serving_with_token(url: str) -> None:
    async with connect(f"{url}?token=s3cret") as conn:
        table = await conn.client.open_table("demo")
        assert await table.size() == len(DEMO_ROWS["id"])


async def test_bearer_header_is_accepted_and_the_principal_reaches_the_bridge(
    url: str, settings: Settings
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        headers = {"Authorization": "Bearer s3cret"}
        async with connect(url, additional_headers=headers) as conn:
            assert "demo" in await conn.client.get_hosted_table_names()

    assert observer_of(settings).principals == ["alice"]
    assert observer_of(settings).refusals == []
    hook = settings.authenticate
    assert isinstance(hook, TokenHook)
    assert [request.path for request in hook.requests] == ["/websocket"]
    client = hook.requests[0].client
    assert client is not None and client[0] == "127.0.0.1"


@pytest.mark.parametrize(
    ("options", "status"),
    [
        ({}, 401),
        ({"additional_headers": {"Authorization": "Bearer wrong"}}, 401),
        ({"additional_headers": {"Authorization": "Bearer banned"}}, 403),
    ],
    ids=["missing", "wrong", "forbidden"],
)
async def test_bad_or_missing_token_is_refused_before_accept(
    url: str, factory: CountingFactory, settings: Settings, options: dict[str, Any], status: int
) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        assert await refused_status(url, **options) == status
        assert factory.opened == 0
        await still_serving_with_token(url)

    assert observer_of(settings).refusals == ["auth"]
    assert observer_of(settings).principals == ["alice"]


async def test_query_token_is_accepted(url: str, settings: Settings) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(f"{url}?token=other&token=s3cret") as conn:
            assert "demo" in await conn.client.get_hosted_table_names()

    assert observer_of(settings).principals == ["bob"]


async def test_cookie_is_accepted(url: str, settings: Settings) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        headers = {"Cookie": 'theme=dark; token="other"'}
        async with connect(url, additional_headers=headers) as conn:
            assert "demo" in await conn.client.get_hosted_table_names()

    assert observer_of(settings).principals == ["bob"]


async def test_a_failing_hook_refuses_and_logs_one_error(
    url: str, factory: CountingFactory, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="perspective_asgi"), anyio.fail_after(
        SCENARIO_TIMEOUT
    ):
        assert await refused_status(url, additional_headers={"Cookie": "token=explode"}) == 500
        assert factory.opened == 0
        await still_serving_with_token(url)
    errors = [r for r in caplog.records if r.name == "perspective_asgi"]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], RuntimeError)
    assert observer_of(settings).refusals == ["auth"]


async def test_the_origin_check_runs_before_the_hook(url: str, settings: Settings) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        headers = {"Authorization": "Bearer s3cret"}
        status = await refused_status(url, origin="http://evil.example", additional_headers=headers)
        assert status == 403

    hook = settings.authenticate
    assert isinstance(hook, TokenHook) and hook.requests == []
    assert observer_of(settings).refusals == ["origin"]


# FastAPI's own dependencies ------------------------------------------------------------------


async def current_user(token: str = "") -> str:
    user = USERS.get(token)
    if user is None:
        raise WebSocketException(code=1008, reason="unknown token")
    return user


async def never_called(request: HandshakeRequest) -> object | None:
    raise AssertionError("settings.authenticate ran although the endpoint gave a principal")


async def test_fastapi_dependency_authenticates_and_passes_the_principal(
    factory: CountingFactory,
) -> None:
    from perspective_asgi.adapters.starlette import PerspectiveStarletteHandler

    observer = AuthObserver()
    settings = Settings(authenticate=never_called, observer=observer)
    app = FastAPI()

    @app.websocket("/websocket")
    async def endpoint(websocket: WebSocket, user: str = Depends(current_user)) -> None:
        handler = PerspectiveStarletteHandler(
            perspective_server=factory, websocket=websocket, settings=settings, principal=user
        )
        await handler.run()

    async with serve_in_background(uvicorn_main(app)) as url:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            assert await refused_status(f"{url}?token=wrong") == 403
            assert await refused_status(url) == 403
            assert factory.opened == 0
            await still_serving_with_token(url)
        await factory.all_closed()
    assert observer.principals == ["alice"]


# The request as the hook sees it -------------------------------------------------------------


def test_handshake_request_parses_headers_cookies_and_query() -> None:
    request = HandshakeRequest.build(
        "/websocket",
        [("Authorization", "Bearer x"), ("Cookie", "a=1; b=\"2\""), ("cookie", "a=3; c=4")],
        "token=t1&token=t2&empty=",
        ("127.0.0.1", 5000),
    )
    assert request.headers["AUTHORIZATION"] == "Bearer x"
    assert "authorization" in request.headers and "Authorization" in request.headers
    assert dict(request.cookies) == {"a": "1", "b": "2", "c": "4"}
    assert dict(request.query) == {"token": "t1", "empty": ""}
    assert request.client == ("127.0.0.1", 5000)


def test_misuse_fails_loudly() -> None:
    with pytest.raises(ValueError, match="401 or 403"):
        AuthenticationFailed(500, "no")
    with pytest.raises(ValueError, match="authenticate"):
        Settings(authenticate="token")  # type: ignore[arg-type]
