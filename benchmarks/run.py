"""Our adapters side by side with Perspective's reference handlers, on the same data and stacks.

Every server runs in its own process on 127.0.0.1:0 (``_bench_server.py``); the load comes
from stock ``perspective.AsyncClient`` s over ``websockets`` in this process or in separate
load-generator processes (``_bench_client.py``). Each measurement prints one JSON line; the
end writes a markdown table of medians and ours/reference ratios. See README.md.

    python benchmarks/run.py --quick                       # under 2 minutes
    python benchmarks/run.py                               # about 22 minutes on 2 cores
    python benchmarks/run.py --scenarios rtt big --stacks tornado --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _bench_client as clients  # noqa: E402
import _bench_server  # noqa: E402
import perspective  # noqa: E402

SCENARIOS = ("rtt", "big", "stall", "slow", "fanout", "idle", "churn")
#: Each stack and what runs on it; the raw ASGI app has no reference counterpart of its own,
#: so it is compared with the reference Starlette handler, which also runs on uvicorn.
STACKS = {
    "asgi": ("ours",),
    "starlette": ("ours", "ref"),
    "tornado": ("ours", "ref"),
    "aiohttp": ("ours", "ref"),
}
SPAWN = multiprocessing.get_context("spawn")
RESULTS: list[dict[str, Any]] = []


def emit(record: dict[str, Any]) -> None:
    RESULTS.append(record)
    print(json.dumps(record, default=_round), flush=True)


def _round(value: Any) -> Any:
    return value


def rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}


# --- servers ------------------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.pipe, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_bench_server.serve, args=(config, child),
                                     daemon=True)
        self.process.start()

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        if not self.pipe.poll(timeout):
            raise RuntimeError(f"server {self.config} did not start")
        self.port = self.pipe.recv()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.raw_url = f"ws://127.0.0.1:{self.port}/raw"
        return self

    def call(self, *command: Any, timeout: float = 60) -> Any:
        self.pipe.send(command)
        if not self.pipe.poll(timeout):
            raise RuntimeError(f"server did not answer {command}")
        return self.pipe.recv()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_servers(configs: list[dict[str, Any]]) -> list[ServerProcess]:
    servers = [ServerProcess(c) for c in configs]
    return [s.wait_ready() for s in servers]


def config(stack: str, impl: str, **extra: Any) -> dict[str, Any]:
    return {"stack": stack, "impl": impl, "deflate": False, **extra}


# --- data ---------------------------------------------------------------------------------------


def arrow_file(rows: int) -> str:
    """Write (once) an Arrow stream of ``rows`` rows: ids, two floats, a 100-value string key."""
    import random

    import pyarrow as pa

    path = Path(f"/tmp/perspective_asgi_bench_{rows}.arrow")
    if path.exists():
        return str(path)
    rng = random.Random(5)
    keys = [f"group-{i:03d}" for i in range(100)]
    table = pa.table({
        "id": pa.array(range(rows), pa.int64()),
        "a": pa.array([rng.random() for _ in range(rows)]),
        "b": pa.array([rng.random() * 100 for _ in range(rows)]),
        "g": pa.array([keys[rng.randrange(100)] for _ in range(rows)]),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    path.write_bytes(sink.getvalue().to_pybytes())
    return str(path)


# --- scenarios ----------------------------------------------------------------------------------


def run_queries(args: argparse.Namespace, stacks: list[str]) -> None:
    """rtt, big and stall share one server per implementation, alternated each repeat."""
    wanted = [s for s in ("rtt", "big", "stall") if s in args.scenarios]
    if not wanted:
        return
    tables = []
    extra: dict[str, Any] = {}
    if "big" in wanted:
        tables.append("big")
        extra["big_path"] = arrow_file(args.big_rows)
    if "stall" in wanted:
        tables.append("heavy")
        extra["heavy_path"] = arrow_file(args.heavy_rows)
    for rep in range(args.repeats):
        if "rtt" in wanted:
            local = clients.rtt_local(args.requests)
            emit({"scenario": "rtt", "stack": "local", "impl": "local", "rep": rep,
                  **rounded(local)})
        if "big" in wanted:
            local = clients.big_local(extra["big_path"], args.transfers)
            emit({"scenario": "big", "stack": "local", "impl": "local", "rep": rep,
                  "deflate": False, **rounded(local)})
    for stack in stacks:
        impls = STACKS[stack]
        servers = start_servers([config(stack, i, tables=tables, **extra) for i in impls])
        for rep in range(args.repeats):
            order = list(zip(impls, servers, strict=True))
            if rep % 2:
                order.reverse()
            for impl, server in order:
                base = {"stack": stack, "impl": impl, "rep": rep}
                if "rtt" in wanted:
                    r = asyncio.run(clients.rtt(server.url, args.requests))
                    emit({"scenario": "rtt", **base, **rounded(r)})
                if "big" in wanted:
                    r = asyncio.run(clients.big(server.url, server.raw_url, args.transfers, False))
                    emit({"scenario": "big", **base, "deflate": False, **rounded(r)})
                if "stall" in wanted:
                    r = asyncio.run(clients.stall(server.url, args.queries))
                    emit({"scenario": "stall", **base, **rounded(r)})
        for s in servers:
            s.stop()
        if "big" in wanted and args.deflate and stack in ("asgi", "starlette"):
            servers = start_servers([
                config(stack, i, tables=["big"], deflate=True, **extra) for i in impls
            ])
            for rep in range(args.deflate_repeats):
                for impl, server in zip(impls, servers, strict=True):
                    r = asyncio.run(clients.big(server.url, server.raw_url, 1, True))
                    emit({"scenario": "big", "stack": stack, "impl": impl, "rep": rep,
                          "deflate": True, **rounded(r)})
            for s in servers:
                s.stop()


async def _slow_reader(server: ServerProcess, seconds: float) -> dict[str, Any]:
    import pyarrow  # noqa: F401  (the client decodes nothing; keeps timing fair to import)

    healthy = await clients.Client.connect(server.url)
    slow = await clients.Client.connect(server.url)
    ping_table = await healthy.perspective.open_table("small")
    feed_view = await (await slow.perspective.open_table("feed")).view()
    received = [0]

    def on_update(port_id: int, delta: bytes) -> None:
        received[0] += len(delta)

    await feed_view.on_update(on_update, mode="row")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, server.call, "feed_start")
    await asyncio.sleep(1.5)
    base = await loop.run_in_executor(None, server.call, "stats")
    rate = received[0] / 1.5
    slow.stop_reading()
    stalled_at = time.time()
    pings: list[float] = []
    rss: list[float] = []
    start = time.perf_counter()
    next_sample = start
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        await ping_table.size()
        pings.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() >= next_sample:
            stats = await loop.run_in_executor(None, server.call, "stats")
            rss.append(stats["rss_mb"])
            next_sample += 0.5
        await asyncio.sleep(0.05)
    end = await loop.run_in_executor(None, server.call, "stats")
    await loop.run_in_executor(None, server.call, "feed_stop")
    codes = end["close_codes"] or {}
    t_close = end["overflow_at"]
    result = {
        "feed_mb_s": rate / 1e6,
        "rss_base_mb": base["rss_mb"],
        "rss_max_mb": max(rss),
        "rss_end_mb": end["rss_mb"],
        "rss_growth_mb": max(rss) - base["rss_mb"],
        "closed_1013": t_close is not None,
        "close_codes": {str(k): v for k, v in codes.items()},
        "closed_after_s": None if t_close is None else t_close - stalled_at,
        "healthy_p50_ms": statistics.median(pings),
        "healthy_p99_ms": clients.pct(pings, 0.99),
        "healthy_max_ms": max(pings),
    }
    slow.abort()
    await healthy.close()
    return result


def run_slow(args: argparse.Namespace, stacks: list[str]) -> None:
    if "slow" not in args.scenarios:
        return
    for rep in range(args.slow_repeats):
        for stack in stacks:
            for impl in STACKS[stack]:
                (server,) = start_servers([config(
                    stack, impl, tables=["feed"], feed_hz=50, feed_rows=2000, feed_width=8,
                    feed_mode="loop", feed_limit=10000,
                )])
                try:
                    r = asyncio.run(_slow_reader(server, args.slow_seconds))
                finally:
                    server.stop()
                emit({"scenario": "slow", "stack": stack, "impl": impl, "rep": rep,
                      **rounded(r)})


def _spawn_loadgens(kind: str, url: str, total: int, processes: int,
                    params: dict[str, Any]) -> list[tuple[Any, Any]]:
    gens = []
    for i in range(processes):
        count = total // processes + (1 if i < total % processes else 0)
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=clients.loadgen, args=(kind, url, count, params, child),
                          daemon=True)
        p.start()
        gens.append((p, parent))
    return gens


def _wait(gens: list[tuple[Any, Any]], timeout: float) -> list[Any]:
    deadline = time.time() + timeout
    replies = []
    for _process, pipe in gens:
        if not pipe.poll(max(0.1, deadline - time.time())):
            raise TimeoutError("load generator did not answer")
        replies.append(pipe.recv())
    return replies


def _finish(gens: list[tuple[Any, Any]]) -> None:
    for p, _ in gens:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def run_fanout(args: argparse.Namespace, stacks: list[str]) -> None:
    if "fanout" not in args.scenarios:
        return
    variants: list[tuple[str, str, bool]] = []
    for stack in stacks:
        for impl in STACKS[stack]:
            variants.append((stack, impl, False))
        if stack in args.polling_stacks:
            variants.append((stack, "ours", True))
    for mode in ("loop", "thread"):
        for stack, impl, polling in variants:
            label = impl + ("+poll" if polling else "")
            (server,) = start_servers([config(stack, impl, tables=["feed"], feed_mode=mode,
                                              polling=polling, feed_limit=args.feed_limit)])
            try:
                for level in args.clients:
                    # Go on past a level that misses the latency bound, to see the trend;
                    # stop once the server is saturated, updates are lost, or the run broke.
                    if not _fanout_level(args, server, stack, label, mode, level):
                        break
            finally:
                server.stop()


def _fanout_level(args: argparse.Namespace, server: ServerProcess, stack: str, impl: str,
                  mode: str, level: int) -> bool:
    processes = 1 if level <= 100 else 2
    gens = _spawn_loadgens("fanout", server.url, level, processes, {"sample_rate": 1.0})
    record: dict[str, Any] = {"scenario": "fanout", "stack": stack, "impl": impl,
                              "feed": mode, "clients": level}
    try:
        _wait(gens, 240)
        before = server.call("stats")
        first = server.call("feed_start")
        time.sleep(args.fanout_seconds)
        stopped = server.call("feed_stop")
        after = server.call("stats")
        time.sleep(2.0)  # let the last updates arrive
        for _, pipe in gens:
            pipe.send((first, stopped["last"]))
        replies = _wait(gens, 120)
    except (TimeoutError, RuntimeError, EOFError) as exc:
        for p, _ in gens:
            p.kill()
        record["error"] = str(exc)
        emit(record)
        return False
    _finish(gens)
    delivered = sum(r["delivered"] for r in replies)
    expected = sum(r["expected"] for r in replies)
    latencies = [x for r in replies for x in r["latencies"]]
    seconds = args.fanout_seconds
    record.update(rounded({
        "delivered": delivered / expected if expected else float("nan"),
        "lat_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "lat_p99_ms": clients.pct(latencies, 0.99),
        "server_cpu": (after["cpu_s"] - before["cpu_s"]) / seconds,
        "server_rss_mb": after["rss_mb"],
        "updates": stopped["last"] - first + 1,
        "late_ticks": stopped["late"],
        "closed": sum(r["closed"] for r in replies),
        "coalesced": stopped["coalesced"],
        "loadgen_cpu_s": sum(r["loadgen_cpu_s"] for r in replies),
    }))
    record["ok"] = record["delivered"] >= 0.999 and record["lat_p99_ms"] <= 100
    emit(record)
    return bool(record["delivered"] >= 0.99 and record["lat_p99_ms"] <= 300)


def run_idle(args: argparse.Namespace, stacks: list[str]) -> None:
    if "idle" not in args.scenarios:
        return
    for level in args.idle:
        for stack in stacks:
            for impl in STACKS[stack]:
                (server,) = start_servers([config(stack, impl)])
                try:
                    server.call("gc")
                    time.sleep(0.5)
                    base = server.call("stats")
                    gens = _spawn_loadgens("idle", server.url, level, 2 if level > 1000 else 1,
                                           {})
                    _wait(gens, 300)
                    time.sleep(1.0)
                    server.call("gc")
                    after = server.call("stats")
                    for _, pipe in gens:
                        pipe.send("done")
                    replies = _wait(gens, 60)
                    _finish(gens)
                finally:
                    server.stop()
                emit({"scenario": "idle", "stack": stack, "impl": impl, "connections": level,
                      **rounded({
                          "kb_per_conn": (after["rss_mb"] - base["rss_mb"]) * 1024 / level,
                          "rss_base_mb": base["rss_mb"], "rss_mb": after["rss_mb"],
                          "open": sum(r["open"] for r in replies),
                          "threads": after["threads"],
                      })})


def run_churn(args: argparse.Namespace, stacks: list[str]) -> None:
    if "churn" not in args.scenarios:
        return
    for stack in stacks:
        for impl in STACKS[stack]:
            (server,) = start_servers([config(stack, impl, count_sessions=True)])
            try:
                # Warm up at the measured concurrency, so the allocator's high-water mark
                # is reached before the start figure is taken.
                gens = _spawn_loadgens("churn", server.url, args.churn_warmup, 1,
                                       {"concurrency": 50})
                _wait(gens, 120)
                _finish(gens)
                time.sleep(1.0)
                server.call("gc")
                base = server.call("stats")
                gens = _spawn_loadgens("churn", server.url, args.churn, 1, {"concurrency": 50})
                (reply,) = _wait(gens, 600)
                _finish(gens)
                time.sleep(2.0)
                server.call("gc")
                end = server.call("stats")
            finally:
                server.stop()
            emit({"scenario": "churn", "stack": stack, "impl": impl, **rounded({
                "cycles": reply["cycles"], "failures": reply["failures"],
                "cycles_s": reply["cycles"] / reply["seconds"],
                "rss_start_mb": base["rss_mb"], "rss_end_mb": end["rss_mb"],
                "rss_change": end["rss_mb"] / base["rss_mb"] - 1,
                "sessions_start": base["sessions_wrapper"], "sessions_end": end["sessions_wrapper"],
                "observer_open_end": end["sessions_observer"],
            })})


# --- summary ------------------------------------------------------------------------------------

#: (scenario, metric, how to group, higher is better)
METRICS = [
    ("rtt", "p50_us", (), False), ("rtt", "p99_us", (), False),
    ("big", "mb_s", ("deflate",), True), ("big", "raw_mb_s", ("deflate",), True),
    ("stall", "query_s", (), False), ("stall", "ping_p99_ms", (), False),
    ("stall", "ping_max_ms", (), False),
    ("slow", "rss_growth_mb", (), False), ("slow", "healthy_p99_ms", (), False),
    ("fanout", "delivered", ("feed", "clients"), True),
    ("fanout", "lat_p50_ms", ("feed", "clients"), False),
    ("fanout", "lat_p99_ms", ("feed", "clients"), False),
    ("fanout", "server_cpu", ("feed", "clients"), False),
    ("fanout", "server_rss_mb", ("feed", "clients"), False),
    ("idle", "kb_per_conn", ("connections",), False),
    ("churn", "rss_change", (), False), ("churn", "sessions_end", (), False),
    ("churn", "cycles_s", (), True),
]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if value else "0"


def summarize(records: list[dict[str, Any]]) -> str:
    """Markdown: medians over repeats, +- half the range, and ours/reference per stack."""
    lines = ["| Scenario | Metric | Case | Stack | Ours | Reference | Ours/Ref | Other |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for scenario, metric, keys, _higher in METRICS:
        groups: dict[tuple[Any, ...], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list))
        for r in records:
            if r.get("scenario") != scenario or r.get(metric) is None:
                continue
            case = tuple(r.get(k) for k in keys)
            groups[(case, r["stack"])][r["impl"]].append(r[metric])
        local = groups.pop(((), "local"), None)
        for (case, stack), impls in sorted(groups.items(), key=lambda kv: str(kv[0])):
            def med(name: str, impls: dict[str, list[float]] = impls) -> tuple[float | None, str]:
                values = impls.get(name)
                if not values:
                    return None, ""
                m = statistics.median(values)
                spread = (max(values) - min(values)) / 2 / m * 100 if m and len(values) > 1 \
                    else 0
                return m, (f" +-{spread:.0f}%" if len(values) > 1 else "")
            ours, ours_n = med("ours")
            ref, ref_n = med("ref")
            if ref is None and stack == "asgi":
                ref_values = groups.get((case, "starlette"), {}).get("ref")
                ref = statistics.median(ref_values) if ref_values else None
                ref_n = " (starlette ref)" if ref is not None else ""
            ratio = f"{ours / ref:.2f}x" if ours is not None and ref else "-"
            other = "; ".join(f"{name} {_fmt(statistics.median(v))}"
                              for name, v in impls.items() if name not in ("ours", "ref"))
            case_text = ", ".join(f"{k}={v}" for k, v in zip(keys, case, strict=True)) or "-"
            lines.append(f"| {scenario} | {metric} | {case_text} | {stack} | "
                         f"{_fmt(ours)}{ours_n} | {_fmt(ref)}{ref_n} | {ratio} | {other} |")
        if local:
            lines.append(f"| {scenario} | {metric} | in-process local client | - | - | - | - | "
                         f"{_fmt(statistics.median(local['local']))} |")
    return "\n".join(lines)


def machine() -> str:
    import subprocess

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    return "\n".join([
        f"nproc: {multiprocessing.cpu_count()}",
        *lscpu,
        f"python {platform.python_version()}, perspective-python {perspective.__version__}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--stacks", nargs="+", choices=list(STACKS),
                        help="default: all; with --quick, starlette (ours and reference)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    quick = args.quick
    args.stacks = args.stacks or (["starlette"] if quick else list(STACKS))
    args.repeats = args.repeats or (2 if quick else 3)
    args.requests = 500 if quick else 3000
    args.big_rows = 100_000 if quick else 1_000_000
    args.heavy_rows = 300_000 if quick else 2_000_000
    args.transfers = 2
    args.queries = 1
    args.deflate = not quick
    args.deflate_repeats = 2
    args.slow_seconds = 4 if quick else 30
    args.slow_repeats = 1
    args.clients = [50, 200] if quick else [50, 200, 500, 1000]
    args.fanout_seconds = 2 if quick else 5
    # Each update costs the engine time per subscribed view in proportion to the table's rows
    # (about 1 ms per view at 10,000 rows): a short table keeps the transport's cost visible.
    args.feed_limit = 1000
    args.polling_stacks = ["starlette"] if quick else ["asgi"]
    args.idle = [1000] if quick else [1000, 5000]
    args.churn = 1000 if quick else 10_000
    args.churn_warmup = 200 if quick else 500
    _bench_server.raise_nofile()
    started = time.perf_counter()
    stacks = args.stacks
    for step in (run_queries, run_slow, run_fanout, run_idle, run_churn):
        step(args, stacks)
    args.out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    table = summarize(RESULTS)
    text = (f"# Run {stamp} ({'quick' if quick else 'full'}, "
            f"{time.perf_counter() - started:.0f} s)\n\n```\n{machine()}\n```\n\n{table}\n")
    (args.out / f"{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
