"""Should the demo app keep uvicorn's permessage-deflate on? Throughput, CPU and bytes, on and off.

Serves the demo app (``perspective_asgi.app.create_app()``: "orders", 100k static rows, and
"prices", updated by its ticker thread about 20 times a second) plus "orders_1m", the same orders
with 1,000,000 rows, under uvicorn in a separate process, once with ``ws_per_message_deflate=True``
(uvicorn's default) and once ``False``. Clients are stock ``perspective.AsyncClient`` s over
``websockets`` connections that offer compression (``compression="deflate"``, as browsers and the
node client do), so whether frames are compressed is the server's choice alone. Cases:

- ``big``: ``view.to_arrow()`` of "orders" and "orders_1m" on one connection: wall time, payload
  MB/s, bytes on the wire (counted by the client's connection as they arrive), server CPU seconds
  per transfer and the longest the server's event loop was blocked meanwhile.
- ``live``: N connections, each with a view on "prices" and ``on_update(mode="row")`` (every
  update carries the changed rows as Arrow): server CPU, delivered updates per second, bytes sent
  and the server's resident memory.
- ``link``: what a 10 and a 100 Mbit/s link would see, from the measured bytes: a transfer takes
  its loopback wall time plus wire bytes / link rate; live feeds are compared by how many clients
  the link carries.

Runs alternate the two servers (``--repeats`` of each); every JSON line and the table give the
median over runs, and the JSON lines give each run's value too, to show the noise.

    python benchmarks/compression.py [--quick] [--repeats 3] [--seconds 10] [--clients 20 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import multiprocessing
import socket
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import perspective
import websockets
from websockets.asyncio.client import ClientConnection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_server import cpu_seconds, rss_mb

BIG_ROWS = 1_000_000
LINKS_MBIT = (10, 100)


# --- the server process -------------------------------------------------------------------------


def serve(port_pipe: Any, deflate: bool, big_rows: int, loop_stall: Any) -> None:
    """Run the demo app (plus a ``big_rows`` orders table) under uvicorn until terminated."""
    import pyarrow as pa
    import uvicorn

    from perspective_asgi.app import create_app, orders_table

    app = create_app()
    sink = pa.BufferOutputStream()
    big = orders_table(big_rows)
    with pa.ipc.new_stream(sink, big.schema) as writer:
        writer.write_table(big)
    app.state.perspective_server.new_local_client().table(
        sink.getvalue().to_pybytes(), name="orders_1m"
    )
    del big, sink

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", ws_per_message_deflate=deflate
    )

    async def watch_loop() -> None:
        # The longest a 10 ms sleep overshot since the parent last reset the value: how long the
        # loop was busy with something else (compressing, for one).
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            loop_stall.value = max(loop_stall.value, time.perf_counter() - start - 0.01)

    async def main() -> None:
        watcher = asyncio.create_task(watch_loop())
        port_pipe.send(sock.getsockname()[1])
        await uvicorn.Server(config).serve(sockets=[sock])
        watcher.cancel()

    asyncio.run(main())


# --- clients ------------------------------------------------------------------------------------


class CountingConnection(ClientConnection):
    """A client connection that counts the bytes it reads off the socket (frames as sent)."""

    wire_bytes = 0

    def data_received(self, data: bytes) -> None:
        self.wire_bytes += len(data)
        super().data_received(data)


class Client:
    """A ``perspective.AsyncClient`` over one websocket, counting wire and payload bytes."""

    def __init__(self, ws: CountingConnection) -> None:
        self.ws = ws
        self.payload_bytes = 0
        self.closed: int | None = None
        self.perspective = perspective.AsyncClient(self._send)
        self._reader = asyncio.create_task(self._pump())

    @classmethod
    async def connect(cls, url: str) -> Client:
        ws = await websockets.connect(
            url, max_size=None, compression="deflate", create_connection=CountingConnection,
            open_timeout=60,
        )
        return cls(ws)  # type: ignore[arg-type]

    async def _send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def _pump(self) -> None:
        try:
            async for message in self.ws:
                self.payload_bytes += len(message)
                result = self.perspective.handle_response(message)
                if inspect.isawaitable(result):
                    await result
        except websockets.ConnectionClosed:
            pass
        self.closed = self.ws.close_code

    @property
    def deflate(self) -> bool:
        return any(e.name == "permessage-deflate" for e in self.ws.protocol.extensions)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def measure_big(
    url: str, table_name: str, transfers: int, server_pid: int, loop_stall: Any
) -> dict[str, Any]:
    client = await Client.connect(url)
    view = await (await client.perspective.open_table(table_name)).view()
    arrow = await view.to_arrow()  # warm-up
    walls, wires, cpus, stalls = [], [], [], []
    for _ in range(transfers):
        wire, cpu = client.ws.wire_bytes, cpu_seconds(server_pid)
        loop_stall.value = 0.0
        start = time.perf_counter()
        arrow = await view.to_arrow()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds(server_pid) - cpu)
        stalls.append(loop_stall.value)
        wires.append(client.ws.wire_bytes - wire)
    deflate = client.deflate
    await view.delete()
    await client.close()
    wall = statistics.median(walls)
    return {
        "deflate_negotiated": deflate,
        "arrow_bytes": len(arrow),
        "wire_bytes": int(statistics.median(wires)),
        "wall_s": round(wall, 4),
        "mb_s": round(len(arrow) / 1e6 / wall, 1),
        "server_cpu_s": round(statistics.median(cpus), 3),
        "loop_stall_ms": round(statistics.median(stalls) * 1e3, 1),
        "zlib_estimate_bytes": len(deflated(arrow)),
    }


def deflated(data: bytes) -> bytes:
    # What uvicorn's websockets-sansio protocol negotiates: 12-bit window, memLevel 5, level 6.
    compressor = zlib.compressobj(6, zlib.DEFLATED, -12, 5)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


async def measure_live(
    url: str, clients: int, seconds: float, server_pid: int, loop_stall: Any
) -> dict[str, Any]:
    updates = [0] * clients

    def counter(i: int) -> Callable[..., None]:
        def on_update(*args: Any) -> None:
            updates[i] += 1
        return on_update

    connected: list[Client] = []
    rss_before = rss_mb(server_pid)
    try:
        for i in range(clients):
            client = await Client.connect(url)
            connected.append(client)
            view = await (await client.perspective.open_table("prices")).view()
            await view.on_update(counter(i), mode="row")
        await asyncio.sleep(1.0)
        snapshot = (sum(updates), sum(c.ws.wire_bytes for c in connected),
                    sum(c.payload_bytes for c in connected), cpu_seconds(server_pid),
                    time.process_time(), time.perf_counter())
        loop_stall.value = 0.0
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - snapshot[5]
        delivered = sum(updates) - snapshot[0]
        wire = sum(c.ws.wire_bytes for c in connected) - snapshot[1]
        payload = sum(c.payload_bytes for c in connected) - snapshot[2]
        server_cpu = cpu_seconds(server_pid) - snapshot[3]
        client_cpu = time.process_time() - snapshot[4]
        stall = loop_stall.value
        rss = rss_mb(server_pid) - rss_before
        closed = sum(c.closed is not None for c in connected)
        deflate = connected[0].deflate
    finally:
        for client in connected:
            await client.close()
    return {
        "deflate_negotiated": deflate,
        "seconds": round(elapsed, 2),
        "updates_per_s": round(delivered / elapsed, 1),
        "updates_per_client_s": round(delivered / elapsed / clients, 2),
        "wire_kb_s": round(wire / elapsed / 1e3, 1),
        "payload_kb_s": round(payload / elapsed / 1e3, 1),
        "wire_bytes_per_update": round(wire / max(delivered, 1)),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_pct": round(100 * server_cpu / elapsed, 1),
        "client_cpu_pct": round(100 * client_cpu / elapsed, 1),
        "loop_stall_ms": round(stall * 1e3, 1),
        "server_rss_growth_mb": round(rss, 1),
        "connections_closed": closed,
    }


# --- driving it ---------------------------------------------------------------------------------


def run_server(deflate: bool, big_rows: int, cases: list[tuple[str, Any]], args: Any,
               ctx: Any) -> list[tuple[str, dict[str, Any]]]:
    """Start one server, run every case against it, stop it; return (case key, result) pairs."""
    loop_stall = ctx.Value("d", 0.0, lock=False)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=serve, args=(send, deflate, big_rows, loop_stall), daemon=True)
    process.start()
    try:
        if not receive.poll(180):
            raise RuntimeError("server did not start")
        url = f"ws://127.0.0.1:{receive.recv()}/websocket"
        results = []
        for key, (kind, param) in cases:
            if kind == "big":
                table, transfers = param
                result = asyncio.run(measure_big(url, table, transfers, process.pid, loop_stall))
            else:
                result = asyncio.run(
                    measure_live(url, param, args.seconds, process.pid, loop_stall)
                )
            if result["deflate_negotiated"] is not deflate:
                raise RuntimeError(f"deflate negotiated {result['deflate_negotiated']}")
            results.append((key, result))
            print(f"# deflate={deflate} {key}: {json.dumps(result)}", file=sys.stderr, flush=True)
        return results
    finally:
        process.terminate()
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for field, value in runs[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            summary[field] = value
            continue
        values = [run[field] for run in runs]
        middle = statistics.median(values)
        summary[field] = round(middle, 4) if isinstance(middle, float) else middle
        if len(runs) > 1 and field not in ("arrow_bytes", "zlib_estimate_bytes", "seconds"):
            summary[f"{field}_runs"] = values
    return summary


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(case: dict[str, Any], field: str) -> str:
    """'median ±half-range %' of a field, from its per-run values."""
    values = case.get(f"{field}_runs")
    text = number(case[field])
    if not values or not case[field]:
        return text
    return f"{text} ±{50 * (max(values) - min(values)) / abs(case[field]):.0f}%"


def link_estimates(big: dict[str, Any]) -> dict[str, float]:
    estimate = {}
    for mbit in LINKS_MBIT:
        seconds = big["wall_s"] + big["wire_bytes"] * 8 / (mbit * 1e6)
        estimate[f"link_{mbit}mbit_s"] = round(seconds, 2)
        estimate[f"link_{mbit}mbit_mb_s"] = round(big["arrow_bytes"] / 1e6 / seconds, 2)
    return estimate


def break_even_mbit(on: dict[str, Any], off: dict[str, Any]) -> float | None:
    """The link rate below which deflate makes a transfer finish sooner (None: at any rate)."""
    saved_bits = (off["wire_bytes"] - on["wire_bytes"]) * 8
    extra_seconds = on["wall_s"] - off["wall_s"]
    if extra_seconds <= 0:
        return None
    return round(saved_bits / extra_seconds / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="one run of each server, 3 s live windows, 20 clients")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--big-rows", type=int, default=BIG_ROWS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seconds, args.clients = 1, 3.0, [20]

    cases: list[tuple[str, Any]] = [
        ("big 100k", ("big", ("orders", 5))),
        (f"big {args.big_rows // 1000}k", ("big", ("orders_1m", 3))),
        *((f"live {n}", ("live", n)) for n in args.clients),
    ]
    ctx = multiprocessing.get_context("spawn")  # the client's Perspective threads must not fork
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for run in range(args.repeats):
        # Alternate which server goes first, so drift in the machine's load hits both alike.
        for deflate in ((True, False) if run % 2 == 0 else (False, True)):
            for key, result in run_server(deflate, args.big_rows, cases, args, ctx):
                runs.setdefault((key, deflate), []).append(result)

    summary: dict[tuple[str, bool], dict[str, Any]] = {}
    for (key, deflate), results in runs.items():
        case = median_of(results)
        if key.startswith("big"):
            case |= link_estimates(case)
        summary[key, deflate] = case
    for key, _ in cases:
        if key.startswith("big"):
            on, off = summary[key, True], summary[key, False]
            on["break_even_mbit"] = off["break_even_mbit"] = break_even_mbit(on, off)
    for key, _ in cases:
        for deflate in (True, False):
            kind, _, size = key.partition(" ")
            label = {"case": kind, "rows" if kind == "big" else "clients": size}
            print(json.dumps({**label, "deflate": deflate, "runs": args.repeats,
                              **summary[key, deflate]}), flush=True)
    print_tables(cases, summary, args)


def print_tables(cases: list[tuple[str, Any]], summary: dict[tuple[str, bool], dict[str, Any]],
                 args: Any) -> None:
    print(f"\nMedians of {args.repeats} run(s); ±x% is half the range between runs, relative to "
          "the median.\n")
    print("| Case | deflate | Arrow MB | Wire MB | Ratio | Wall s | MB/s | Server CPU s | "
          "Loop stall ms | 10 Mbit/s: s (MB/s) | 100 Mbit/s: s (MB/s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, _ in cases:
        if not key.startswith("big"):
            continue
        for deflate in (True, False):
            c = summary[key, deflate]
            print(f"| {key} rows | {'on' if deflate else 'off'} | {c['arrow_bytes'] / 1e6:.1f} | "
                  f"{c['wire_bytes'] / 1e6:.1f} | {c['arrow_bytes'] / c['wire_bytes']:.1f} | "
                  f"{spread(c, 'wall_s')} | {spread(c, 'mb_s')} | {spread(c, 'server_cpu_s')} | "
                  f"{spread(c, 'loop_stall_ms')} | "
                  + " | ".join(f"{c[f'link_{m}mbit_s']:g} ({c[f'link_{m}mbit_mb_s']:g})"
                               for m in LINKS_MBIT) + " |")
    for key, _ in cases:
        if key.startswith("big"):
            rate = summary[key, True]["break_even_mbit"]
            print(f"\n{key} rows: deflate finishes sooner on links slower than "
                  + ("any rate" if rate is None else f"{rate:g} Mbit/s") + " (transfer time "
                  "= loopback wall time + wire bytes / link rate).", end="")
    print()
    print("\n| Case | deflate | Updates/s (per client) | Wire kB/s | Payload kB/s | "
          "Bytes/update | Server CPU % | Client CPU % | Loop stall ms | Server RSS growth MB | "
          + " | ".join(f"Clients on {m} Mbit/s" for m in LINKS_MBIT) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
          + " | ".join("---:" for _ in LINKS_MBIT) + " |")
    for key, _ in cases:
        if not key.startswith("live"):
            continue
        clients = int(key.split()[1])
        for deflate in (True, False):
            c = summary[key, deflate]
            per_client_bits = c["wire_kb_s"] * 8e3 / clients
            fits = " | ".join(f"{int(m * 1e6 / per_client_bits):,}" for m in LINKS_MBIT)
            closed = f" ({c['connections_closed']} closed)" if c["connections_closed"] else ""
            print(f"| {clients} clients{closed} | {'on' if deflate else 'off'} | "
                  f"{number(c['updates_per_s'])} ({c['updates_per_client_s']:g}) | "
                  f"{spread(c, 'wire_kb_s')} | {number(c['payload_kb_s'])} | "
                  f"{c['wire_bytes_per_update']} | {spread(c, 'server_cpu_pct')} | "
                  f"{c['client_cpu_pct']:g} | {spread(c, 'loop_stall_ms')} | "
                  f"{c['server_rss_growth_mb']:g} | {fits} |")


if __name__ == "__main__":
    main()
