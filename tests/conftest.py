from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import perspective
import pytest

from perspective_asgi import Settings

from ._servers import ADAPTERS, serve_in_thread

DEMO_ROWS = {
    "id": [1, 2, 3, 4],
    "name": ["alpha", "beta", "gamma", "delta"],
    "group": ["x", "y", "x", "y"],
    "value": [1.5, 2.5, 3.5, 4.5],
}


class CountingSession:
    """Forwards to a Perspective session and tells its factory when it is closed."""

    def __init__(self, factory: CountingFactory, session: Any) -> None:
        self._factory = factory
        self._session = session
        self.handle_request = session.handle_request
        if hasattr(session, "close"):
            self.close = self._close

    def _close(self) -> Any:
        result = self._session.close()
        self._factory.closed_one()
        return result


class CountingFactory:
    """A session factory wrapping a real server that counts opened and closed sessions."""

    def __init__(self, server: Any) -> None:
        self.__wrapped__ = server
        self.opened = 0
        self.closed = 0
        self.without_close = 0
        self._changed = threading.Condition()

    def new_session(self, callback: Any) -> CountingSession:
        session = self.__wrapped__.new_session(callback)
        with self._changed:
            # Virtual servers' sessions have no close() before perspective-python 5.
            if hasattr(session, "close"):
                self.opened += 1
            else:
                self.without_close += 1
        return CountingSession(self, session)

    def closed_one(self) -> None:
        with self._changed:
            self.closed += 1
            if self.closed > self.opened:
                raise AssertionError("a session was closed twice")
            self._changed.notify_all()

    def wait_all_closed(self, timeout: float = 10.0) -> None:
        with self._changed:
            done = self._changed.wait_for(lambda: self.closed == self.opened, timeout)
            assert done, f"{self.opened} sessions opened but {self.closed} closed"
            assert self.closed == self.opened


@pytest.fixture
def perspective_server() -> perspective.Server:
    server = perspective.Server()
    client = server.new_local_client()
    client.table(DEMO_ROWS, name="demo", index="id")
    client.table({"a": [1, 2, 3]}, name="other")
    return server


@pytest.fixture
def factory(perspective_server: perspective.Server) -> CountingFactory:
    return CountingFactory(perspective_server)


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(adapter: str, factory: CountingFactory, settings: Settings) -> Iterator[str]:
    with serve_in_thread(ADAPTERS[adapter](factory, settings)) as ws_url:
        yield ws_url
        # Whatever the test did, every session it opened must be closed exactly once.
        factory.wait_all_closed()
