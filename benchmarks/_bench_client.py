"""Load generators of ``run.py``: stock ``perspective.AsyncClient`` s over ``websockets``.

The coroutines here run in the parent (rtt, big, stall, slow reader) or in load-generator
processes started with ``loadgen`` (fan-out, idle, churn), which keep their connections between
rounds and talk to the parent over a pipe:

- fan-out: connect and subscribe, send "ready"; then for each ``(first, last)`` window the
  parent sends, reply with what arrived of those batches; "done" closes everything.
- viewer: the same protocol, with subscribers that read a window after each notification.
- idle: connect each batch of ``params["batches"]``, send "ready" after each; "next" connects
  the next batch, "done" replies with how many are still open and closes everything.
- churn: for each cycle count the parent sends, run that many cycles and reply; "done" ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import perspective
import pyarrow as pa
import websockets

OPEN_TIMEOUT = 120


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Client:
    """A ``perspective.AsyncClient`` over one websocket, read by a pump task."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.perspective = perspective.AsyncClient(self._send)
        self.close_code: int | None = None
        self.closed_at: float | None = None
        #: Once set, messages are counted here and not decoded (``_fanout``'s light subscribers).
        self.counted: int | None = None
        self._reader = asyncio.create_task(self._pump())

    @classmethod
    async def connect(cls, url: str, deflate: bool = False) -> Client:
        ws = await websockets.connect(
            url, max_size=None, compression="deflate" if deflate else None,
            open_timeout=OPEN_TIMEOUT, ping_interval=None, close_timeout=2,
        )
        return cls(ws)

    async def _send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def _pump(self) -> None:
        try:
            async for message in self.ws:
                if self.counted is not None:
                    self.counted += 1
                    continue
                result = self.perspective.handle_response(message)
                if inspect.isawaitable(result):
                    await result
        except websockets.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code
        self.closed_at = time.time()

    def stop_reading(self) -> None:
        """Stop reading: websockets pauses the socket once its small queue fills."""
        self._reader.cancel()

    def abort(self) -> None:
        self._reader.cancel()
        self.ws.transport.abort()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def rtt(url: str, requests: int) -> dict[str, Any]:
    client = await Client.connect(url)
    table = await client.perspective.open_table("small")
    for _ in range(200):
        await table.size()
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        await table.size()
        samples.append((time.perf_counter() - start) * 1e6)
    await client.close()
    return {"p50_us": statistics.median(samples), "p99_us": pct(samples, 0.99)}


def rtt_local(requests: int) -> dict[str, Any]:
    server = perspective.Server()
    table = server.new_local_client().table({"x": list(range(10))}, name="small")
    for _ in range(200):
        table.size()
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        table.size()
        samples.append((time.perf_counter() - start) * 1e6)
    return {"p50_us": statistics.median(samples), "p99_us": pct(samples, 0.99)}


async def big(url: str, raw_url: str, transfers: int, deflate: bool,
              probe: Callable[..., Any] | None = None) -> dict[str, Any]:
    """``view.to_arrow()`` of the "big" table, and the same bytes from the stack's raw route.

    With ``probe`` (the server's control call), each ``to_arrow`` is bracketed by a trim and
    peak reset before and the peak RSS after: ``rss_rise_mb`` is how far the server's RSS rose
    above its live memory while it served the reply.
    """
    loop = asyncio.get_running_loop()

    async def control(*command: Any) -> Any:
        assert probe is not None
        return await loop.run_in_executor(None, probe, *command)

    client = await Client.connect(url, deflate)
    view = await (await client.perspective.open_table("big")).view()
    raw = await websockets.connect(
        raw_url, max_size=None, compression="deflate" if deflate else None,
        open_timeout=OPEN_TIMEOUT, ping_interval=None,
    )
    rises: list[float] = []

    async def to_arrow() -> tuple[bytes, float]:
        base = await control("trim") if probe is not None else 0.0
        start = time.perf_counter()
        arrow = await view.to_arrow()
        wall = time.perf_counter() - start
        if probe is not None:
            rises.append((await control("stats"))["hwm_mb"] - base)
        return arrow, wall

    size = len((await to_arrow())[0])  # warm-up
    await raw.send(b"x")
    await raw.recv()
    ours, ceiling = [], []
    for _ in range(transfers):
        arrow, wall = await to_arrow()
        ours.append(wall)
        start = time.perf_counter()
        await raw.send(b"x")
        data = await raw.recv()
        ceiling.append(time.perf_counter() - start)
        assert len(data) == len(arrow) == size, (len(data), len(arrow), size)
    await raw.close()
    await view.delete()
    await client.close()
    result: dict[str, Any] = {
        "bytes": size,
        "mb_s": size / 1e6 / statistics.median(ours),
        "raw_mb_s": size / 1e6 / statistics.median(ceiling),
    }
    if rises:
        result["rss_rise_mb"] = statistics.median(rises[1:] or rises)
        result["rss_rise_warmup_mb"] = rises[0]
    return result


def big_local(path: str, transfers: int) -> dict[str, Any]:
    """``view.to_arrow()`` through the in-process local client: the engine's share of ``big``."""
    server = perspective.Server()
    table = server.new_local_client().table(Path(path).read_bytes(), name="big")
    view = table.view()
    size = len(view.to_arrow())
    walls = []
    for _ in range(transfers):
        start = time.perf_counter()
        view.to_arrow()
        walls.append(time.perf_counter() - start)
    view.delete()
    table.delete()
    return {"bytes": size, "mb_s": size / 1e6 / statistics.median(walls)}


async def stall(url: str, queries: int) -> dict[str, Any]:
    heavy = await Client.connect(url)
    pinger = await Client.connect(url)
    heavy_table = await heavy.perspective.open_table("heavy")
    ping_table = await pinger.perspective.open_table("small")
    for _ in range(50):
        await ping_table.size()
    pings: list[float] = []
    query_s: list[float] = []
    running = True

    async def ping() -> None:
        next_at = time.perf_counter()
        while running:
            start = time.perf_counter()
            await ping_table.size()
            pings.append((time.perf_counter() - start) * 1e3)
            next_at += 0.01
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    task = asyncio.create_task(ping())
    await asyncio.sleep(0.1)
    pings.clear()
    for i in range(queries):
        start = time.perf_counter()
        view = await heavy_table.view(
            group_by=["g"], columns=[f"e{i}", "a"],
            expressions={f"e{i}": f'"a" * {i + 2} + "b"'},
        )
        await view.to_columns()
        query_s.append(time.perf_counter() - start)
        await view.delete()
    running = False
    await task
    await heavy.close()
    await pinger.close()
    return {
        "query_s": statistics.median(query_s),
        "ping_p50_ms": statistics.median(pings),
        "ping_p99_ms": pct(pings, 0.99),
        "ping_max_ms": max(pings),
        "pings": len(pings),
    }


# --- load-generator processes -----------------------------------------------------------------


def loadgen(kind: str, url: str, count: int, params: dict[str, Any], pipe: Any) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spare = params.get("spare_cpus")
    if spare:
        # Also run on the server's CPUs, but only in the time the server leaves idle: a
        # SCHED_IDLE task yields to any normal one at once, so the server loses nothing.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setaffinity(0, set(spare))
    coroutine = {"fanout": _fanout, "viewer": _viewer, "idle": _idle, "churn": _churn}[kind]
    asyncio.run(coroutine(url, count, params, pipe))


async def _connect_many(url: str, count: int, concurrency: int = 50) -> list[Client]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Client:
        async with gate:
            for attempt in range(5):
                try:
                    return await Client.connect(url)
                except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake):
                    await asyncio.sleep(0.2 * (attempt + 1))
            return await Client.connect(url)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _fanout(url: str, count: int, params: dict[str, Any], pipe: Any) -> None:
    clients = await _connect_many(url, count)
    seen: list[set[int]] = [set() for _ in clients]
    latencies: list[float] = []
    sample_rate = params.get("sample_rate", 1.0)
    messages = [0]

    def callback_for(index: int) -> Any:
        got = seen[index]

        def on_update(port_id: int, delta: bytes) -> None:
            now = time.time()
            messages[0] += 1
            batch = pa.ipc.open_stream(delta).read_all()
            seqs = batch.column("seq").to_pylist()
            stamps = batch.column("ts").to_pylist()
            fresh = {}
            for s, t in zip(seqs, stamps, strict=True):
                if s not in got:
                    fresh[s] = t
            got.update(fresh)
            if sample_rate >= 1 or random.random() < sample_rate:
                latencies.extend((now - t) * 1e3 for t in fresh.values())

        return on_update

    gate = asyncio.Semaphore(50)

    async def subscribe(index: int, client: Client) -> Any:
        async with gate:
            table = await client.perspective.open_table("feed")
            view = await table.view(columns=["seq", "ts"], **view_config(params, index))
            await view.on_update(callback_for(index), mode="row")
            # ``on_update`` resolves once its request is sent: a round trip makes sure the
            # server has subscribed before the parent starts the feed.
            await view.num_rows()
            return view

    views = await asyncio.gather(*(subscribe(i, c) for i, c in enumerate(clients)))
    # With ``decode_every`` N > 1, only every Nth subscriber decodes its updates (the sequence
    # check and the latency samples); the others count their messages, each one update now
    # that nothing else is in flight: the load generator's core then keeps up with more
    # subscribers than decoding them all would let it.
    decode_every = params.get("decode_every", 1)
    light = [c for i, c in enumerate(clients) if i % decode_every]
    for client in light:
        client.counted = 0

    def report(first: int, last: int) -> dict[str, Any]:
        sent = last - first + 1
        delivered = [len({s for s in got if first <= s <= last})
                     for i, got in enumerate(seen) if not i % decode_every]
        delivered += [min(client.counted or 0, sent) for client in light]
        for client in light:
            client.counted = 0
        missing = sorted({s for i, got in enumerate(seen) if not i % decode_every
                          for s in range(first, last + 1) if s not in got})
        reply = {
            "delivered": sum(delivered), "expected": sent * len(clients),
            "missing": [s - first for s in missing[:10]],
            "latencies": random.sample(latencies, min(len(latencies), 20000)),
            "messages": messages[0],
        }
        # Sequence numbers keep rising across windows, and ``seen`` is kept, so a late
        # arrival from an earlier window adds no latency sample to the next one.
        latencies.clear()
        messages[0] = 0
        return reply

    await _serve_windows(pipe, clients, report)
    del views
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _serve_windows(pipe: Any, clients: list[Client],
                         report: Callable[[int, int], dict[str, Any]]) -> None:
    """Send "ready"; answer each ``(first, last)`` window the parent sends with
    ``report(first, last)``, the connections closed and this process's CPU; return at
    "done"."""
    pipe.send("ready")
    loop = asyncio.get_running_loop()
    cpu_mark = time.process_time()
    while (window := await loop.run_in_executor(None, pipe.recv)) != "done":
        reply = report(*window)
        reply["closed"] = sum(1 for c in clients if c.close_code is not None)
        reply["loadgen_cpu_s"] = time.process_time() - cpu_mark
        pipe.send(reply)
        cpu_mark = time.process_time()


def view_config(params: dict[str, Any], index: int) -> dict[str, Any]:
    """The view of subscriber ``index``: with ``params["mixed"]``, every other one gets a
    configuration of its own (a filter no other view has, which keeps every row), and the
    rest one configuration they all share (the same filter, the same cost)."""
    if not params.get("mixed"):
        return {}
    bound = -1 if index % 2 == 0 else -(os.getpid() * 1_000_000 + index + 1)
    return {"filter": [["k", ">", bound]]}


async def _viewer(url: str, count: int, params: dict[str, Any], pipe: Any) -> None:
    """Subscribers shaped like a datagrid: ``on_update`` without a mode, and on each
    notification a read of the top ``params["window"]`` rows (newest first), one read in
    flight per subscriber, a notification during a read making one more read after it.

    Per window: notifications received (``delivered`` of ``expected``: one per update and
    subscriber), and for each newest row first shown, how old it was when its read returned.
    """
    clients = await _connect_many(url, count)
    rows = params.get("window", 50)
    notified = [0] * count
    shown = [0] * count
    latencies: list[float] = []
    reads = [0]

    class Reader:
        def __init__(self, index: int, view: Any) -> None:
            self.index, self.view = index, view
            self.busy = self.dirty = False
            self.task: asyncio.Future[None] | None = None  # held: the loop keeps weak refs

        def on_update(self, *_port: Any) -> None:
            notified[self.index] += 1
            if self.busy:
                self.dirty = True
            else:
                self.busy = True
                self.task = asyncio.ensure_future(self.read())

        async def read(self) -> None:
            try:
                while True:
                    self.dirty = False
                    columns = await self.view.to_columns(start_row=0, end_row=rows)
                    reads[0] += 1
                    if columns["seq"] and columns["seq"][0] > shown[self.index]:
                        shown[self.index] = columns["seq"][0]
                        latencies.append((time.time() - columns["ts"][0]) * 1e3)
                    if not self.dirty:
                        return
            finally:
                self.busy = False

    gate = asyncio.Semaphore(50)

    async def subscribe(index: int, client: Client) -> Reader:
        async with gate:
            table = await client.perspective.open_table("feed")
            view = await table.view(columns=["seq", "ts"], sort=[["seq", "desc"]])
            reader = Reader(index, view)
            await view.on_update(reader.on_update)
            await view.num_rows()  # subscribed, as in ``_fanout``
            return reader

    readers = await asyncio.gather(*(subscribe(i, c) for i, c in enumerate(clients)))

    def report(first: int, last: int) -> dict[str, Any]:
        sent = last - first + 1
        reply = {
            "delivered": sum(min(n, sent) for n in notified), "expected": sent * count,
            "latencies": random.sample(latencies, min(len(latencies), 20000)),
            "messages": reads[0],
            "current": sum(1 for s in shown if s == last),
        }
        notified[:] = [0] * count
        latencies.clear()
        reads[0] = 0
        return reply

    await _serve_windows(pipe, clients, report)
    del readers
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _idle(url: str, count: int, params: dict[str, Any], pipe: Any) -> None:
    clients: list[Client] = []
    # One request each, so every connection has a live Perspective session.
    gate = asyncio.Semaphore(50)

    async def touch(client: Client) -> None:
        async with gate:
            await (await client.perspective.open_table("small")).size()

    loop = asyncio.get_running_loop()
    for size in params.get("batches", [count]):
        batch = await _connect_many(url, size)
        await asyncio.gather(*(touch(c) for c in batch))
        clients.extend(batch)
        pipe.send("ready")
        if await loop.run_in_executor(None, pipe.recv) == "done":
            break
    pipe.send({"open": sum(1 for c in clients if c.close_code is None)})
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _churn(url: str, count: int, params: dict[str, Any], pipe: Any) -> None:
    concurrency = params.get("concurrency", 20)
    loop = asyncio.get_running_loop()
    while True:
        cycles = await loop.run_in_executor(None, pipe.recv)
        if cycles == "done":
            return
        pipe.send(await _churn_round(url, cycles, concurrency))


async def _churn_round(url: str, cycles: int, concurrency: int) -> dict[str, Any]:
    done = [0]
    failures = [0]

    async def worker(n: int) -> None:
        for _ in range(n):
            try:
                client = await Client.connect(url)
                table = await client.perspective.open_table("small")
                view = await table.view()
                await view.to_columns()
                client.abort()
                done[0] += 1
            except Exception:
                failures[0] += 1
            await asyncio.sleep(0)

    workers = max(1, min(concurrency, cycles))
    shares = [cycles // workers + (1 if i < cycles % workers else 0) for i in range(workers)]
    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in shares))
    seconds = time.perf_counter() - start
    return {"cycles": done[0], "failures": failures[0], "seconds": seconds,
            # Near 1.0 the load generator, not the server, sets the rate.
            "loadgen_cpu": (time.process_time() - cpu) / seconds, "pid": os.getpid()}
