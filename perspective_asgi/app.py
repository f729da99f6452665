"""A demo dashboard on one origin: ``uvicorn perspective_asgi.app:app``.

``/`` is a page with a ``<perspective-viewer>``, ``/websocket`` serves Perspective and
``/healthz`` answers ``{"status": "ok"}``. The demo tables are generated locally: "orders", 100k
static rows, and "prices", 50 symbols updated a few hundred times a second by a thread that the
app's lifespan starts and stops. Requires the ``starlette`` extra.
"""

from __future__ import annotations

import contextlib
import html
import importlib.resources
import logging
import os
import pathlib
import random
import string
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio.to_thread
import perspective
import pyarrow as pa
import pyarrow.compute as pc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ._config import Settings
from .adapters.starlette import PerspectiveWebSocketRoute

__all__ = ["PriceTicker", "create_app"]

logger = logging.getLogger(__name__)

#: Where the viewer bundle lives when it is not served from the installed perspective-python.
ASSET_URL_ENV = "PERSPECTIVE_ASGI_ASSET_URL"
BUNDLE_JS = "perspective-anywidget.js"
BUNDLE_CSS = "perspective-anywidget.css"

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


PAGE = string.Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>perspective-asgi</title>
<link rel="icon" href="data:,">
$stylesheet
<style>
  html, body { margin: 0; height: 100%; font: 14px system-ui, sans-serif; }
  body { display: flex; flex-direction: column; }
  header { display: flex; gap: 1.5em; align-items: center; padding: 0.5em 1em;
           border-bottom: 1px solid #ddd; }
  h1 { font-size: 1.1em; margin: 0; }
  #status { margin-left: auto; color: #777; }
  #status[data-state="open"] { color: #1a7f37; }
  #status[data-state="closed"] { color: #cf222e; }
  perspective-viewer { flex: 1; min-height: 0; }
  .unavailable { padding: 1em 2em; max-width: 48em; line-height: 1.5; }
</style>
</head>
<body data-websocket="$websocket_path" data-bundle="$bundle_url">
<header>
  <h1>perspective-asgi</h1>
  <label>Table <select id="table" disabled></select></label>
  <span id="status" data-state="connecting">$status</span>
</header>
$main
</body>
</html>
""")

# Constant, not templated: the page passes its URLs in data attributes of <body>.
VIEWER_SCRIPT = """<perspective-viewer></perspective-viewer>
<script type="module">
const status = document.getElementById("status");
const picker = document.getElementById("table");
const viewer = document.querySelector("perspective-viewer");
const url = new URL(document.body.dataset.websocket, location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";

function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// Resolves with a client once the websocket is open.
function connect(Client) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    // The client lends a view of WebAssembly memory: copy it before the next request reuses it.
    const client = new Client(async (request) => ws.send(request.slice()), async () => ws.close());
    ws.onopen = () => resolve(client);
    ws.onmessage = (event) => client.handle_response(new Uint8Array(event.data));
    ws.onclose = (event) => {
      const reason = `websocket closed (${event.code}${event.reason ? ": " + event.reason : ""})`;
      show("closed", `disconnected: ${reason}; reload to reconnect`);
      client.handle_error(reason).catch(() => {});
      reject(new Error(reason));
    };
  });
}

try {
  // The bundle defines <perspective-viewer>; `ready` settles once its WebAssembly is compiled.
  const { ready } = await import(document.body.dataset.bundle);
  await ready;
  const { Client } = customElements.get("perspective-viewer").__wasm_module__;
  const client = await connect(Client);
  const names = (await client.get_hosted_table_names()).sort();
  show("open", `connected to ${url.host}`);
  picker.replaceChildren(...names.map((name) => new Option(name, name)));
  await viewer.load(client);
  const open = (name) => viewer.restore({ table: name, title: name });
  picker.addEventListener("change", () => open(picker.value));
  if (names.length > 0) {
    picker.value = names.includes("prices") ? "prices" : names[0];
    picker.disabled = false;
    await open(picker.value);
  }
} catch (error) {
  console.error(error);
  if (status.dataset.state !== "closed") show("closed", `error: ${error.message ?? error}`);
}
</script>"""

UNAVAILABLE = string.Template("""<div class="unavailable">
<p><strong>The Perspective viewer bundle is unavailable.</strong> perspective-python $version
does not ship one (5.x does, in <code>perspective/widget/static</code>).</p>
<p>Set <code>$env</code> to a URL serving <code>$js</code> and <code>$css</code> built for
the same major version of Perspective as this server (the protocol changes between majors),
with CORS headers if it is another origin, and restart. Meanwhile <code>$websocket_path</code>
serves any Perspective client.</p>
</div>""")


def _page(request: Request, asset_url: str | None) -> str:
    websocket_path = html.escape(request.url_for("perspective").path)
    if asset_url is None:
        main = UNAVAILABLE.substitute(
            version=html.escape(getattr(perspective, "__version__", "")),
            env=ASSET_URL_ENV, js=BUNDLE_JS, css=BUNDLE_CSS, websocket_path=websocket_path,
        )
        return PAGE.substitute(stylesheet="", websocket_path=websocket_path, bundle_url="",
                               status="viewer unavailable", main=main)
    base = asset_url.rstrip("/")
    return PAGE.substitute(
        stylesheet=f'<link rel="stylesheet" href="{html.escape(f"{base}/{BUNDLE_CSS}")}">',
        websocket_path=websocket_path,
        bundle_url=html.escape(f"{base}/{BUNDLE_JS}"),
        status="connecting&hellip;",
        main=VIEWER_SCRIPT,
    )


def create_app(*, demo: bool = True, settings: Settings | None = None) -> Starlette:
    """Return the dashboard app; ``demo`` hosts the demo tables on its Perspective server.

    The Perspective server is ``app.state.perspective_server``: host more tables on it with
    ``app.state.perspective_server.new_local_client().table(...)``.
    """
    server = perspective.Server()
    ticker: PriceTicker | None = None
    if demo:
        client = server.new_local_client()
        client.table(_arrow_ipc(orders_table()), name="orders")
        prices = client.table(PriceTicker.SCHEMA, index="symbol", name="prices")
        ticker = PriceTicker(prices)
        prices.update(ticker.snapshot())

    routes: list[BaseRoute] = [PerspectiveWebSocketRoute("/websocket", server, settings=settings)]
    asset_url = os.environ.get(ASSET_URL_ENV) or None
    bundle = _bundle_directory()
    if asset_url is None and bundle is not None:
        routes.append(Mount("/static/perspective", StaticFiles(directory=bundle), name="bundle"))

    async def index(request: Request) -> HTMLResponse:
        base = asset_url
        if base is None and bundle is not None:
            base = request.url_for("bundle", path="").path
        return HTMLResponse(_page(request, base))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if ticker is not None:
            ticker.start()
        try:
            yield
        finally:
            if ticker is not None:
                # Joining waits for the batch in flight; not on the event loop.
                await anyio.to_thread.run_sync(ticker.stop)

    routes += [Route("/", index, name="index"), Route("/healthz", healthz, name="healthz")]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.perspective_server = server
    return app


app = create_app()
