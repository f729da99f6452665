"""Fan-out through edges: subscribers served by 1, 2 and 4 ``perspective-asgi edge`` processes.

One upstream (our raw ASGI app under uvicorn, ``_bench_server.py``) updates its "feed" table
at 20 Hz with 100-row batches from a thread. Each edge replicates it (``perspective_asgi.replica``)
and serves subscribers: every client opens "feed" on one edge (round robin), makes a view and
counts the rows its ``on_update`` delivers, with the latency from the timestamp in each row.

For each number of edges and subscribers it prints a JSON line: delivered fraction, latency
p50/p99, the upstream's and the edges' CPU (cores). The summary gives, per edge count, the
largest subscriber count with >= 99.9 % delivered and p99 <= 100 ms, and its ratio to one
edge's. The upstream always has as many subscribers as there are edges.

    python benchmarks/edge_fanout.py [--quick] [--edges 1 2 4] [--clients 100 200 400 800]

The feed keeps its last 1,000 rows (``--feed-limit``): every update costs the engine time in
proportion to the rows in the table for each subscribed view (about 1 ms per view at 10,000
rows here), which would hide the transport's own cost behind the engine's.

Every process shares this machine's cores: with 2 cores, edges add CPU only until the cores
are full, so the ratio measures the tier's overhead here, not the scaling on more machines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _bench_client as clients  # noqa: E402
import _bench_server  # noqa: E402
import run as harness  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Edge:
    """``python -m perspective_asgi edge UPSTREAM --tables feed`` in a process of its own."""

    def __init__(self, upstream: str) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(f"/tmp/perspective_asgi_edge_{self.port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "perspective_asgi", "edge", upstream, "--tables", "feed",
             "--port", str(self.port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log,
        )
        self.url = f"ws://127.0.0.1:{self.port}/websocket"

    def wait_ready(self, timeout: float = 60) -> Edge:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.port}/readyz"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"edge exited with {self.process.returncode}")
            time.sleep(0.1)
        raise RuntimeError(f"edge on {self.port} not ready after {timeout} s")

    def cpu_seconds(self) -> float:
        return _bench_server.cpu_seconds(self.process.pid)

    def rss_mb(self) -> float:
        return _bench_server.rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def level(args: argparse.Namespace, upstream: Any, edges: list[Edge],
          subscribers: int) -> dict[str, Any]:
    gens = []
    per_edge = [subscribers // len(edges) + (1 if i < subscribers % len(edges) else 0)
                for i in range(len(edges))]
    for edge, count in zip(edges, per_edge, strict=True):
        processes = max(1, count // 250)
        gens += harness._spawn_loadgens("fanout", edge.url, count, processes,
                                        {"sample_rate": 1.0})
    record: dict[str, Any] = {"scenario": "edge_fanout", "edges": len(edges),
                              "clients": subscribers}
    try:
        harness._wait(gens, 300)
        up_before = upstream.call("stats")["cpu_s"]
        edges_before = sum(e.cpu_seconds() for e in edges)
        first = upstream.call("feed_start")
        time.sleep(args.seconds)
        stopped = upstream.call("feed_stop")
        up_after = upstream.call("stats")["cpu_s"]
        edges_after = sum(e.cpu_seconds() for e in edges)
        time.sleep(2.0)  # the last batches reach the subscribers
        for _, pipe in gens:
            pipe.send((first, stopped["last"]))
        replies = harness._wait(gens, 180)
    except (TimeoutError, RuntimeError, EOFError) as exc:
        for process, _ in gens:
            process.kill()
        record["error"] = str(exc)
        return record
    harness._finish(gens)
    delivered = sum(r["delivered"] for r in replies)
    expected = sum(r["expected"] for r in replies)
    latencies = [x for r in replies for x in r["latencies"]]
    record.update(harness.rounded({
        "delivered": delivered / expected if expected else float("nan"),
        "lat_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "lat_p99_ms": clients.pct(latencies, 0.99),
        "upstream_cpu": (up_after - up_before) / args.seconds,
        "edges_cpu": (edges_after - edges_before) / args.seconds,
        "edges_rss_mb": sum(e.rss_mb() for e in edges),
        "updates": stopped["last"] - first + 1,
    }))
    record["ok"] = record["delivered"] >= 0.999 and record["lat_p99_ms"] <= 100
    return record


def summarize(records: list[dict[str, Any]]) -> str:
    best: dict[int, int] = {}
    for r in records:
        if r.get("ok"):
            best[r["edges"]] = max(best.get(r["edges"], 0), r["clients"])
    lines = ["| Edges | Max subscribers (>= 99.9 % delivered, p99 <= 100 ms) | vs 1 edge |"
             " Upstream CPU at that level |", "| ---: | ---: | ---: | ---: |"]
    for edges in sorted({r["edges"] for r in records}):
        top = best.get(edges, 0)
        base = best.get(1, 0)
        ratio = f"{top / base:.2f}x" if base and top else "-"
        cpu = next((r["upstream_cpu"] for r in records
                    if r["edges"] == edges and r["clients"] == top), None)
        lines.append(f"| {edges} | {top or '-'} | {ratio} | "
                     f"{'-' if cpu is None else f'{cpu:.2f}'} |")
    rows = ["", "| Edges | Subscribers | Delivered | p50 ms | p99 ms | Upstream CPU | Edges CPU |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['edges']} | {r['clients']} | error: {r['error']} | | | | |")
            continue
        rows.append(f"| {r['edges']} | {r['clients']} | {r['delivered']:.4f} | "
                    f"{r['lat_p50_ms']:.1f} | {r['lat_p99_ms']:.1f} | "
                    f"{r['upstream_cpu']:.2f} | {r['edges_cpu']:.2f} |")
    return "\n".join(lines + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 edges, fewer clients")
    parser.add_argument("--edges", type=int, nargs="+")
    parser.add_argument("--clients", type=int, nargs="+")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--feed-limit", type=int, default=1000,
                        help="rows the feed table keeps (default: %(default)s); the engine's "
                        "cost per update and view grows with it")
    args = parser.parse_args()
    args.edges = args.edges or ([1, 2] if args.quick else [1, 2, 4])
    args.clients = args.clients or ([50, 150] if args.quick else [100, 200, 400, 800])
    args.seconds = args.seconds or (4.0 if args.quick else 8.0)
    records = []
    for edge_count in args.edges:
        (upstream,) = harness.start_servers([harness.config(
            "asgi", "ours", tables=["feed"], feed_mode="thread",
            feed_limit=args.feed_limit)])
        edges = [Edge(upstream.url) for _ in range(edge_count)]
        try:
            for edge in edges:
                edge.wait_ready()
            for subscribers in args.clients:
                record = level(args, upstream, edges, subscribers)
                print(json.dumps(record), flush=True)
                records.append(record)
                if "error" in record or record["delivered"] < 0.99:
                    break  # saturated: more subscribers only fail harder
        finally:
            for edge in edges:
                edge.stop()
            upstream.stop()
    print(summarize(records))


if __name__ == "__main__":
    main()
