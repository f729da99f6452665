"""Every example and the demo app, each run as its own process the way its page shows it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import httpx
import perspective
import pytest
import websockets

from perspective_asgi import CloseCode
from perspective_asgi.testing import connect_asgi

from ._helpers import (
    ROOT,
    SCENARIO_TIMEOUT,
    STOP_TIMEOUT,
    WAIT,
    Connection,
    Samples,
    ServerProcess,
    closed_with,
    connect,
    environment,
    free_port,
    in_thread,
    load_example,
    metric_samples,
    refused_status,
    server_process,
    viewer_bundle_installed,
)

pytestmark = pytest.mark.anyio

EXAMPLES = ROOT / "examples"


class Command(NamedTuple):
    """One way to run an example, as its docs page shows it, with 8080 for the port."""

    line: str
    #: Where it runs, relative to the repository root.
    cwd: str = "."
    #: What a connected client gets when the server is sent SIGTERM; ``None`` where the test
    #: disconnects first: hypercorn waits its graceful timeout (3 s) for open websockets, then
    #: cancels them and logs a traceback of its own.
    close_code: int | None = None


#: uvicorn's shutdown closes every websocket with 1012 (service restart) before the lifespan
#: shutdown runs.
UVICORN_CLOSE = 1012

#: Every file in ``examples/`` but its README, with the commands that run it as its docs page
#: shows them, each run by a test here (8080 replaced by a free port, ``$PORT`` set to it).
#: ``tests/test_docs.py`` checks every file is shown in a page.
PROGRAMS: dict[str, tuple[Command, ...]] = {
    "asgi_app.py": (
        Command("uvicorn asgi_app:app --port 8080", cwd="examples", close_code=UVICORN_CLOSE),
        Command("hypercorn asgi_app:app --bind 127.0.0.1:8080", cwd="examples"),
    ),
    "starlette_app.py": (Command("python examples/starlette_app.py", close_code=UVICORN_CLOSE),),
    "fastapi_app.py": (
        Command("python examples/fastapi_app.py", close_code=UVICORN_CLOSE),
        Command("uvicorn examples.fastapi_app:app --port 8080", close_code=UVICORN_CLOSE),
    ),
    "test_fastapi_app.py": (Command("python -m pytest examples/test_fastapi_app.py"),),
    "tornado_app.py": (Command("python examples/tornado_app.py", close_code=CloseCode.GOING_AWAY),),
    "aiohttp_app.py": (Command("python examples/aiohttp_app.py", close_code=CloseCode.GOING_AWAY),),
    "authentication.py": (Command("python examples/authentication.py", close_code=UVICORN_CLOSE),),
    "metrics_app.py": (Command("python examples/metrics_app.py", close_code=UVICORN_CLOSE),),
    # Read by Prometheus and Grafana; checked against metrics_app.py below.
    "prometheus.yml": (),
    "grafana-dashboard.json": (),
    # Needs a PostgreSQL database: tests/test_postgres.py runs it, against a real one.
    "postgres_app.py": (),
}

#: The examples that serve only the four-row ``sales`` table, to anyone.
SALES_SERVERS = [
    command
    for name in ("asgi_app.py", "starlette_app.py", "tornado_app.py", "aiohttp_app.py")
    for command in PROGRAMS[name]
]

METRICS_PATH = "/metrics"
OUR_TORNADO_IMPORT = "from perspective_asgi.adapters.tornado import PerspectiveTornadoHandler\n"
PERSPECTIVE_TORNADO_IMPORT = "from perspective.handlers.tornado import PerspectiveTornadoHandler\n"
#: An interpreter starting pytest and three in-process tests: about 2 s.
TEST_FILE_TIMEOUT = 30.0


def argv(command: Command, port: int | None = None) -> list[str]:
    """The command's arguments, with ``port`` for 8080: ``python`` is this interpreter, and
    other programs (uvicorn, hypercorn) the scripts installed beside it, else its ``-m``."""
    line = command.line if port is None else command.line.replace("8080", str(port))
    program, *args = shlex.split(line)
    if program == "python":
        return [sys.executable, *args]
    script = Path(sys.executable).with_name(program)
    return [str(script), *args] if script.exists() else [sys.executable, "-m", program, *args]


@contextlib.asynccontextmanager
async def started(command: Command, logs: Path) -> AsyncIterator[ServerProcess]:
    """Run ``command`` until the block ends; yield it once it listens."""
    port = free_port()
    async with server_process(
        argv(command, port), logs, port=port, cwd=ROOT / command.cwd
    ) as process:
        yield process


async def stop(process: ServerProcess, conn: Connection, command: Command) -> None:
    """Send the server SIGTERM with ``conn`` open (or just closed, see ``Command``): it must
    close ``conn`` with the command's close code, then exit in time without a traceback."""
    if command.close_code is None:
        await conn.ws.close()
    process.popen.send_signal(signal.SIGTERM)
    if command.close_code is not None:
        with anyio.fail_after(STOP_TIMEOUT):
            await conn.ws.wait_closed()  # the connection's reader takes the close frame
        assert conn.ws.close_code == command.close_code
    process.assert_stopped_cleanly(await in_thread(process.wait_exit))


def bearer(token: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


def command_id(command: Command) -> str:
    return command.line


# Examples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", SALES_SERVERS, ids=command_id)
async def test_example_serves_sales(command: Command, tmp_path: Path) -> None:
    async with started(command, tmp_path) as process, connect(process.url) as conn:
        with anyio.fail_after(WAIT):
            assert list(await conn.client.get_hosted_table_names()) == ["sales"]
            assert await (await conn.client.open_table("sales")).size() == 4
        await stop(process, conn, command)


async def test_tornado_app_switches_from_perspectives_handler_by_its_import_line(
    tmp_path: Path,
) -> None:
    source = (EXAMPLES / "tornado_app.py").read_text()
    assert source.count(OUR_TORNADO_IMPORT) == 1
    copy = tmp_path / "tornado_app.py"
    copy.write_text(source.replace(OUR_TORNADO_IMPORT, PERSPECTIVE_TORNADO_IMPORT))
    # Perspective's handler leaves its websockets to die with the process: disconnect first.
    command = Command(f"python {copy}")
    async with started(command, tmp_path) as process, connect(process.url) as conn:
        with anyio.fail_after(WAIT):
            assert list(await conn.client.get_hosted_table_names()) == ["sales"]
            assert await (await conn.client.open_table("sales")).size() == 4
        await stop(process, conn, command)


@pytest.mark.parametrize("command", PROGRAMS["fastapi_app.py"], ids=command_id)
async def test_fastapi_app_authenticates_by_a_dependency_with_a_policy_per_user(
    command: Command, tmp_path: Path
) -> None:
    async with started(command, tmp_path) as process:
        url = process.url
        with anyio.fail_after(WAIT):
            # Refused by the dependency before the handshake: FastAPI answers 403.
            assert await refused_status(url) == 403
            assert await refused_status(f"{url}?token=wrong") == 403
            assert await refused_status(url, **bearer("wrong")) == 403
            async with connect(f"{url}?token=alice-token") as alice:
                sales = await alice.client.open_table("sales")
                await sales.update([{"region": "Central", "units": 60, "price": 10.0}])
                assert await sales.size() == 5
        async with connect(url, **bearer("bob-token")) as bob:
            with anyio.fail_after(WAIT):
                sales = await bob.client.open_table("sales")
                with pytest.raises(perspective.PerspectiveError, match="read-only"):
                    await sales.update([{"region": "North", "units": 0}])
                assert await sales.size() == 5  # still usable, and alice's row is there
            await stop(process, bob, command)


async def test_authentication_hook_and_a_policy_per_principal(tmp_path: Path) -> None:
    (command,) = PROGRAMS["authentication.py"]
    async with started(command, tmp_path) as process:
        url = process.url
        with anyio.fail_after(WAIT):
            assert await refused_status(url) == 401  # no token: the hook returned None
            assert await refused_status(url, **bearer("wrong")) == 403  # AuthenticationFailed
            assert await refused_status(f"{url}?token=wrong") == 403
            async with connect(url, **bearer("admin-token")) as admin:
                assert sorted(await admin.client.get_hosted_table_names()) == ["costs", "sales"]
                sales = await admin.client.open_table("sales")
                await sales.update([{"region": "Central", "units": 60, "price": 10.0}])
                assert await sales.size() == 5
        analyst = {"additional_headers": {"Cookie": "token=analyst-token"}}
        async with connect(url, **analyst) as conn:
            client = conn.client
            with anyio.fail_after(WAIT):
                assert list(await client.get_hosted_table_names()) == ["sales"]
                with pytest.raises(perspective.PerspectiveError):
                    await (await client.open_table("costs")).size()
                sales = await client.open_table("sales")
                with pytest.raises(perspective.PerspectiveError, match="read-only"):
                    await sales.update([{"region": "North", "units": 0}])
                with pytest.raises(perspective.PerspectiveError, match="expressions"):
                    await sales.view(expressions={"double": '"units" * 2'})
                assert await sales.size() == 5  # still usable, and the admin's row is there

                # max_connections_per_principal=8: this is the first, seven more are let in.
                async with contextlib.AsyncExitStack() as more:
                    for _ in range(7):
                        other = await more.enter_async_context(
                            connect(f"{url}?token=analyst-token")
                        )
                        await other.client.get_hosted_table_names()
                    async with websockets.connect(f"{url}?token=analyst-token") as ninth:
                        assert await closed_with(ninth) == CloseCode.TRY_AGAIN_LATER
                async with connect(url, **bearer("admin-token")) as admin:
                    await admin.client.get_hosted_table_names()  # others are not limited
            await stop(process, conn, command)


def scrape(port: int) -> Samples:
    """The metrics of the server on ``port``, by sample name and labels."""
    status, content_type, text = http_get(f"http://127.0.0.1:{port}{METRICS_PATH}")
    assert (status, content_type.split(";")[0]) == (200, "text/plain")
    return metric_samples(text)


async def test_metrics_app_counts_the_connection_and_its_requests(tmp_path: Path) -> None:
    (command,) = PROGRAMS["metrics_app.py"]
    async with started(command, tmp_path) as process, connect(process.url) as conn:
        with anyio.fail_after(WAIT):
            assert await (await conn.client.open_table("sales")).size() == 4
            scraped = await in_thread(scrape, process.port)
        assert scraped[("perspective_connections", ())] == 1
        assert scraped[("perspective_request_seconds_count", (("kind", "table_size"),))] == 1
        assert scraped[("perspective_messages_total", (("direction", "in"),))] >= 2
        assert scraped[("perspective_message_bytes_total", (("direction", "out"),))] > 0
        await stop(process, conn, command)


def test_prometheus_yml_scrapes_the_metrics_example() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads prometheus.yml (mkdocs brings it)")
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == METRICS_PATH
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
    # 8080 is where metrics_app.py listens unless $PORT says otherwise.
    assert 'os.environ.get("PORT", "8080")' in (EXAMPLES / "metrics_app.py").read_text()


async def test_grafana_dashboard_queries_only_metrics_the_observer_exports() -> None:
    metrics_app = load_example("metrics_app")
    with anyio.fail_after(WAIT):
        async with connect_asgi(metrics_app.app) as client:
            assert await (await client.open_table("sales")).size() == 4
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    exported: dict[str, set[str]] = {}
    for family in metrics_app.observer.registry.collect():
        exported[family.name] = {family.name + suffix for suffix in suffixes[family.type]}
        # That is how prometheus_client names the samples (less _created, of no use to a panel).
        seen = {sample.name for sample in family.samples} - {f"{family.name}_created"}
        assert seen <= exported[family.name], family.name
    names = set().union(*exported.values())

    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]
                if variable["type"] == "query"]
    used = {name for query in queries for name in re.findall(r"\bperspective_\w+", query)}
    assert all(re.search(r"\bperspective_\w+", query) for query in queries)
    assert used - names == set(), "the dashboard queries metrics the observer does not export"
    unshown = {family for family, samples in exported.items() if not samples & used}
    assert unshown == set(), "the dashboard shows none of these metrics"


def test_the_example_test_file_passes() -> None:
    (command,) = PROGRAMS["test_fastapi_app.py"]
    result = subprocess.run(
        argv(command),
        cwd=ROOT,
        env=environment(PYTEST_ADDOPTS="-p no:cacheprovider"),
        capture_output=True,
        text=True,
        timeout=TEST_FILE_TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Every test passed: none failed, was skipped or errored.
    assert re.search(r"=+ \d+ passed in [\d.]+s", output), output


def test_examples_readme_and_programs_list_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    on_disk = sorted(path.name for path in EXAMPLES.iterdir()
                     if path.is_file() and path.name != "README.md")
    assert on_disk == sorted(PROGRAMS)
    for name in PROGRAMS:
        assert f"[`{name}`]({name})" in readme, name


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
                scraped = metric_samples(text)
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
