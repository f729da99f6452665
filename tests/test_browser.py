"""The demo dashboard in a real browser: Debian's chromium, driven by tests/browser/dashboard.mjs.

The app runs under uvicorn in its own process, as a user starts it; what the grid shows is
compared with what the server holds, read with the stock Python client, and the chart panel
is read from a screenshot of it (the chart plugin draws with WebGL, which headless chromium
runs in software).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import perspective
import pytest

from ._helpers import (
    ROOT,
    SCENARIO_TIMEOUT,
    ServerProcess,
    StdoutLines,
    command,
    connect,
    free_port,
    in_thread,
    server_process,
    viewer_bundle_installed,
)

BROWSER_DIR = Path(__file__).parent / "browser"
SCRIPT = BROWSER_DIR / "dashboard.mjs"
#: Three pages of the dashboard on one server.
SHARED_SCRIPT = BROWSER_DIR / "shared.mjs"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
#: Set to 1 to refresh the screenshot the README shows, docs/dashboard.png.
UPDATE_SCREENSHOT_ENV = "PERSPECTIVE_ASGI_UPDATE_SCREENSHOT"
#: Bounds each of the script's waits and its whole run, both well inside pytest's timeout.
STEP_TIMEOUT_MS = 20_000
SCRIPT_DEADLINE_MS = 75_000
#: How long to wait for the script's report beyond its own deadline (browser start and exit).
REPORT_GRACE = 15.0

PRICES_COLUMNS = ["symbol", "price", "change", "change_pct", "bid", "ask", "volume", "updated"]
ORDERS_COLUMNS = [
    "order_date", "region", "category", "product", "quantity", "unit_price", "total"
]
#: Sorted on every shown column, so rows that tie on the sort keys look the same anyway.
ORDERS_SORTED = {
    "table": "orders",
    "title": "orders",
    "columns": ["order_date", "region", "product", "quantity", "unit_price", "total"],
    "sort": [
        ["total", "desc"], ["order_date", "asc"], ["region", "asc"], ["product", "asc"],
        ["quantity", "asc"], ["unit_price", "asc"],
    ],
}
#: The chart panel as the page opens: the orders' total by region, a bar per category.
ORDERS_CHART = {
    "table": "orders",
    "title": "orders: total by region and category",
    "plugin": "Y Bar",
    "columns": ["total"],
    "group_by": ["region"],
    "split_by": ["category"],
    "aggregates": {"total": "sum"},
}
#: Another chart of "orders", to restore into the chart panel: a bar per category, a colour
#: per region.
ORDERS_BY_CATEGORY_CHART = {
    **ORDERS_CHART,
    "title": "orders by category",
    "group_by": ["category"],
    "split_by": ["region"],
}
CATEGORIES = 3
REGIONS = 5
#: The chart plugin the page uses for "Y Bar", from perspective-python 5.x's bundle.
BAR_CHART = "perspective-viewer-charts-y-bar"
#: A hue covering this share of the chart panel's pixels is a series drawn. "Office Supplies"
#: is a sliver on each bar (about 0.25%); antialiased edges leave at most 0.03% in a hue.
SERIES_SHARE = 0.001
#: Bars cover at least this share of the chart panel (about 10% with 15 bars, 20% with 5).
BARS_SHARE = 0.05
ORDERS_BY_REGION = {
    "table": "orders",
    "title": "orders by region",
    "group_by": ["region"],
    "columns": ["quantity", "total"],
    "sort": [["total", "desc"]],
}

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not viewer_bundle_installed(),
        reason=f"perspective-python {perspective.__version__} ships no viewer bundle to run "
        "offline (perspective/widget/static arrived in 5.x)",
    ),
]


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    installed = (BROWSER_DIR / "node_modules" / "playwright-core").is_dir()
    if path is None or not installed or not CHROMIUM.is_file():
        if os.environ.get("PERSPECTIVE_ASGI_SKIP_BROWSER") == "1":
            pytest.skip("node, playwright-core or chromium is not installed")
        pytest.fail(
            "needs node, chromium (apt-get install chromium) and tests/browser/install.sh "
            "(or set PERSPECTIVE_ASGI_SKIP_BROWSER=1)"
        )
    return path


class Browser:
    """A browser script as a subprocess whose stdout JSON lines are read as they come.

    The methods block (they wait on the script): async tests call them through ``in_thread``.
    """

    def __init__(
        self, node: str, url: str, logs: Path, *options: str, script: Path = SCRIPT
    ) -> None:
        self.stderr_path = logs / "browser-stderr.txt"
        args = [
            node, str(script), "--timeout", str(STEP_TIMEOUT_MS),
            "--deadline", str(SCRIPT_DEADLINE_MS), *options, url,
        ]
        with open(self.stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(
                args, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.deadline = time.monotonic() + SCRIPT_DEADLINE_MS / 1000 + REPORT_GRACE
        self._stdout = StdoutLines(self.popen)

    def next_message(self) -> dict[str, Any]:
        """Return the script's next JSON line; fail if it exits or runs out of time first."""
        try:
            line = self._stdout.next(self.deadline)
        except queue.Empty:
            pytest.fail(f"no word from the browser script in time:\n{self.stderr}")
        if line is None:
            code = self.popen.wait()
            pytest.fail(f"the browser script exited with {code} without a report:\n{self.stderr}")
        message: dict[str, Any] = json.loads(line)
        return message

    def report(self) -> dict[str, Any]:
        """Return the script's results, failing with its error if it did not finish."""
        result = self.next_message()
        code = self.popen.wait(REPORT_GRACE)
        assert result.get("ok") is True and code == 0, (
            f"browser script failed at {result.get('stage')!r} (exit {code}): "
            f"{result.get('error')}\n{json.dumps(result, indent=1)[:4000]}\n{self.stderr}"
        )
        return result

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """End the script and its browser, which playwright closes on SIGTERM."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(REPORT_GRACE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        # Its stdout closes once the reader has seen the end of it.
        self._stdout.join(REPORT_GRACE)


@contextlib.asynccontextmanager
async def browsing(
    node: str, url: str, logs: Path, *options: str, script: Path = SCRIPT
) -> AsyncIterator[Browser]:
    """Run a browser script on ``url``; end it and its browser afterwards, whatever happened."""
    browser = Browser(node, url, logs, *options, script=script)
    try:
        yield browser
    finally:
        # Shielded: a test that timed out must still not leave a browser running.
        with anyio.CancelScope(shield=True):
            await in_thread(browser.stop)


def uvicorn_args(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "perspective_asgi.app:app", "--port", str(port)]


def displayed(value: Any, kind: str) -> str:
    """Return the text the datagrid shows for ``value`` of Perspective type ``kind`` (en-US)."""
    if kind == "date":
        day = datetime.datetime.fromtimestamp(value / 1000, datetime.timezone.utc)
        return f"{day.month}/{day.day}/{day:%y}"
    if kind == "float":
        return f"{value:,.2f}"
    if kind == "integer":
        return f"{value:,}"
    return str(value)


async def server_rows(port: int, table_name: str, rows: int, **config: Any) -> list[list[str]]:
    """Return the first ``rows`` rows of a view on the server, as the datagrid would show them.

    Grouped rows start with the last element of their row path, or ``TOTAL`` for the root.
    """
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(f"ws://127.0.0.1:{port}/websocket") as conn:
            table = await conn.client.open_table(table_name)
            schema = await table.schema()
            columns = config.get("columns") or await table.columns()
            view = await table.view(**config)
            try:
                data = await view.to_columns(start_row=0, end_row=rows)
            finally:
                await view.delete()
    shown = [[displayed(value, schema[name]) for value in data[name]] for name in columns]
    body = [list(row) for row in zip(*shown, strict=True)]
    if "__ROW_PATH__" in data:
        labels = [str(path[-1]) if path else "TOTAL" for path in data["__ROW_PATH__"]]
        body = [[label, *row] for label, row in zip(labels, body, strict=True)]
    return body


def row_cells(grid: dict[str, Any], width: int) -> list[list[str]]:
    """Return each grid row's last ``width`` cells: a grouped row leads with tree cells."""
    return [row[-width:] for row in grid["rows"]]


def assert_chart(chart: dict[str, Any], config: dict[str, Any], series: int) -> None:
    """Assert the chart panel shows ``config`` (part of its configuration), drawn by the bar
    chart with ``series`` colours."""
    assert {key: chart["config"][key] for key in config} == config
    assert chart["plugin"] == BAR_CHART
    assert any(node["tag"] == "canvas" and node["width"] > 0 and node["height"] > 0
               for node in chart["canvases"]), chart["canvases"]
    drawn = chart["drawn"]
    assert drawn["colored"] >= BARS_SHARE, drawn
    hues = [hue for hue, share in drawn["hues"].items() if share >= SERIES_SHARE]
    assert len(hues) == series, drawn


def assert_no_errors(result: dict[str, Any]) -> None:
    errors = result["errors"]
    assert errors == {"page": [], "console": [], "requests": []}, json.dumps(errors, indent=1)


def sample(metrics: str, name: str, default: float | None = None) -> float:
    """Return the value of the sample ``name`` (labels included) in Prometheus text."""
    for line in metrics.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    assert default is not None, f"no {name} in /metrics"
    return default


def sharing_gauges(metrics: str) -> tuple[float, float, float]:
    """Return the engine views serving aliases, the aliases, and the engine views saved."""
    names = ("shared_views", "view_aliases", "engine_views_saved")
    views, aliases, saved = (sample(metrics, f"perspective_{name}") for name in names)
    return views, aliases, saved


def requests_of(metrics: str, kind: str) -> float:
    """Return how many requests of ``kind`` the server has answered."""
    return sample(metrics, f'perspective_request_seconds_count{{kind="{kind}"}}', 0.0)


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("read_only", [False, True], ids=["editable", "read-only"])
async def test_dashboard_shows_the_servers_data(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_only: bool
) -> None:
    # Read-only refuses every request that changes a table: the viewer must not need one.
    monkeypatch.setenv("PERSPECTIVE_ASGI_READ_ONLY", "1" if read_only else "0")
    # Charting another way and resetting the layout ask no more of the server than restoring
    # a configuration: done once, not again under read-only.
    layout = [] if read_only else [
        "--chart-config", json.dumps(ORDERS_BY_CATEGORY_CHART), "--reset",
    ]
    port = free_port()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    async with server_process(uvicorn_args(port), tmp_path, port=port):
        async with browsing(
            node, f"http://127.0.0.1:{port}/", tmp_path,
            "--config", json.dumps(ORDERS_SORTED), "--screenshot", str(SCREENSHOT), *layout,
        ) as browser:
            result = await in_thread(browser.report)
        assert_no_errors(result)

        # The page opens on two panels, connected: the live table, and the orders charted.
        initial = result["initial"]
        assert (initial["table"], initial["options"]) == ("prices", ["orders", "prices"])
        assert initial["status"] == "connected"
        assert initial["panels"] == ["table-panel", "chart-panel"]
        assert initial["config"]["plugin"] == "Datagrid"
        assert_chart(initial["chart"], ORDERS_CHART, CATEGORIES)
        assert initial["grid"]["headers"] == PRICES_COLUMNS
        shown = initial["grid"]["rows"]
        assert len(shown) >= 10
        assert all(len(row) == len(PRICES_COLUMNS) for row in shown)
        # Prices move between reads, but the symbols (the index, so the order) do not.
        expected = await server_rows(port, "prices", len(shown), columns=["symbol"])
        assert [row[:1] for row in shown] == expected

        # Live: the grid followed the server's updates.
        assert result["live"]["before"] != result["live"]["after"]

        # The picker switched the viewer to the other table, every row as the server has it.
        switched = result["switched"]
        assert switched["table"] == "orders"
        assert {key: switched["chart"][key] for key in ORDERS_CHART} == ORDERS_CHART
        shown = switched["grid"]["rows"]
        assert len(shown) >= 10
        expected = await server_rows(port, "orders", len(shown))
        assert switched["grid"]["headers"] == ORDERS_COLUMNS
        assert shown == expected

        # A sorted configuration, restored into the viewer: the same rows as the server's view.
        configured = result["configured"]
        assert configured["config"]["sort"] == ORDERS_SORTED["sort"]
        assert configured["grid"]["headers"] == ORDERS_SORTED["columns"]
        shown = configured["grid"]["rows"]
        assert len(shown) >= 10
        expected = await server_rows(
            port, "orders", len(shown),
            columns=ORDERS_SORTED["columns"], sort=ORDERS_SORTED["sort"],
        )
        assert shown == expected
        if not read_only:
            # Another chart, restored into the chart panel (the restart test sees it drawn).
            chart = configured["chart"]
            assert {key: chart[key] for key in ORDERS_BY_CATEGORY_CHART} \
                == ORDERS_BY_CATEGORY_CHART

            # "Reset layout" put both panels back as the page opened.
            reset = result["reset"]
            table_config = reset["table"]["config"]
            assert (table_config["table"], table_config["plugin"]) == ("prices", "Datagrid")
            for key in ("group_by", "split_by", "sort", "filter"):
                assert table_config[key] == [], key
            assert reset["table"]["grid"]["headers"] == PRICES_COLUMNS
            chart = reset["chart"]
            assert {key: chart[key] for key in ORDERS_CHART} == ORDERS_CHART
            assert chart["settings"] is False

        # The viewer never sent a request the server refused (read-only, or a view guard
        # refusal, which would count toward closing it with 1008).
        metrics = await in_thread(read_metrics, port)
        assert "perspective_request_seconds" in metrics
        refused = [line for line in metrics.splitlines()
                   if line.startswith("perspective_refused_requests_total")]
        assert refused == [], refused

    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(SCREENSHOT, ROOT / "docs" / "dashboard.png")


async def test_dashboard_without_orders_shows_one_panel(node: str, tmp_path: Path) -> None:
    # Nothing to chart: the table panel takes the page, as it did before there was a chart.
    data = tmp_path / "data.csv"
    data.write_text("id,name\n1,alpha\n2,beta\n3,gamma\n")
    port = free_port()
    serve = command("serve", str(data), "--no-demo", "--port", str(port))
    async with server_process(serve, tmp_path, port=port):
        async with browsing(node, f"http://127.0.0.1:{port}/", tmp_path) as browser:
            result = await in_thread(browser.report)
        assert_no_errors(result)
        initial = result["initial"]
        assert (initial["table"], initial["options"]) == ("data", ["data"])
        assert (initial["panels"], initial["chart"]) == (["table-panel"], None)
        assert initial["grid"]["headers"] == ["id", "name"]
        assert initial["grid"]["rows"] == await server_rows(port, "data", 3)


async def test_dashboard_reconnects_after_a_server_restart(node: str, tmp_path: Path) -> None:
    port = free_port()
    first_logs, second_logs = tmp_path / "first", tmp_path / "second"
    first_logs.mkdir()
    second_logs.mkdir()
    first = ServerProcess(uvicorn_args(port), port, first_logs)
    second: ServerProcess | None = None
    try:
        await in_thread(first.wait_listening)
        async with browsing(
            node, f"http://127.0.0.1:{port}/", tmp_path,
            "--config", json.dumps(ORDERS_BY_REGION),
            "--chart-config", json.dumps(ORDERS_BY_CATEGORY_CHART), "--restart",
        ) as browser:
            assert await in_thread(browser.next_message) == {"event": "restart"}
            # A crash, not a shutdown: no close frame reaches the page.
            first.kill()
            second = ServerProcess(uvicorn_args(port), port, second_logs)
            await in_thread(second.wait_listening)
            result = await in_thread(browser.report)

        restart = result["restart"]
        before, after = restart["before"], restart["after"]
        for key in ("table", "title", "group_by", "sort", "columns"):
            assert after["config"][key] == before["config"][key] == ORDERS_BY_REGION[key], key
        width = len(ORDERS_BY_REGION["columns"])
        shown = row_cells(after["grid"], width + 1)
        assert len(shown) == 1 + len({"North", "South", "East", "West", "Central"})
        assert shown == row_cells(before["grid"], width + 1)
        config = {key: ORDERS_BY_REGION[key] for key in ("group_by", "columns", "sort")}
        assert shown == await server_rows(port, "orders", len(shown), **config)
        # The chart panel, too, came back as it was.
        assert_chart(before["chart"], ORDERS_BY_CATEGORY_CHART, REGIONS)
        assert after["chart"]["config"] == before["chart"]["config"]
        assert_chart(after["chart"], ORDERS_BY_CATEGORY_CHART, REGIONS)

        # The status line told the story: disconnected with a countdown, then connected.
        log = restart["status_log"]
        countdown = re.compile(r"disconnected — reconnecting in \d+s")
        assert any(entry["state"] == "closed" and countdown.fullmatch(entry["text"])
                   for entry in log), log
        assert log[-1] == {"state": "open", "text": "connected"}, log
        # The table picker works on the new connection.
        picked = restart["picked"]
        assert (picked["config"]["table"], picked["grid"]["headers"]) == ("prices", PRICES_COLUMNS)
    finally:
        first.kill()
        if second is not None:
            second.kill()

    # While the server was down, reconnection attempts may be refused; nothing else may fail.
    errors = result["errors"]
    refused = re.compile(
        rf"WebSocket connection to 'ws://127\.0\.0\.1:{port}/websocket' failed: "
        r".*ERR_CONNECTION_REFUSED"
    )
    errors["console"] = [
        entry for entry in errors["console"]
        if not (entry["stage"] in ("restart", "reconnect") and refused.fullmatch(entry["message"]))
    ]
    assert_no_errors(result)


async def test_three_pages_share_one_engine_view(node: str, tmp_path: Path) -> None:
    port = free_port()
    async with server_process(uvicorn_args(port), tmp_path, port=port):
        async with browsing(
            node, f"http://127.0.0.1:{port}/", tmp_path, "--config", json.dumps(ORDERS_SORTED),
            "--pivot", json.dumps(ORDERS_BY_REGION), script=SHARED_SCRIPT,
        ) as browser:
            result = await in_thread(browser.report)
        assert_no_errors(result)

        # The three pages open on the live table and the orders chart, configured alike: one
        # engine view serves the three grids and one the three charts, each page's view of
        # each an alias.
        initial = result["initial"]
        pages = initial["pages"]
        assert [page["config"]["table"] for page in pages] == ["prices"] * 3
        assert pages[0]["config"] == pages[1]["config"] == pages[2]["config"]
        # Prices move between reads, but the symbols (the index, so the order) do not.
        symbols = [[row[:1] for row in page["grid"]["rows"]] for page in pages]
        assert len(symbols[0]) >= 10
        expected = await server_rows(port, "prices", len(symbols[0]), columns=["symbol"])
        assert symbols == [expected] * 3
        assert requests_of(initial["metrics"], "table_make_view") == 6
        assert sharing_gauges(initial["metrics"]) == (2, 6, 4)

        # Each page picked "orders" (a view of it) and restored the sorted configuration (a
        # view again) in its table panel, deleting the view it replaced each time: one view
        # each, shared again.
        configured = result["configured"]
        grids = [page["grid"] for page in configured["pages"]]
        assert grids[0]["headers"] == ORDERS_SORTED["columns"]
        assert grids[0] == grids[1] == grids[2]
        shown = grids[0]["rows"]
        assert len(shown) >= 10
        sorted_config = {key: ORDERS_SORTED[key] for key in ("columns", "sort")}
        assert shown == await server_rows(port, "orders", len(shown), **sorted_config)
        metrics = configured["metrics"]
        assert (requests_of(metrics, "table_make_view"), requests_of(metrics, "view_delete")) \
            == (12, 6)
        assert sharing_gauges(metrics) == (2, 6, 4)

        # The first page pivots: a view of its own, and the shared one keeps two aliases (the
        # charts still share theirs).
        pivoted = result["pivoted"]
        assert pivoted["page"]["config"]["group_by"] == ORDERS_BY_REGION["group_by"]
        width = len(ORDERS_BY_REGION["columns"])
        shown = row_cells(pivoted["page"]["grid"], width + 1)
        assert len(shown) == 1 + len({"North", "South", "East", "West", "Central"})
        grouped_config = {key: ORDERS_BY_REGION[key] for key in ("group_by", "columns", "sort")}
        assert shown == await server_rows(port, "orders", len(shown), **grouped_config)
        metrics = pivoted["metrics"]
        assert (requests_of(metrics, "table_make_view"), requests_of(metrics, "view_delete")) \
            == (13, 7)
        assert sharing_gauges(metrics) == (3, 6, 3)

        # The other two, drawn again from their views (a read each), still show the sorted
        # rows, unpivoted.
        redrawn = result["redrawn"]
        assert [page["grid"] for page in redrawn["pages"]] == grids[1:]
        reads = requests_of(redrawn["metrics"], "view_to_columns_string")
        assert reads >= requests_of(metrics, "view_to_columns_string") + 2
        assert sharing_gauges(redrawn["metrics"]) == (3, 6, 3)
