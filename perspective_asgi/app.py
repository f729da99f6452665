"""A demo dashboard on one origin: ``uvicorn perspective_asgi.app:app``.

``/`` is a page with a ``<perspective-viewer>``, ``/websocket`` serves Perspective,
``/healthz`` answers ``{"status": "ok"}`` and ``/metrics`` has Prometheus metrics. The demo
tables are generated locally: "orders", 100k static rows, and "prices", 50 symbols updated a few
hundred times a second by a thread that the app's lifespan starts and stops. Requires the
``starlette`` and ``metrics`` extras.

For ``app``, ``PERSPECTIVE_ASGI_DEMO=0`` leaves the demo tables out and
``PERSPECTIVE_ASGI_FILES`` serves data files (``os.pathsep``-separated), as
``perspective-asgi serve`` does; see ``settings_from_env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import html
import importlib.resources
import logging
import os
import pathlib
import random
import string
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import anyio.to_thread
import perspective
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ._config import Settings
from ._exceptions import LoadError
from ._loaders import load_sources
from ._observer import FanOutObserver
from ._types import SessionFactory
from .adapters.starlette import PerspectiveWebSocketRoute
from .metrics import PrometheusObserver

if TYPE_CHECKING:
    from .replica import Replica

__all__ = ["AppOptions", "PriceTicker", "create_app", "settings_from_env"]

logger = logging.getLogger(__name__)

#: Where the viewer bundle lives when it is not served from the installed perspective-python.
ASSET_URL_ENV = "PERSPECTIVE_ASGI_ASSET_URL"
BUNDLE_JS = "perspective-anywidget.js"
BUNDLE_CSS = "perspective-anywidget.css"

#: ``0`` (or ``false``, ``no``, ``off``) leaves the demo tables out of the module's ``app``.
DEMO_ENV = "PERSPECTIVE_ASGI_DEMO"
#: Data files the module's ``app`` serves, separated by ``os.pathsep``.
FILES_ENV = "PERSPECTIVE_ASGI_FILES"
#: Set to 1 to refuse every request that creates, changes or deletes a table.
READ_ONLY_ENV = "PERSPECTIVE_ASGI_READ_ONLY"
#: Names of the tables ``create_app(demo=True)`` hosts.
DEMO_TABLES = ("orders", "prices")

ORDER_ROWS = 100_000
REGIONS = ["North", "South", "East", "West", "Central"]
#: (category, product, list price)
PRODUCTS = [
    ("Furniture", "Chair", 149.0), ("Furniture", "Desk", 399.0),
    ("Furniture", "Bookcase", 229.0), ("Furniture", "Lamp", 49.0),
    ("Technology", "Laptop", 1199.0), ("Technology", "Phone", 799.0),
    ("Technology", "Monitor", 329.0), ("Technology", "Printer", 259.0),
    ("Office Supplies", "Paper", 9.5), ("Office Supplies", "Pens", 4.25),
    ("Office Supplies", "Binder", 7.0), ("Office Supplies", "Stapler", 15.0),
]
SYMBOLS = [
    "AAPL", "ABBV", "ADBE", "AMD", "AMGN", "AMZN", "AVGO", "BA", "BAC", "BRK.B",
    "CAT", "COST", "CRM", "CSCO", "CVX", "DIS", "GE", "GOOGL", "GS", "HD",
    "HON", "IBM", "INTC", "JNJ", "JPM", "KO", "LIN", "LLY", "MA", "MCD",
    "META", "MRK", "MS", "MSFT", "NFLX", "NKE", "NVDA", "ORCL", "PEP", "PFE",
    "PG", "QCOM", "T", "TMO", "TSLA", "UNH", "V", "VZ", "WMT", "XOM",
]


def orders_table(rows: int = ORDER_ROWS, seed: int = 7) -> pa.Table:
    """Return ``rows`` deterministic sales orders over 2024-2025, generated with Arrow kernels."""

    def uniform(stream: int) -> Any:
        return pc.random(rows, initializer=seed * 100 + stream)

    def integers(stream: int, low: int, high: int) -> Any:
        # floor(low + u * (high - low)) for u in [0, 1): uniform over [low, high).
        scaled = pc.add(pc.multiply(uniform(stream), high - low), low)
        return pc.cast(pc.floor(scaled), pa.int32())

    product = integers(1, 0, len(PRODUCTS))
    days_since_epoch = integers(2, 19_723, 19_723 + 731)  # 2024-01-01 .. 2025-12-31
    quantity = integers(3, 1, 21)
    list_price = pc.take(pa.array([price for _, _, price in PRODUCTS]), product)
    discount = pc.add(pc.multiply(uniform(4), 0.3), 0.8)  # 80% .. 110% of list price
    unit_price = pc.round(pc.multiply(list_price, discount), 2)
    return pa.table({
        "order_date": days_since_epoch.view(pa.date32()),
        "region": pc.take(pa.array(REGIONS), integers(5, 0, len(REGIONS))),
        "category": pc.take(pa.array([category for category, _, _ in PRODUCTS]), product),
        "product": pc.take(pa.array([name for _, name, _ in PRODUCTS]), product),
        "quantity": quantity,
        "unit_price": unit_price,
        "total": pc.round(pc.multiply(pc.cast(quantity, pa.float64()), unit_price), 2),
    })


def _arrow_ipc(table: pa.Table) -> bytes:
    # Arrow IPC bytes are the one input format every supported perspective-python accepts.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


class PriceTicker:
    """Random-walks the prices of ``SYMBOLS`` in a thread, updating a Perspective table in batches.

    Args:
        table: a Perspective table indexed by ``symbol``, hosted by any server.
        interval: seconds between batches.
        batch: symbols updated per batch, as ``(fewest, most)``.
        seed: seeds the random walk, so a run is reproducible.
    """

    SCHEMA: ClassVar[dict[str, str]] = {
        "symbol": "string", "price": "float", "change": "float", "change_pct": "float",
        "bid": "float", "ask": "float", "volume": "integer", "updated": "datetime",
    }

    def __init__(
        self,
        table: Any,
        *,
        interval: float = 0.05,
        batch: tuple[int, int] = (10, 20),
        seed: int = 11,
    ) -> None:
        self.table = table
        self.interval = interval
        self.batch = batch
        self._random = random.Random(seed)
        self._opening = {symbol: round(self._random.uniform(20, 900), 2) for symbol in SYMBOLS}
        self._rows = {symbol: self._row(symbol, self._opening[symbol], 0) for symbol in SYMBOLS}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _row(self, symbol: str, price: float, volume: int) -> dict[str, Any]:
        change = price - self._opening[symbol]
        spread = max(0.01, round(price * 0.0005, 2))
        return {
            "symbol": symbol, "price": price, "change": round(change, 2),
            "change_pct": round(100 * change / self._opening[symbol], 3),
            "bid": round(price - spread, 2), "ask": round(price + spread, 2),
            "volume": volume, "updated": int(time.time() * 1000),
        }

    def snapshot(self) -> list[dict[str, Any]]:
        """Return the current row of every symbol."""
        return list(self._rows.values())

    def next_batch(self) -> list[dict[str, Any]]:
        """Move the price of a random handful of symbols and return their new rows."""
        symbols = self._random.sample(SYMBOLS, self._random.randint(*self.batch))
        for symbol in symbols:
            last = self._rows[symbol]
            price = round(max(0.01, last["price"] * (1 + self._random.gauss(0, 0.002))), 2)
            volume = last["volume"] + self._random.randint(1, 50) * 100
            self._rows[symbol] = self._row(symbol, price, volume)
        return [self._rows[symbol] for symbol in symbols]

    def start(self) -> None:
        """Start updating in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("PriceTicker already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="price-ticker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout`` seconds for it to finish its batch."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("price ticker still running %.1f s after it was told to stop", timeout)

    def _run(self) -> None:
        # Table.update runs the engine synchronously; on this thread it never blocks the loop.
        while not self._stop.wait(self.interval):
            try:
                self.table.update(self.next_batch())
            except Exception:
                logger.exception("price ticker stopped: the table refused an update")
                return


def _bundle_directory() -> pathlib.Path | None:
    # perspective-python 5.x ships a self-contained viewer (JS with inlined WebAssembly, and
    # CSS) for its Jupyter widget; 4.x does not. Not imported: that would need anywidget.
    static = importlib.resources.files("perspective") / "widget" / "static"
    if isinstance(static, pathlib.Path) and (static / BUNDLE_JS).is_file():
        return static
    return None


@functools.cache
def _template(name: str) -> string.Template:
    # The page is a file of the package: HTML in templates/, its script and style in static/.
    text = (importlib.resources.files("perspective_asgi") / "templates" / name).read_text("utf-8")
    return string.Template(text)


def _page(request: Request, viewer_url: str | None) -> str:
    # URLs reach the page's script through data attributes of <body>, so the script is static.
    values = {
        "websocket_path": request.url_for("perspective").path,
        "dashboard_css": request.url_for("dashboard", path="dashboard.css").path,
    }
    if viewer_url is None:
        name = "unavailable.html"
        values.update(
            version=getattr(perspective, "__version__", ""), env=ASSET_URL_ENV,
            viewer_js=BUNDLE_JS, viewer_css=BUNDLE_CSS,
        )
    else:
        name = "index.html"
        base = viewer_url.rstrip("/")
        values.update(
            viewer_js=f"{base}/{BUNDLE_JS}", viewer_css=f"{base}/{BUNDLE_CSS}",
            dashboard_js=request.url_for("dashboard", path="dashboard.js").path,
        )
    return _template(name).substitute({key: html.escape(value) for key, value in values.items()})


def _host_tables(client: Any, tables: Mapping[str, tuple[bytes, str | None]]) -> None:
    for name, (data, index) in tables.items():
        try:
            client.table(data, name=name, index=index)
        except perspective.PerspectiveError as exc:
            # The engine's message names the problem but not the table.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            reason = reason.removeprefix("Abort(): ")
            raise ValueError(f"table {name!r}: {reason}") from exc


def _with_metrics(settings: Settings) -> tuple[Settings, PrometheusObserver]:
    """Return ``settings`` whose observer feeds a ``PrometheusObserver``, and that observer."""
    given = settings.observer
    if isinstance(given, PrometheusObserver):
        return settings, given
    # /metrics reports every connection of the app, whatever else observes them; the app's
    # own observer goes first, so one that raises cannot make it miss an event.
    metrics = PrometheusObserver()
    observer = metrics if given is None else FanOutObserver(metrics, given)
    return dataclasses.replace(settings, observer=observer), metrics


def create_app(
    *,
    demo: bool = True,
    settings: Settings | None = None,
    tables: Mapping[str, tuple[bytes, str | None]] | None = None,
    virtual_server: SessionFactory | None = None,
    replica: Replica | None = None,
) -> Starlette:
    """Return the dashboard app; ``demo`` hosts the demo tables on its Perspective server.

    ``tables`` maps more table names to (Arrow IPC bytes, index column or ``None``).
    ``virtual_server`` (e.g. a ``DuckDBVirtualServer``) is served instead of a
    ``perspective.Server``; it hosts its own tables, so it needs ``demo=False`` and no ``tables``.

    ``replica`` (a ``perspective_asgi.replica.Replica``) makes the app an edge: it serves the
    replica's local server, with clients' writes to replicated tables carried to the upstream
    (``replica.write_through()``), runs the replica for the app's lifetime, and ``/readyz``
    answers 503 while the replica is not synchronised with its upstream.

    ``/metrics`` counts every connection of the app: it serves ``settings.observer`` when
    that is a ``PrometheusObserver``, and otherwise the app's own (``app.state.metrics``),
    which then observes the connections beside ``settings.observer``.

    The server is ``app.state.perspective_server``: host more tables on a ``perspective.Server``
    with ``app.state.perspective_server.new_local_client().table(...)``.
    """
    tables = tables or {}
    ticker: PriceTicker | None = None
    server: SessionFactory
    served: SessionFactory | None = None
    if replica is not None:
        if demo or tables or virtual_server is not None:
            raise ValueError("an edge serves its replica's tables only: pass demo=False")
        server, served = replica.server, replica.write_through()
    elif virtual_server is not None:
        if demo or tables:
            raise ValueError(
                "a virtual_server hosts its own tables: pass demo=False and no tables"
            )
        server = virtual_server
    else:
        taken = sorted(set(tables) & set(DEMO_TABLES)) if demo else []
        if taken:
            raise ValueError(f"table {taken[0]!r}: the name of a demo table")
        local = perspective.Server()
        client = local.new_local_client()
        if demo:
            client.table(_arrow_ipc(orders_table()), name="orders")
            prices = client.table(PriceTicker.SCHEMA, index="symbol", name="prices")
            ticker = PriceTicker(prices)
            prices.update(ticker.snapshot())
        _host_tables(client, tables)
        server = local

    settings, metrics_observer = _with_metrics(settings or Settings())
    routes: list[BaseRoute] = [
        PerspectiveWebSocketRoute("/websocket", served or server, settings=settings)
    ]
    asset_url = os.environ.get(ASSET_URL_ENV) or None
    bundle = _bundle_directory()
    if asset_url is None and bundle is not None:
        routes.append(Mount("/static/perspective", StaticFiles(directory=bundle), name="bundle"))
    dashboard = StaticFiles(packages=[("perspective_asgi", "static")])
    routes.append(Mount("/static/dashboard", dashboard, name="dashboard"))

    async def index(request: Request) -> HTMLResponse:
        base = asset_url
        if base is None and bundle is not None:
            base = request.url_for("bundle", path="").path
        return HTMLResponse(_page(request, base))

    async def healthz(request: Request) -> JSONResponse:
        # Liveness: the process serves, whatever its upstream does.
        body: dict[str, Any] = {"status": "ok", "ready": True}
        if replica is not None:
            body.update(replica.status())
        return JSONResponse(body)

    async def readyz(request: Request) -> JSONResponse:
        # Readiness: an edge whose upstream is lost still serves its last state, but a load
        # balancer should prefer edges that are in sync.
        ready = replica is None or replica.ready
        body = {"ready": ready} if replica is None else replica.status()
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(metrics_observer.registry), media_type=CONTENT_TYPE_LATEST
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if ticker is not None:
            ticker.start()
        replicating = None if replica is None else asyncio.ensure_future(replica.run())
        try:
            yield
        finally:
            if replicating is not None:
                replicating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replicating
            if ticker is not None:
                # Joining waits for the batch in flight; not on the event loop.
                await anyio.to_thread.run_sync(ticker.stop)

    routes += [
        Route("/", index, name="index"),
        Route("/healthz", healthz, name="healthz"),
        Route("/readyz", readyz, name="readyz"),
        Route("/metrics", metrics, name="metrics"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.perspective_server = server
    app.state.metrics = metrics_observer
    app.state.replica = replica
    return app


class AppOptions(TypedDict):
    """``create_app`` arguments read from the environment."""

    demo: bool
    tables: Mapping[str, tuple[bytes, str | None]]
    virtual_server: SessionFactory | None
    settings: Settings


TRUE_VALUES = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def settings_from_env(environ: Mapping[str, str] | None = None) -> AppOptions:
    """Return ``create_app`` arguments from the ``PERSPECTIVE_ASGI_*`` environment variables.

    A DuckDB database in the files replaces the demo tables (see ``load_sources``). Raises
    ``ValueError`` (``LoadError`` for files) with a one-line message naming the variable.
    """
    environ = os.environ if environ is None else environ
    demo_value = environ.get(DEMO_ENV, "")
    demo = demo_value.strip().lower()
    read_only_value = environ.get(READ_ONLY_ENV, "")
    read_only = read_only_value.strip().lower()
    for name, value, given in ((DEMO_ENV, demo, demo_value),
                               (READ_ONLY_ENV, read_only, read_only_value)):
        if value not in ("", *TRUE_VALUES, *_FALSE):
            raise ValueError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), "
                             f"got {given!r}")
    paths = [path for path in environ.get(FILES_ENV, "").split(os.pathsep) if path]
    try:
        sources = load_sources(paths)
    except LoadError as exc:
        raise LoadError(f"{FILES_ENV}: {exc}") from None
    if sources.virtual_server is not None and demo in TRUE_VALUES:
        raise ValueError(f"{DEMO_ENV}={demo_value}: the demo tables cannot be served beside "
                         "a DuckDB database")
    return AppOptions(
        demo=demo not in _FALSE and sources.virtual_server is None,
        tables=sources.tables,
        virtual_server=sources.virtual_server,
        settings=Settings(read_only=read_only in TRUE_VALUES),
    )


def _app_from_env() -> Starlette:
    try:
        return create_app(**settings_from_env())
    except ValueError as exc:
        # The ASGI server is importing us: one line saying what to fix, not a traceback.
        raise SystemExit(f"perspective-asgi: error: {exc}") from None


def __getattr__(name: str) -> Starlette:
    # ``app`` is built on first access, by the ASGI server, so importing ``create_app`` (as the
    # command line does) neither builds the demo tables nor reads the environment's files.
    if name == "app":
        app = globals()["app"] = _app_from_env()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
