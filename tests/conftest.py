"""Fixtures only: the demo server, the counting factory, settings, and the adapter-parametrized
live server. Shared helpers live in ``_helpers``."""

from __future__ import annotations

from collections.abc import Iterator

import perspective
import pytest

from perspective_asgi import Settings

from ._helpers import DEMO_ROWS, CountingFactory, MemoryTransport, NewTransport
from ._servers import ADAPTERS, serve_in_thread


@pytest.fixture
def anyio_backend() -> str:
    # The live servers and the stock client run on asyncio; the in-process core tests
    # (test_session.py) choose their own backends.
    return "asyncio"


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


@pytest.fixture
def new_transport() -> Iterator[NewTransport]:
    """Make ``MemoryTransport``s inside the test's event loop; dispose of them after it."""
    made: list[MemoryTransport] = []

    def make() -> MemoryTransport:
        made.append(MemoryTransport())
        return made[-1]

    yield make
    for transport in made:
        transport.dispose()
