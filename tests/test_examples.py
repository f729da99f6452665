"""Every example and the demo app, each run as its own process the way a user would start it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._client import perspective_client

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["asgi_uvicorn", "starlette_app", "fastapi_app", "tornado_app", "aiohttp_app"]
#: Seconds a server may take to exit once signalled.
STOP_TIMEOUT = 10.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A server started as a subprocess, with its output kept in files for the assertions."""

    def __init__(self, args: list[str], port: int, logs: Path) -> None:
        self.port = port
        self.stdout_path = logs / "stdout.txt"
        self.stderr_path = logs / "stderr.txt"
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PORT": str(port), "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Return once the port accepts connections; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on {self.port} after {timeout} s:\n{self.stderr}")
            # Waiting on the process doubles as the pause between attempts.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.popen.wait(0.05)
                pytest.fail(f"server exited with {code} before listening:\n{self.stderr}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the process and return its exit code, failing unless it exits in time."""
        self.popen.send_signal(signum)
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT} s after {signal.Signals(signum).name}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@contextlib.contextmanager
def serving(args: list[str], tmp_path: Path, port: int | None = None) -> Iterator[Process]:
    """Start a server with ``$PORT`` set to a free port (or ``port``), once it is listening."""
    process = Process(args, port or free_port(), tmp_path)
    try:
        process.wait_listening()
        yield process
    finally:
        process.kill()


def assert_stopped_cleanly(process: Process, code: int, signum: int) -> None:
    # uvicorn re-raises the signal it handled once it has shut down, so it exits "killed by
    # SIGTERM" after a graceful shutdown; a traceback is what tells a crash apart.
    assert code in (0, -signum), f"exit code {code}:\n{process.stderr}"
    assert "Traceback" not in process.stderr, process.stderr


# Examples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_serves_its_table(name: str, tmp_path: Path) -> None:
    with serving([sys.executable, f"examples/{name}.py"], tmp_path) as process:

        async def check() -> None:
            url = f"ws://127.0.0.1:{process.port}/websocket"
            async with perspective_client(url) as (client, _):
                assert "sales" in await client.get_hosted_table_names()
                table = await client.open_table("sales")
                assert await table.size() == 4

        run(check())
        code = process.stop(signal.SIGTERM)
        assert_stopped_cleanly(process, code, signal.SIGTERM)


def test_examples_readme_lists_every_example() -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    on_disk = sorted(path.stem for path in (ROOT / "examples").glob("*.py"))
    assert on_disk == sorted(EXAMPLES)
    for name in EXAMPLES:
        assert f"{name}.py" in readme


# The demo app ---------------------------------------------------------------------------------


def viewer_bundle_installed() -> bool:
    bundle = importlib.resources.files("perspective") / "widget" / "static"
    return (bundle / "perspective-anywidget.js").is_file()


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
        return response.status, response.headers.get("content-type", ""), body


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_app(signum: int, tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "perspective_asgi.app:app", "--port", str(port)]
    with serving(args, tmp_path, port) as process:
        base = f"http://127.0.0.1:{port}"
        status, content_type, body = http_get(f"{base}/healthz")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "ready": True}
        # Not an edge: always ready.
        assert http_get(f"{base}/readyz")[::2] == (200, '{"ready":true}')
        status, _, page = http_get(f"{base}/")
        assert status == 200
        if viewer_bundle_installed():
            assert "<perspective-viewer>" in page
            bundle = f"{base}/static/perspective/perspective-anywidget.js"
            status, content_type, _ = http_get(bundle)
            assert (status, content_type.split(";")[0]) == (200, "text/javascript")
        else:
            assert "viewer bundle is unavailable" in page

        async def check() -> int | None:
            async with perspective_client(f"ws://127.0.0.1:{port}/websocket") as (client, ws):
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
                _, content_type, text = await asyncio.to_thread(http_get, f"{base}/metrics")
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
                return ws.close_code

        assert run(check()) in (1001, 1012)
        try:
            code = process.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT} s after {signal.Signals(signum).name}")
        assert_stopped_cleanly(process, code, signum)
        assert "Application shutdown complete" in process.stderr
        assert "price ticker" not in process.stderr  # neither a failed update nor a slow stop


async def get_in_process(app: Any, path: str) -> httpx.Response:
    # The ASGI transport runs no lifespan, which these demo-less apps do not need.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path)


def test_page_loads_the_viewer_from_the_configured_asset_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from perspective_asgi.app import ASSET_URL_ENV, create_app

    monkeypatch.setenv(ASSET_URL_ENV, "https://assets.example/perspective/")
    app = create_app(demo=False)
    page = run(get_in_process(app, "/")).text
    assert 'data-bundle="https://assets.example/perspective/perspective-anywidget.js"' in page
    assert 'href="https://assets.example/perspective/perspective-anywidget.css"' in page
    bundle = run(get_in_process(app, "/static/perspective/perspective-anywidget.js"))
    assert bundle.status_code == 404


def test_page_without_a_viewer_bundle_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from perspective_asgi import app as demo

    monkeypatch.delenv(demo.ASSET_URL_ENV, raising=False)
    monkeypatch.setattr(demo, "_bundle_directory", lambda: None)
    page = run(get_in_process(demo.create_app(demo=False), "/")).text
    assert "viewer bundle is unavailable" in page
    assert demo.ASSET_URL_ENV in page
    assert "<perspective-viewer>" not in page
