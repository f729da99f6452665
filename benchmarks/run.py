"""Our adapters side by side with Perspective's reference handlers, on the same data and stacks.

Every server runs in its own process on 127.0.0.1:0 (``_bench_server.py``); the load comes
from stock ``perspective.AsyncClient`` s over ``websockets`` in this process or in separate
load-generator processes (``_bench_client.py``). Each measurement prints one JSON line; the
end writes a markdown report: the machine, a table of targets per stack (met or not), the
settings and wall time of each scenario, and the detailed medians and ratios. See README.md.

    python benchmarks/run.py --standard                    # every target, under 10 minutes
    python benchmarks/run.py --quick                       # starlette only, about 2 minutes
    python benchmarks/run.py                               # full run, about 22 minutes
    python benchmarks/run.py --scenarios rtt big --stacks tornado --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
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
#: Wall seconds spent per scenario (and on starting the shared query servers).
TIMES: dict[str, float] = defaultdict(float)
#: CPUs the servers are pinned to (None: not pinned), and the CPUs they reported running on.
PINNING: dict[str, Any] = {"server_cpus": None, "client_cpus": None, "all_cpus": None,
                           "seen": set()}

#: The settings of each profile. The standard profile answers every target of the issue in
#: under 10 minutes on 2 cores: the short scenarios repeat (rtt 5 times, big, stall and fan-out
#: 3 times, churn in 3 rounds, idle in 3 batches), ours and the reference alternate within a
#: stack, and what a target does not need (5,000 idle connections, fan-out past 50
#: subscribers, the reference's thread-fed fan-out and slow reader, deflate) is left to the
#: full run.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "stacks": list(STACKS), "pin": False,
        "rtt_repeats": 3, "requests": 3000,
        "big_repeats": 3, "big_rows": 1_000_000, "transfers": 2, "big_local_repeats": 3,
        "deflate": True, "deflate_repeats": 2,
        "stall_repeats": 3, "heavy_rows": 2_000_000, "queries": 1,
        "slow_seconds": 30, "slow_repeats": 1, "slow_impls": ("ours", "ref"),
        "fanout_paired": False, "clients": [50, 200, 500, 1000], "fanout_seconds": 5,
        "fanout_drain": 2.0, "fanout_repeats": 1, "fanout_ref_thread": True,
        "polling_stacks": ["asgi"],
        "idle": [1000, 5000], "idle_batches": 1, "idle_warmup": 50, "idle_settle": 1.0,
        "churn": 10_000, "churn_rounds": 1, "churn_warmup": 500, "churn_concurrency": 50,
    },
    "standard": {
        "stacks": list(STACKS), "pin": True,
        "rtt_repeats": 5, "requests": 1500,
        "big_repeats": 3, "big_rows": 1_000_000, "transfers": 2, "big_local_repeats": 1,
        "deflate": False, "deflate_repeats": 0,
        # 1M rows: the query takes about 3 s on one core, 300 pings at 10 ms.
        "stall_repeats": 3, "heavy_rows": 1_000_000, "queries": 1,
        # Ours closes the slow reader 3-4.5 s after it stops reading; 8 s leaves a margin.
        "slow_seconds": 8, "slow_repeats": 1, "slow_impls": ("ours",),
        "fanout_paired": True, "clients": [50], "fanout_seconds": 2.5, "fanout_drain": 0.5,
        "fanout_repeats": 3, "fanout_ref_thread": False, "polling_stacks": [],
        "idle": [400], "idle_batches": 3, "idle_warmup": 50, "idle_settle": 0.5,
        "churn": 500, "churn_rounds": 3, "churn_warmup": 200, "churn_concurrency": 50,
    },
    "quick": {
        "stacks": ["starlette"], "pin": False,
        "rtt_repeats": 2, "requests": 500,
        "big_repeats": 2, "big_rows": 100_000, "transfers": 2, "big_local_repeats": 2,
        "deflate": False, "deflate_repeats": 0,
        "stall_repeats": 2, "heavy_rows": 300_000, "queries": 1,
        "slow_seconds": 4, "slow_repeats": 1, "slow_impls": ("ours", "ref"),
        "fanout_paired": False, "clients": [50, 200], "fanout_seconds": 2,
        "fanout_drain": 2.0, "fanout_repeats": 1, "fanout_ref_thread": True,
        "polling_stacks": ["starlette"],
        "idle": [1000], "idle_batches": 1, "idle_warmup": 50, "idle_settle": 1.0,
        "churn": 1000, "churn_rounds": 1, "churn_warmup": 200, "churn_concurrency": 50,
    },
}
#: ``--smoke``: the profile's shape with tiny counts, to check the code paths, not to measure.
SMOKE: dict[str, Any] = {
    "requests": 30, "big_rows": 20_000, "heavy_rows": 20_000, "slow_seconds": 2,
    "clients": [5], "fanout_seconds": 1, "fanout_drain": 0.5, "idle": [20], "idle_warmup": 5,
    "churn": 30, "churn_warmup": 10,
}
SMOKE_MAX_REPEATS = 2
#: The standard profile's budget, checked in the report.
STANDARD_BUDGET_S = 600


def emit(record: dict[str, Any]) -> None:
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] += time.perf_counter() - start


def alternate(items: list[Any], rep: int) -> list[Any]:
    """The order of the implementations in repeat ``rep``: flipped every other repeat."""
    return items[::-1] if rep % 2 else list(items)


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
        PINNING["seen"].update(self.call("stats")["cpus"])
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


def stop_servers(servers: list[ServerProcess]) -> None:
    for s in servers:
        s.stop()


def config(stack: str, impl: str, **extra: Any) -> dict[str, Any]:
    return {"stack": stack, "impl": impl, "deflate": False, "cpus": PINNING["server_cpus"],
            "startup_cpus": PINNING["all_cpus"], **extra}


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
    repeats = {"rtt": args.rtt_repeats, "big": args.big_repeats, "stall": args.stall_repeats}
    tables = []
    extra: dict[str, Any] = {}
    if "big" in wanted:
        tables.append("big")
        extra["big_path"] = arrow_file(args.big_rows)
    if "stall" in wanted:
        tables.append("heavy")
        extra["heavy_path"] = arrow_file(args.heavy_rows)
    if "rtt" in wanted:
        with timed("rtt"):
            for rep in range(repeats["rtt"]):
                local = clients.rtt_local(args.requests)
                emit({"scenario": "rtt", "stack": "local", "impl": "local", "rep": rep,
                      **rounded(local)})
    if "big" in wanted:
        with timed("big"):
            for rep in range(args.big_local_repeats):
                local = clients.big_local(extra["big_path"], args.transfers)
                emit({"scenario": "big", "stack": "local", "impl": "local", "rep": rep,
                      "deflate": False, **rounded(local)})
    for stack in stacks:
        impls = STACKS[stack]
        with timed("rtt/big/stall: server start"):
            servers = start_servers([config(stack, i, tables=tables, **extra) for i in impls])
        try:
            for rep in range(max(repeats[s] for s in wanted)):
                for impl, server in alternate(list(zip(impls, servers, strict=True)), rep):
                    base = {"stack": stack, "impl": impl, "rep": rep}
                    if "rtt" in wanted and rep < repeats["rtt"]:
                        with timed("rtt"):
                            r = asyncio.run(clients.rtt(server.url, args.requests))
                        emit({"scenario": "rtt", **base, **rounded(r)})
                    if "big" in wanted and rep < repeats["big"]:
                        with timed("big"):
                            r = asyncio.run(clients.big(server.url, server.raw_url,
                                                        args.transfers, False, server.call))
                        emit({"scenario": "big", **base, "deflate": False, **rounded(r)})
                    if "stall" in wanted and rep < repeats["stall"]:
                        with timed("stall"):
                            r = asyncio.run(clients.stall(server.url, args.queries))
                        emit({"scenario": "stall", **base, **rounded(r)})
        finally:
            stop_servers(servers)
        if "big" in wanted and args.deflate and stack in ("asgi", "starlette"):
            with timed("big"):
                servers = start_servers([
                    config(stack, i, tables=["big"], deflate=True, **extra) for i in impls
                ])
                try:
                    for rep in range(args.deflate_repeats):
                        for impl, server in zip(impls, servers, strict=True):
                            r = asyncio.run(clients.big(server.url, server.raw_url, 1, True))
                            emit({"scenario": "big", "stack": stack, "impl": impl, "rep": rep,
                                  "deflate": True, **rounded(r)})
                finally:
                    stop_servers(servers)


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
    # Our core logs the 1013 close; the observer's record of it is the fallback.
    t_close = end["overflow_at"] or (end["closed_at"] or {}).get(1013)
    result = {
        "feed_mb_s": rate / 1e6,
        "rss_base_mb": base["rss_mb"],
        "rss_max_mb": max(rss),
        "rss_end_mb": end["rss_mb"],
        "rss_growth_mb": max(rss) - base["rss_mb"],
        "closed_1013": t_close is not None,
        "close_codes": {str(k): v for k, v in codes.items()},
        "closed_after_s": None if t_close is None else t_close - stalled_at,
        "send_queue_mb": end["send_queue_bytes"] / 2**20,
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
    with timed("slow"):
        for rep in range(args.slow_repeats):
            for stack in stacks:
                for impl in STACKS[stack]:
                    if impl not in args.slow_impls:
                        continue
                    (server,) = start_servers([config(
                        stack, impl, tables=["feed"], feed_hz=50, feed_rows=2000,
                        feed_width=8, feed_mode="loop", feed_limit=10000,
                    )])
                    try:
                        r = asyncio.run(_slow_reader(server, args.slow_seconds))
                    finally:
                        server.stop()
                    emit({"scenario": "slow", "stack": stack, "impl": impl, "rep": rep,
                          **rounded(r)})


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _spawn_loadgens(kind: str, url: str, total: int, processes: int,
                    params: dict[str, Any]) -> list[tuple[Any, Any]]:
    gens = []
    for i in range(processes):
        own = dict(params)
        if "batches" in params:
            own["batches"] = [_share(b, processes, i) for b in params["batches"]]
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=clients.loadgen,
                          args=(kind, url, _share(total, processes, i), own, child),
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


def _tell(gens: list[tuple[Any, Any]], message: Any) -> None:
    for _, pipe in gens:
        with contextlib.suppress(OSError):
            pipe.send(message)


def _finish(gens: list[tuple[Any, Any]], message: Any = "done") -> None:
    """Tell the load generators ``message`` (None: they are ending already) and reap them."""
    if message is not None:
        _tell(gens, message)
    for p, _ in gens:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def _kill(gens: list[tuple[Any, Any]]) -> None:
    for p, _ in gens:
        p.kill()
        p.join()


def _fanout_window(args: argparse.Namespace, server: ServerProcess,
                   gens: list[tuple[Any, Any]], mode: str) -> dict[str, Any]:
    """Feed for ``args.fanout_seconds`` from the loop or a thread; what the clients got."""
    before = server.call("stats")
    started = time.perf_counter()
    first = server.call("feed_start", mode)
    time.sleep(args.fanout_seconds)
    stopped = server.call("feed_stop")
    after = server.call("stats")
    elapsed = time.perf_counter() - started
    time.sleep(args.fanout_drain)  # let the last updates arrive
    _tell(gens, (first, stopped["last"]))
    replies = _wait(gens, 120)
    delivered = sum(r["delivered"] for r in replies)
    expected = sum(r["expected"] for r in replies)
    latencies = [x for r in replies for x in r["latencies"]]
    record = rounded({
        "delivered": delivered / expected if expected else float("nan"),
        "lat_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "lat_p99_ms": clients.pct(latencies, 0.99),
        "server_cpu": (after["cpu_s"] - before["cpu_s"]) / elapsed,
        "server_rss_mb": after["rss_mb"],
        "updates": stopped["last"] - first + 1,
        "late_ticks": stopped["late"],
        "closed": sum(r["closed"] for r in replies),
        "coalesced": stopped["coalesced"],
        "loadgen_cpu_s": sum(r["loadgen_cpu_s"] for r in replies),
    })
    # Which updates of the window someone missed (offsets from its first), if any.
    record["missing"] = sorted({m for r in replies for m in r.get("missing", [])})[:10]
    record["ok"] = record["delivered"] >= 0.999 and record["lat_p99_ms"] <= 100
    return record


def _fanout_processes(level: int, spare: bool = False) -> int:
    if spare and level > 500:
        return 3  # one more, to use the server core's idle time
    return 1 if level <= 100 else 2


def _fanout_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"sample_rate": 1.0, "decode_every": args.decode_every}
    if args.loadgen_spare_cpu:
        params["spare_cpus"] = PINNING["all_cpus"]
    return params


def run_fanout(args: argparse.Namespace, stacks: list[str]) -> None:
    if "fanout" not in args.scenarios:
        return
    with timed("fanout"):
        if args.fanout_paired:
            _fanout_paired(args, stacks)
        else:
            _fanout_levels(args, stacks)


def _fanout_paired(args: argparse.Namespace, stacks: list[str]) -> None:
    """Per stack, ours and the reference subscribed at once, measured in alternation.

    Each server keeps its subscribers between windows, so a repeat costs one feed window,
    not a server and load-generator start; the feed's mode is chosen per window.
    """
    for stack in stacks:
        impls = STACKS[stack]
        for level in args.clients:
            servers = start_servers([config(stack, i, tables=["feed"],
                                             feed_limit=args.feed_limit) for i in impls])
            processes = _fanout_processes(level, args.loadgen_spare_cpu)
            gens = [_spawn_loadgens("fanout", s.url, level, processes, _fanout_params(args))
                    for s in servers]
            ok = False
            try:
                for gen in gens:
                    _wait(gen, 240)
                ok = _fanout_windows(args, stack, level, list(zip(impls, servers, gens,
                                                                   strict=True)))
            except (TimeoutError, RuntimeError, EOFError) as exc:
                emit({"scenario": "fanout", "stack": stack, "clients": level,
                      "error": str(exc)})
            finally:
                for gen in gens:
                    _finish(gen) if ok else _kill(gen)
                stop_servers(servers)


def _fanout_windows(args: argparse.Namespace, stack: str, level: int,
                    cases: list[tuple[str, ServerProcess, list[tuple[Any, Any]]]]) -> bool:
    """The alternated windows of one stack; False once one of them failed."""
    for rep in range(args.fanout_repeats):
        for mode in ("loop", "thread"):
            for impl, server, gen in alternate(cases, rep):
                if mode == "thread" and impl == "ref" and not args.fanout_ref_thread:
                    continue
                record: dict[str, Any] = {"scenario": "fanout", "stack": stack, "impl": impl,
                                          "feed": mode, "clients": level, "rep": rep}
                try:
                    record.update(_fanout_window(args, server, gen, mode))
                except (TimeoutError, RuntimeError, EOFError) as exc:
                    record["error"] = str(exc)
                    emit(record)
                    return False
                emit(record)
    return True


def _fanout_levels(args: argparse.Namespace, stacks: list[str]) -> None:
    """Rising subscriber counts per implementation and feed, a fresh server per series."""
    variants: list[tuple[str, str, bool]] = []
    for stack in stacks:
        for impl in STACKS[stack]:
            variants.append((stack, impl, False))
        if stack in args.polling_stacks:
            variants.append((stack, "ours", True))
    for mode in args.feeds:
        for stack, impl, polling in variants:
            if mode == "thread" and impl == "ref" and not args.fanout_ref_thread:
                continue
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
    gens = _spawn_loadgens("fanout", server.url, level,
                           _fanout_processes(level, args.loadgen_spare_cpu), _fanout_params(args))
    record: dict[str, Any] = {"scenario": "fanout", "stack": stack, "impl": impl,
                              "feed": mode, "clients": level}
    try:
        _wait(gens, 240)
        record.update(_fanout_window(args, server, gens, mode))
    except (TimeoutError, RuntimeError, EOFError) as exc:
        _kill(gens)
        record["error"] = str(exc)
        emit(record)
        return False
    _finish(gens)
    emit(record)
    return bool(record["delivered"] >= 0.99 and record["lat_p99_ms"] <= 300)


def run_idle(args: argparse.Namespace, stacks: list[str]) -> None:
    """Idle connections in batches on fresh servers; each batch is one sample of KB/connection.

    A small warm-up batch first takes the one-off costs (worker threads and their allocator
    arenas, lazily imported modules) out of the per-connection figure.
    """
    if "idle" not in args.scenarios:
        return
    with timed("idle"):
        for level in args.idle:
            for stack in stacks:
                impls = STACKS[stack]
                servers = start_servers([config(stack, i) for i in impls])
                try:
                    for impl, server in zip(impls, servers, strict=True):
                        _idle_case(args, server, stack, impl, level)
                finally:
                    stop_servers(servers)


def _idle_case(args: argparse.Namespace, server: ServerProcess, stack: str, impl: str,
               level: int) -> None:
    warm = [args.idle_warmup] if args.idle_warmup else []
    batches = warm + [level] * args.idle_batches
    server.call("gc")
    time.sleep(0.5)
    previous = server.call("stats")
    gens = _spawn_loadgens("idle", server.url, 0, 2 if level > 1000 else 1,
                           {"batches": batches})
    records = []
    try:
        for index, size in enumerate(batches):
            _wait(gens, 300)
            time.sleep(args.idle_settle)
            server.call("gc")
            after = server.call("stats")
            if index >= len(warm):
                records.append({
                    "scenario": "idle", "stack": stack, "impl": impl, "connections": level,
                    "rep": index - len(warm), **rounded({
                        "kb_per_conn": (after["rss_mb"] - previous["rss_mb"]) * 1024 / size,
                        "rss_base_mb": previous["rss_mb"], "rss_mb": after["rss_mb"],
                        "threads": after["threads"],
                    })})
            previous = after
            _tell(gens, "next" if index < len(batches) - 1 else "done")
        replies = _wait(gens, 60)
    except (TimeoutError, RuntimeError, EOFError) as exc:
        _kill(gens)
        emit({"scenario": "idle", "stack": stack, "impl": impl, "connections": level,
              "error": str(exc)})
        return
    _finish(gens, None)
    still_open = sum(r["open"] for r in replies)
    for record in records:
        emit({**record, "open": still_open, "connected": sum(batches)})


def run_churn(args: argparse.Namespace, stacks: list[str]) -> None:
    """Connect/open/view/drop cycles in rounds, ours and the reference alternating."""
    if "churn" not in args.scenarios:
        return
    with timed("churn"):
        for stack in stacks:
            _churn_stack(args, stack)


def _churn_round(gen: list[tuple[Any, Any]], cycles: int) -> dict[str, Any]:
    _tell(gen, cycles)
    (reply,) = _wait(gen, 120 + cycles / 20)
    return dict(reply)


def _churn_stack(args: argparse.Namespace, stack: str) -> None:
    impls = STACKS[stack]
    servers = start_servers([config(stack, i, count_sessions=True) for i in impls])
    gens = [_spawn_loadgens("churn", s.url, 0, 1, {"concurrency": args.churn_concurrency})
            for s in servers]
    try:
        if args.churn_warmup:
            # Warm up at the measured concurrency, so the allocator's high-water mark is
            # reached before the start figure is taken.
            for gen in gens:
                _churn_round(gen, args.churn_warmup)
        time.sleep(1.0)
        bases = []
        for server in servers:
            server.call("gc")
            bases.append(server.call("stats"))
        cycles = dict.fromkeys(impls, 0)
        for rep in range(args.churn_rounds):
            for impl, gen in alternate(list(zip(impls, gens, strict=True)), rep):
                reply = _churn_round(gen, args.churn)
                cycles[impl] += reply["cycles"]
                emit({"scenario": "churn", "stack": stack, "impl": impl, "rep": rep,
                      **rounded({
                          "cycles": reply["cycles"], "failures": reply["failures"],
                          "cycles_s": reply["cycles"] / reply["seconds"],
                          "loadgen_cpu": reply["loadgen_cpu"],
                      })})
                time.sleep(0.3)  # the aborted connections' clean-up, before the other runs
        time.sleep(2.0)
        for impl, server, base in zip(impls, servers, bases, strict=True):
            server.call("gc")
            end = server.call("stats")
            emit({"scenario": "churn", "stack": stack, "impl": impl, **rounded({
                "cycles_total": cycles[impl],
                "rss_start_mb": base["rss_mb"], "rss_end_mb": end["rss_mb"],
                "rss_change": end["rss_mb"] / base["rss_mb"] - 1,
                "sessions_start": base["sessions_wrapper"],
                "sessions_end": end["sessions_wrapper"],
                "observer_open_end": end["sessions_observer"],
            })})
    except (TimeoutError, RuntimeError, EOFError) as exc:
        emit({"scenario": "churn", "stack": stack, "error": str(exc)})
        for gen in gens:
            _kill(gen)
        gens = []
    finally:
        for gen in gens:
            _finish(gen)
        stop_servers(servers)


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """The median of a metric over repeats, with half the range between them."""

    median: float
    half_range: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        values = [v for v in values if v == v]  # drop NaN
        if not values:
            return None
        return cls(statistics.median(values), (max(values) - min(values)) / 2, len(values))

    def text(self, unit: str = "") -> str:
        spread = ""
        if self.n > 1 and self.median:
            spread = f" ±{self.half_range / abs(self.median) * 100:.0f}%"
        return f"{_fmt(self.median)}{unit}{spread} (n={self.n})"


def _values(records: list[dict[str, Any]], scenario: str, metric: str, stack: str, impl: str,
            **match: Any) -> list[float]:
    return [
        float(r[metric]) for r in records
        if r.get("scenario") == scenario and r.get("stack") == stack and r.get("impl") == impl
        and isinstance(r.get(metric), int | float) and not isinstance(r.get(metric), bool)
        and all(r.get(k) == v for k, v in match.items())
    ]


def _reference(stack: str) -> str:
    """The stack whose reference handler ours is compared with."""
    return "starlette" if stack == "asgi" else stack


def _verdict(value: float, limit: float, higher: bool, band: tuple[float, float] | None) -> str:
    met = value >= limit if higher else value <= limit
    text = "**yes**" if met else "**no**"
    if band is not None and band[0] <= limit <= band[1]:
        text += " (within spread)"
    return text


def _ratio_row(name: str, ours: Stat | None, ref: Stat | None, limit: float,
               higher: bool, unit: str = "") -> list[str]:
    goal = f"{'>=' if higher else '<='} {limit:g}x"
    if ours is None or ref is None or not ref.median:
        return [name, ours.text(unit) if ours else "not measured",
                ref.text(unit) if ref else "not measured", "-", goal, "not measured"]
    ratio = ours.median / ref.median
    low = (ours.median - ours.half_range) / (ref.median + ref.half_range)
    high_denominator = ref.median - ref.half_range
    high = (ours.median + ours.half_range) / high_denominator if high_denominator > 0 \
        else float("inf")
    band = (low, high) if ours.n > 1 or ref.n > 1 else None
    return [name, ours.text(unit), ref.text(unit), f"{ratio:.2f}x", goal,
            _verdict(ratio, limit, higher, band)]


def _absolute_row(name: str, ours: Stat | None, ref: Stat | None, limit: float, unit: str,
                  extra: bool = True) -> list[str]:
    goal = f"<= {limit:g}{unit}"
    if ours is None:
        return [name, "not measured", ref.text(unit) if ref else "-", "-", goal, "not measured"]
    band = (ours.median - ours.half_range, ours.median + ours.half_range) if ours.n > 1 \
        else None
    verdict = _verdict(ours.median, limit, False, band) if extra else "**no**"
    return [name, ours.text(unit), ref.text(unit) if ref else "-", "-", goal, verdict]


def target_rows(records: list[dict[str, Any]], stack: str) -> list[list[str]]:
    """One row per target of the issue: ours, reference, ratio, goal, met."""
    ref_stack = _reference(stack)

    def pair(scenario: str, metric: str, **match: Any) -> tuple[Stat | None, Stat | None]:
        return (Stat.of(_values(records, scenario, metric, stack, "ours", **match)),
                Stat.of(_values(records, scenario, metric, ref_stack, "ref", **match)))

    rows = []
    levels = sorted({r["connections"] for r in records
                     if r.get("scenario") == "idle" and "kb_per_conn" in r})
    idle = pair("idle", "kb_per_conn", connections=levels[-1]) if levels else (None, None)
    label = f"Idle connection, KB of RSS ({levels[-1]:,} connections)" if levels \
        else "Idle connection, KB of RSS"
    rows.append(_ratio_row(label, *idle, 1.0, False))
    rows.append(_ratio_row("`table.size()` round trip p50, µs", *pair("rtt", "p50_us"), 1.0,
                           False))
    big_bytes = next((r["bytes"] for r in records if r.get("scenario") == "big"), None)
    big = f"`to_arrow()` ({big_bytes / 1e6:.0f} MB)" if big_bytes else "`to_arrow()`"
    rows.append(_ratio_row(f"{big}, MB/s", *pair("big", "mb_s", deflate=False), 0.95, True))
    rows.append(_ratio_row(f"{big}, server RSS rise, MiB",
                           *pair("big", "rss_rise_mb", deflate=False), 1.05, False))
    rows.append(_ratio_row("Heavy query (group-by), s", *pair("stall", "query_s"), 1.05, False))
    rows.append(_absolute_row("Other client's pings during it, p99 ms",
                              *pair("stall", "ping_p99_ms"), 5, " ms"))
    # The targets are set at 50 subscribers; a run without that level uses its smallest.
    subscribers = sorted({r["clients"] for r in records
                          if r.get("scenario") == "fanout" and "server_cpu" in r})
    level = 50 if 50 in subscribers or not subscribers else subscribers[0]
    rows.append(_ratio_row(f"Server CPU, {level} loop-fed subscribers, cores",
                           *pair("fanout", "server_cpu", feed="loop", clients=level), 1.0,
                           False))
    rows.append(_ratio_row("Connect/open/view/drop churn, cycles/s", *pair("churn", "cycles_s"),
                           0.9, True))
    rows.append(_slow_row(records, stack))
    loop_p50 = Stat.of(_values(records, "fanout", "lat_p50_ms", stack, "ours", feed="loop",
                               clients=level))
    thread_p50 = Stat.of(_values(records, "fanout", "lat_p50_ms", stack, "ours",
                                 feed="thread", clients=level))
    row = _ratio_row(f"Thread-fed delivery p50, ms (ours, {level} subscribers; against "
                     "loop-fed)", thread_p50, loop_p50, 1.2, False, " ms")
    row[2] = f"loop-fed: {row[2]}"
    rows.append(row)
    return rows


def _slow_row(records: list[dict[str, Any]], stack: str) -> list[str]:
    ours = [r for r in records if r.get("scenario") == "slow" and r.get("stack") == stack
            and r.get("impl") == "ours" and "rss_growth_mb" in r]
    ref = Stat.of(_values(records, "slow", "rss_growth_mb", _reference(stack), "ref"))
    name = "Slow reader: RSS growth, MiB, and closed with 1013"
    if not ours:
        row = _absolute_row(name, None, ref, 0, " MiB")
        row[4] = f"<= {SLOW_RSS_MARGIN:g} x send-queue bound, and closed"
        return row
    bound = ours[0]["send_queue_mb"] * SLOW_RSS_MARGIN
    growth = Stat.of([r["rss_growth_mb"] for r in ours])
    closed = sum(1 for r in ours if r["closed_1013"])
    row = _absolute_row(name, growth, ref, round(bound, 1), " MiB", closed == len(ours))
    after = [r["closed_after_s"] for r in ours if r["closed_after_s"] is not None]
    when = f", after {_fmt(statistics.median(after))} s" if after else ""
    row[1] += f"; closed {closed}/{len(ours)}{when}"
    row[4] += " and closed"
    return row


#: RSS may rise by the send-queue bound plus this margin (the web server's own write buffer).
SLOW_RSS_MARGIN = 1.10


def _table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


STACK_TEXT = {
    "asgi": "ours: `PerspectiveASGIApp` on uvicorn; reference: `PerspectiveStarletteHandler` "
            "on the same uvicorn (the raw ASGI app has no reference of its own)",
    "starlette": "ours: `PerspectiveWebSocketRoute`; reference: `PerspectiveStarletteHandler`; "
                 "both on Starlette + uvicorn",
    "tornado": "ours and the reference `PerspectiveTornadoHandler` on Tornado",
    "aiohttp": "ours and the reference `PerspectiveAIOHTTPHandler` on aiohttp",
}


def targets_section(records: list[dict[str, Any]], stacks: list[str]) -> str:
    per_stack = {stack: target_rows(records, stack) for stack in stacks}
    names = [row[0] for row in next(iter(per_stack.values()))]
    overview = [[name] + [_short(per_stack[s][i][5]) for s in stacks]
                for i, name in enumerate(names)]
    parts = ["## Targets", "",
             "Medians over repeats, ± half the range between them, n = repeats. A ratio is "
             "ours over the reference's median; \"within spread\" means the goal lies "
             "between the ratios the ± ranges allow, so one more run could flip it.", "",
             _table(["Target", *stacks], overview)]
    header = ["Target", "Ours", "Reference", "Ours/Ref", "Goal", "Met"]
    for stack in stacks:
        parts += ["", f"### {stack}", "", STACK_TEXT[stack] + ".", "",
                  _table(header, per_stack[stack], {1, 2, 3})]
    return "\n".join(parts)


def _short(verdict: str) -> str:
    return verdict.replace("**", "").replace(" (within spread)", " (±)")


# --- detailed tables ----------------------------------------------------------------------------

#: (scenario, metric, how to group, higher is better)
METRICS = [
    ("rtt", "p50_us", (), False), ("rtt", "p99_us", (), False),
    ("big", "mb_s", ("deflate",), True), ("big", "raw_mb_s", ("deflate",), True),
    ("big", "rss_rise_mb", ("deflate",), False),
    ("stall", "query_s", (), False), ("stall", "ping_p50_ms", (), False),
    ("stall", "ping_p99_ms", (), False), ("stall", "ping_max_ms", (), False),
    ("slow", "rss_growth_mb", (), False), ("slow", "closed_after_s", (), False),
    ("slow", "healthy_p99_ms", (), False),
    ("fanout", "delivered", ("feed", "clients"), True),
    ("fanout", "lat_p50_ms", ("feed", "clients"), False),
    ("fanout", "lat_p99_ms", ("feed", "clients"), False),
    ("fanout", "server_cpu", ("feed", "clients"), False),
    ("fanout", "server_rss_mb", ("feed", "clients"), False),
    ("idle", "kb_per_conn", ("connections",), False),
    ("churn", "cycles_s", (), True), ("churn", "loadgen_cpu", (), False),
    ("churn", "rss_change", (), False), ("churn", "sessions_end", (), False),
]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:
        return "nan"
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
            value = r.get(metric)
            if r.get("scenario") != scenario or value is None or isinstance(value, bool):
                continue
            case = tuple(r.get(k) for k in keys)
            groups[(case, r["stack"])][r["impl"]].append(value)
        local = {key: impls for key, impls in groups.items() if key[1] == "local"}
        for key in local:
            del groups[key]
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
        for (case, _stack), impls in local.items():
            case_text = ", ".join(["in-process local client", *(
                f"{k}={v}" for k, v in zip(keys, case, strict=True))])
            lines.append(f"| {scenario} | {metric} | {case_text} | - "
                         f"| - | - | - | {_fmt(statistics.median(impls['local']))} |")
    return "\n".join(lines)


def settings_rows(args: argparse.Namespace) -> list[list[str]]:
    """What each scenario ran with in this profile, and how long it took."""
    fanout = (f"{', '.join(map(str, args.clients))} subscribers, "
              f"{args.fanout_seconds} s windows of 100-row batches at 20 Hz")
    if args.loadgen_spare_cpu:
        fanout += "; load generators also on the server's CPU, at SCHED_IDLE priority"
    if args.decode_every > 1:
        fanout += (f"; every {args.decode_every}th subscriber decodes its updates, the others "
                   "count messages")
    if args.fanout_paired:
        fanout += (f"; ours and the reference subscribed at once, {args.fanout_repeats} "
                   "alternated windows per feed (loop, thread"
                   + ("" if args.fanout_ref_thread else "; thread-fed for ours only") + ")")
    else:
        fanout += "; rising levels, a fresh server per implementation and feed"
    idle_warm = f" after a warm-up batch of {args.idle_warmup}" if args.idle_warmup else ""
    described = {
        "rtt": f"{args.requests:,} sequential `table.size()` after 200 warm-up, "
               f"{args.rtt_repeats} repeats",
        "big": f"`to_arrow()` of {args.big_rows:,} rows, 1 warm-up + {args.transfers} per "
               f"repeat, {args.big_repeats} repeats"
               + (f"; deflate {args.deflate_repeats} more" if args.deflate else ""),
        "stall": f"group-by over {args.heavy_rows:,} rows, {args.queries} per repeat, "
                 f"{args.stall_repeats} repeats; pings every 10 ms",
        "rtt/big/stall: server start": "one server per implementation, loading the tables",
        "slow": f"{args.slow_seconds} s after the reader stops, "
                f"{'ours only' if tuple(args.slow_impls) == ('ours',) else 'ours and reference'}",
        "fanout": fanout,
        "idle": f"{', '.join(f'{n:,}' for n in args.idle)} connections, "
                f"{args.idle_batches} batches{idle_warm}",
        "churn": f"{args.churn:,} cycles, 50 at a time, {args.churn_rounds} rounds after "
                 f"{args.churn_warmup:,} warm-up",
    }
    rows = [[name, described.get(name, ""), f"{TIMES[name]:.0f}"] for name in described
            if name in TIMES]
    rows.append(["total", "", f"{sum(TIMES.values()):.0f}"])
    return rows


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _memory_gib() -> str:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _commit() -> str:
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=HERE.parent, capture_output=True,
                              text=True, check=False).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        # Untracked files (earlier results) are not changes to the code under test.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "perspective_asgi",
                    "benchmarks")
    except OSError:
        return "unknown"
    return head + (" (with uncommitted changes in perspective_asgi/ or benchmarks/)"
                   if dirty else "")


def machine(load_before: tuple[float, float, float]) -> list[str]:
    cpu = _lscpu()
    threads = cpu.get("Thread(s) per core", "?")
    model = cpu.get("Model name", platform.processor() or "unknown")
    hypervisor = cpu.get("Hypervisor vendor")
    if PINNING["server_cpus"] is None:
        pinning = "none: servers and load generators share every CPU"
    else:
        seen = ", ".join(map(str, sorted(PINNING["seen"]))) or "?"
        pinning = (f"each server on CPU {', '.join(map(str, PINNING['server_cpus']))} "
                   f"(its threads reported CPU {seen}); this process and the load generators "
                   f"on CPU {', '.join(map(str, PINNING['client_cpus']))}")
    frameworks = ", ".join(f"{name} {_version(name)}" for name in (
        "uvicorn", "starlette", "tornado", "aiohttp", "websockets", "anyio", "pyarrow"))
    load_after = os.getloadavg()
    return [
        f"- CPU: {model}, {os.cpu_count()} CPUs ({threads} thread(s) per core"
        + (f", {hypervisor} guest" if hypervisor else "") + ")",
        f"- Memory: {_memory_gib()}",
        f"- Kernel: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"perspective-python {perspective.__version__}; {frameworks}",
        f"- Pinning: {pinning}",
        f"- Load average (1 min) before and after the run: {load_before[0]:.2f}, "
        f"{load_after[0]:.2f}",
        f"- Commit: {_commit()}",
    ]


def report(args: argparse.Namespace, stamp: str, seconds: float,
           load_before: tuple[float, float, float]) -> str:
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    out = args.out.resolve()
    raw = out / f"{stamp}.jsonl"
    raw_text = str(raw.relative_to(HERE)) if out.is_relative_to(HERE) else str(raw)
    budget = ""
    if args.profile == "standard" and not args.smoke:
        over = "" if seconds <= STANDARD_BUDGET_S else " (over budget)"
        budget = f" (budget {STANDARD_BUDGET_S} s{over})"
    smoke = "\n\n**Smoke run: tiny counts, the figures mean nothing.**" if args.smoke else ""
    return "\n".join([
        f"# Benchmark run {stamp}: {args.profile} profile",
        "",
        f"`{command.strip()}`, {seconds:.0f} s{budget}. Raw JSON lines: "
        f"`{raw_text}`.{smoke}",
        "",
        "## Machine",
        "",
        *machine(load_before),
        "",
        targets_section(RESULTS, args.stacks),
        "",
        "## Scenarios: settings and wall time",
        "",
        _table(["Scenario", "Settings", "Wall s"], settings_rows(args), {2}),
        "",
        "## Detailed results",
        "",
        "Medians over repeats; \"+-x%\" is half the range between repeats; the reference for "
        "`asgi` is the Starlette reference handler on the same uvicorn; \"Other\" holds the "
        "in-process floor and the `ours+poll` variant.",
        "",
        summarize(RESULTS),
        "",
    ])


def apply_profile(args: argparse.Namespace) -> None:
    settings = dict(PROFILES[args.profile])
    if args.smoke:
        settings.update(SMOKE)
        for key in ("rtt_repeats", "big_repeats", "stall_repeats", "big_local_repeats",
                    "deflate_repeats", "fanout_repeats", "idle_batches", "churn_rounds"):
            settings[key] = min(settings[key], SMOKE_MAX_REPEATS)
    if args.repeats:
        for key in ("rtt_repeats", "big_repeats", "stall_repeats"):
            settings[key] = args.repeats
    if args.pin is not None:
        settings["pin"] = args.pin
    args.stacks = args.stacks or settings.pop("stacks")
    settings.pop("stacks", None)
    for key, value in settings.items():
        setattr(args, key, value)
    # Each update costs the engine time per subscribed view in proportion to the table's rows
    # (about 1 ms per view at 10,000 rows): a short table keeps the transport's cost visible.
    args.feed_limit = 1000


def pin(args: argparse.Namespace) -> None:
    """Servers on the first allowed CPU, this process and its load generators on the rest."""
    if not args.pin:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print(f"not pinning: only CPU {cpus} is available", file=sys.stderr)
        args.pin = False
        return
    PINNING["all_cpus"] = cpus
    PINNING["server_cpus"] = cpus[:1]
    PINNING["client_cpus"] = cpus[1:]
    # Spawned children inherit this affinity; each server then pins itself to its own CPU.
    _bench_server.pin_process(set(cpus[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--standard", dest="profile", action="store_const", const="standard",
                         help="every target, every stack, pinned, under 10 minutes on 2 cores")
    profile.add_argument("--quick", dest="profile", action="store_const", const="quick",
                         help="starlette only, short cases, about 2 minutes")
    parser.set_defaults(profile="full")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--stacks", nargs="+", choices=list(STACKS),
                        help="default: all; with --quick, starlette (ours and reference)")
    parser.add_argument("--repeats", type=int, help="repeats of rtt, big and stall")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                        help="servers on one CPU, load on the others (default: --standard only)")
    parser.add_argument("--out", type=Path,
                        help="where the report goes (default: benchmarks/results)")
    parser.add_argument("--clients", nargs="+", type=int,
                        help="fan-out subscriber counts (default: the profile's)")
    parser.add_argument("--feeds", nargs="+", choices=["loop", "thread"],
                        default=["loop", "thread"], help="fan-out feeds")
    parser.add_argument("--decode-every", type=int, default=1, metavar="N",
                        help="fan-out: only every Nth subscriber decodes its updates (latency "
                             "and sequence check), the others count messages (default 1)")
    parser.add_argument("--loadgen-spare-cpu", action="store_true",
                        help="fan-out: load generators also use the server CPU's idle time, "
                             "at SCHED_IDLE priority (with --pin)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # A smoke run checks the code paths; its report must not land among the results.
    args.out = args.out or (Path("/tmp/perspective_asgi_bench_smoke") if args.smoke
                            else HERE / "results")
    clients = args.clients
    apply_profile(args)
    args.clients = clients or args.clients
    _bench_server.raise_nofile()
    pin(args)
    load_before = os.getloadavg()
    started = time.perf_counter()
    stacks = args.stacks
    for step in (run_queries, run_slow, run_fanout, run_idle, run_churn):
        step(args, stacks)
    seconds = time.perf_counter() - started
    args.out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    text = report(args, stamp, seconds, load_before)
    (args.out / f"{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
