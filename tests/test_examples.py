"""Every example and the demo app, each run as its own process the way a user would start it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._helpers import (
    ROOT,
    SCENARIO_TIMEOUT,
    STOP_TIMEOUT,
    connect,
    free_port,
    in_thread,
    server_process,
    viewer_bundle_installed,
)

pytestmark = pytest.mark.anyio

EXAMPLES = ["asgi_uvicorn", "starlette_app", "fastapi_app", "tornado_app", "aiohttp_app"]
#: Examples that serve a database rather than ``sales``: the database's tests run them
#: (postgres_app: tests/test_postgres.py, against a real PostgreSQL).
DATABASE_EXAMPLES = ["postgres_app"]


# Examples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_serves_its_table(name: str, tmp_path: Path) -> None:
    async with server_process([sys.executable, f"examples/{name}.py"], tmp_path) as process:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(process.url) as conn:
                assert "sales" in await conn.client.get_hosted_table_names()
                table = await conn.client.open_table("sales")
                assert await table.size() == 4
        await in_thread(process.stop_cleanly, signal.SIGTERM)


def test_examples_readme_lists_every_example() -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    on_disk = sorted(path.stem for path in (ROOT / "examples").glob("*.py"))
    assert on_disk == sorted(EXAMPLES + DATABASE_EXAMPLES)
    for name in EXAMPLES + DATABASE_EXAMPLES:
        assert f"{name}.py" in readme


# The demo app ---------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
        return response.status, response.headers.get("content-type", ""), body


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo_app(signum: int, tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "perspective_asgi.app:app", "--port", str(port)]
    async with server_process(args, tmp_path, port=port) as process:
        base = f"http://127.0.0.1:{port}"
        status, content_type, body = await in_thread(http_get, f"{base}/healthz")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "ready": True}
        # Not an edge: always ready.
        assert (await in_thread(http_get, f"{base}/readyz"))[::2] == (200, '{"ready":true}')
        status, _, page = await in_thread(http_get, f"{base}/")
        assert status == 200
        if viewer_bundle_installed():
            assert "<perspective-viewer>" in page
            bundle = f"{base}/static/perspective/perspective-anywidget.js"
            status, content_type, _ = await in_thread(http_get, bundle)
            assert (status, content_type.split(";")[0]) == (200, "text/javascript")
        else:
            assert "viewer bundle is unavailable" in page

        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(process.url) as conn:
                client, ws = conn.client, conn.ws
                assert sorted(await client.get_hosted_table_names()) == ["orders", "prices"]
                orders = await client.open_table("orders")
                assert await orders.size() == 100_000
                assert set(await orders.columns()) == {
                    "order_date", "region", "category", "product", "quantity", "unit_price",
                    "total",
                }
                prices = await client.open_table("prices")
                assert await prices.size() == 50

                view = await prices.view()
                updated = asyncio.Event()
                await view.on_update(lambda *_: updated.set())
                before = await view.to_json()
                updated.clear()
                await asyncio.wait_for(updated.wait(), 10)
                after = await view.to_json()
                assert len(after) == 50
                assert after != before

                # Metrics count this connection and the requests it made so far.
                _, content_type, text = await in_thread(http_get, f"{base}/metrics")
                assert content_type.startswith("text/plain")
                scraped = {
                    (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                }
                assert scraped[("perspective_connections", ())] == 1
                sizes = ("perspective_request_seconds_count", (("kind", "table_size"),))
                assert scraped[sizes] == 2
                assert scraped[("perspective_messages_total", (("direction", "out"),))] > 8
                assert scraped[("perspective_message_bytes_total", (("direction", "in"),))] > 0

                # Stop the server with this client connected: it must close the websocket.
                process.popen.send_signal(signum)
                await asyncio.wait_for(ws.wait_closed(), STOP_TIMEOUT)
            assert ws.close_code in (1001, 1012)
        code = await in_thread(process.wait_exit, signum)
        process.assert_stopped_cleanly(code, signum)
        assert "Application shutdown complete" in process.stderr
        assert "price ticker" not in process.stderr  # neither a failed update nor a slow stop


async def get_in_process(app: Any, path: str) -> httpx.Response:
    # The ASGI transport runs no lifespan, which these demo-less apps do not need.
    transport = httpx.ASGITransport(app=app)
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.get(path)


async def test_page_loads_the_viewer_from_the_configured_asset_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from perspective_asgi.app import ASSET_URL_ENV, create_app

    monkeypatch.setenv(ASSET_URL_ENV, "https://assets.example/perspective/")
    app = create_app(demo=False)
    page = (await get_in_process(app, "/")).text
    assert 'data-bundle="https://assets.example/perspective/perspective-anywidget.js"' in page
    assert 'href="https://assets.example/perspective/perspective-anywidget.css"' in page
    bundle = await get_in_process(app, "/static/perspective/perspective-anywidget.js")
    assert bundle.status_code == 404


async def test_page_without_a_viewer_bundle_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from perspective_asgi import app as demo

    monkeypatch.delenv(demo.ASSET_URL_ENV, raising=False)
    monkeypatch.setattr(demo, "_bundle_directory", lambda: None)
    page = (await get_in_process(demo.create_app(demo=False), "/")).text
    assert "viewer bundle is unavailable" in page
    assert demo.ASSET_URL_ENV in page
    assert "<perspective-viewer>" not in page
