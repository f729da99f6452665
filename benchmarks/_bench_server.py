"""The server process of ``run.py``: one web stack, serving our adapter or Perspective's reference.

``serve(config, pipe)`` binds 127.0.0.1:0, sends the port up ``pipe`` and then answers control
commands on it from a thread (RSS and its peak, CPU, open sessions, feed start/stop) until
terminated. With ``config["cpus"]`` every thread of the process is pinned to those CPUs once
the tables are loaded.
Routes on every stack:

- ``/ws``: Perspective, through ``config["impl"]``: ``ours`` (perspective_asgi), ``ref``
  (``perspective.handlers.*``) or ``ref_exec`` (the reference with a thread-pool executor);
- ``/raw``: a plain websocket on the same stack that answers any message with the bytes of
  ``view.to_arrow()`` of the "big" table, the transport ceiling for the ``big`` scenario.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import perspective

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pin_process(cpus: set[int]) -> set[int]:
    """Pin every thread of this process to ``cpus``; threads started later inherit it.

    ``os.sched_setaffinity(0, ...)`` pins only the calling thread, and the engine starts
    threads of its own when ``perspective`` is imported, so each task is pinned by its id.
    """
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setaffinity(int(task), cpus)
    return process_cpus()


def process_cpus() -> set[int]:
    """The union of the CPUs this process's threads may run on."""
    cpus: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            cpus |= os.sched_getaffinity(int(task))
    return cpus


_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


def trim_and_reset_peak() -> float:
    """Return freed memory to the OS, reset the peak RSS to the current RSS and return it (MiB).

    The allocator keeps freed blocks (a 36 MB reply raises glibc's mmap threshold, so the next
    one comes from a heap that is never shrunk), so without the trim the second transfer's
    rise would measure the allocator, not the server. ``clear_refs`` value 5 resets VmHWM.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb(os.getpid())


def nodelay_report() -> dict[str, int]:
    """Count this process's established TCP sockets with and without TCP_NODELAY."""
    counts = {"nodelay": 0, "nagle": 0}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            copy = os.dup(int(fd))
        except OSError:
            continue
        try:
            s = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            continue
        try:
            if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM:
                s.getpeername()  # listening sockets have no peer
                on = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                counts["nodelay" if on else "nagle"] += 1
        except OSError:
            pass
        finally:
            s.close()
    return counts


class CountingServer:
    """Wraps a ``perspective.Server`` to count sessions opened and not yet closed."""

    def __init__(self, server: perspective.Server) -> None:
        self.__wrapped__ = server
        self.open = 0
        self.lock = threading.Lock()

    def new_session(self, callback: Any) -> Any:
        session = self.__wrapped__.new_session(callback)
        with self.lock:
            self.open += 1
        return _CountedSession(session, self)

    def new_local_client(self) -> Any:
        return self.__wrapped__.new_local_client()

    def poll(self) -> None:
        self.__wrapped__.poll()


class _CountedSession:
    def __init__(self, session: Any, owner: CountingServer) -> None:
        self.handle_request = session.handle_request
        self._session = session
        self._owner = owner
        self._closed = False

    def close(self) -> Any:
        if not self._closed:
            self._closed = True
            with self._owner.lock:
                self._owner.open -= 1
        return self._session.close()


class Feed:
    """Updates the "feed" table with ``rows``-row batches ``hz`` times a second.

    Each batch carries its sequence number and ``time.time()`` when it was made, so clients
    can tell what they received and how late. ``mode`` is ``loop`` (an asyncio task on the
    serving loop) or ``thread`` (a separate thread).
    """

    def __init__(self, table: Any, hz: float, rows: int, mode: str, width: int) -> None:
        self.table, self.hz, self.rows, self.mode, self.width = table, hz, rows, mode, width
        self.seq = 0
        self.first = 0
        self.running = False
        self.late = 0
        self.generation = 0
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    def batch(self) -> dict[str, list[Any]]:
        self.seq += 1
        base = self.seq * self.rows
        data: dict[str, list[Any]] = {
            "seq": [self.seq] * self.rows,
            "ts": [time.time()] * self.rows,
            "k": list(range(base, base + self.rows)),
        }
        for i in range(self.width):
            data[f"v{i}"] = [float(base + j + i) for j in range(self.rows)]
        return data

    def start(self, loop: asyncio.AbstractEventLoop, mode: str | None = None) -> int:
        """Start feeding (``mode`` overrides the configured one for this window)."""
        if mode is not None:
            self.mode = mode
        self.first = self.seq + 1
        self.running = True
        self.generation += 1
        if self.mode == "thread":
            self._thread = threading.Thread(target=self._run_thread, daemon=True)
            self._thread.start()
        else:
            loop.call_soon_threadsafe(self._start_task)
        return self.first

    def stop(self) -> int:
        self.running = False
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        time.sleep(0.1)
        return self.seq

    def _start_task(self) -> None:
        self._task = asyncio.ensure_future(self._run_loop())

    def _run_thread(self) -> None:
        period = 1 / self.hz
        next_at = time.perf_counter()
        while self.running:
            self.table.update(self.batch())
            next_at += period
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                self.late += 1

    async def _run_loop(self) -> None:
        period = 1 / self.hz
        next_at = time.perf_counter()
        generation = self.generation
        while self.running and generation == self.generation:
            self.table.update(self.batch())
            next_at += period
            delay = next_at - time.perf_counter()
            if delay <= 0:
                self.late += 1
            await asyncio.sleep(max(delay, 0))


# --- apps -------------------------------------------------------------------------------------


def _raw_payload(state: dict[str, Any]) -> bytes:
    return state.get("raw", b"")


def asgi_app(server: Any, impl: str, state: dict[str, Any], settings: Any) -> Any:
    from perspective_asgi import PerspectiveASGIApp

    ours = PerspectiveASGIApp(server, settings=settings)

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            await send({"type": "websocket.send", "bytes": _raw_payload(state)})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope.get("path") == "/raw":
            await raw(scope, receive, send)
        else:
            await ours(scope, receive, send)

    return app


def starlette_app(server: Any, impl: str, state: dict[str, Any], settings: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def raw(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_bytes()
                await websocket.send_bytes(_raw_payload(state))

    if impl == "ours":
        from perspective_asgi.adapters.starlette import PerspectiveWebSocketRoute

        route: Any = PerspectiveWebSocketRoute("/ws", server, settings=settings)
    else:
        from perspective.handlers.starlette import PerspectiveStarletteHandler

        executor = concurrent.futures.ThreadPoolExecutor(8) if impl == "ref_exec" else None

        async def endpoint(websocket: WebSocket) -> None:
            handler = PerspectiveStarletteHandler(
                perspective_server=server, websocket=websocket, executor=executor
            )
            with contextlib.suppress(WebSocketDisconnect):
                await handler.run()

        route = WebSocketRoute("/ws", endpoint)
    return Starlette(routes=[route, WebSocketRoute("/raw", raw)])


async def serve_uvicorn(app: Any, sock: socket.socket, deflate: bool) -> None:
    import uvicorn

    config = uvicorn.Config(
        app, log_level="error", lifespan="auto", ws_per_message_deflate=deflate,
        ws_max_size=64 * 1024 * 1024, backlog=4096,
    )
    await uvicorn.Server(config).serve(sockets=[sock])


async def serve_tornado(server: Any, impl: str, state: dict[str, Any], sock: socket.socket,
                        settings: Any, nodelay: bool = False) -> None:
    import tornado.httpserver
    import tornado.web
    import tornado.websocket

    class Raw(tornado.websocket.WebSocketHandler):
        def on_message(self, message: Any) -> None:
            self.write_message(_raw_payload(state), binary=True)

    if impl == "ours":
        from perspective_asgi.adapters.tornado import PerspectiveTornadoHandler

        options: dict[str, Any] = {"perspective_server": server, "settings": settings}
    else:
        from perspective.handlers.tornado import PerspectiveTornadoHandler  # type: ignore

        options = {"perspective_server": server}
        if impl == "ref_exec":
            options["executor"] = concurrent.futures.ThreadPoolExecutor(8)
    handler: Any = PerspectiveTornadoHandler
    if nodelay:
        # The fix proposed for Nagle's 40 ms stalls, tried without touching the library.
        class NoDelay(PerspectiveTornadoHandler):  # type: ignore[misc, valid-type]
            def open(self, *args: Any, **kwargs: Any) -> None:
                self.set_nodelay(True)
                super().open(*args, **kwargs)

        handler = NoDelay
    app = tornado.web.Application(
        [(r"/ws", handler, options), (r"/raw", Raw)],
        websocket_max_message_size=64 * 1024 * 1024,
    )
    http = tornado.httpserver.HTTPServer(app)
    sock.setblocking(False)
    http.add_sockets([sock])
    await asyncio.Event().wait()


async def serve_aiohttp(server: Any, impl: str, state: dict[str, Any], sock: socket.socket,
                        settings: Any) -> None:
    from aiohttp import WSMsgType, web

    async def raw(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                await ws.send_bytes(_raw_payload(state))
        return ws

    if impl == "ours":
        from perspective_asgi.adapters.aiohttp import PerspectiveAIOHTTPHandler

        async def handler(request: web.Request) -> Any:
            return await PerspectiveAIOHTTPHandler(
                perspective_server=server, request=request, settings=settings
            ).run()
    else:
        from perspective.handlers.aiohttp import PerspectiveAIOHTTPHandler as Ref

        executor = concurrent.futures.ThreadPoolExecutor(8) if impl == "ref_exec" else None

        async def handler(request: web.Request) -> Any:
            return await Ref(perspective_server=server, request=request, executor=executor).run()

    app = web.Application()
    app.router.add_get("/ws", handler)
    app.router.add_get("/raw", raw)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    await asyncio.Event().wait()


# --- the process ------------------------------------------------------------------------------


class OpenSessions:
    """Counts sessions through our observer hooks (ours only)."""

    def __init__(self) -> None:
        from perspective_asgi import SessionObserver

        class Observer(SessionObserver):
            def __init__(self, owner: OpenSessions) -> None:
                self.owner = owner

            def connection_opened(self, bridge: Any) -> None:
                self.owner.open += 1

            def connection_closed(self, bridge: Any, code: int | None) -> None:
                self.owner.open -= 1
                self.owner.codes[code] = self.owner.codes.get(code, 0) + 1
                self.owner.closed_at.setdefault(code, time.time())

        self.open = 0
        self.codes: dict[int | None, int] = {}
        self.closed_at: dict[int | None, float] = {}
        self.observer = Observer(self)


def load_arrow(path: str) -> bytes:
    return Path(path).read_bytes()


class _FirstOverflow(logging.Handler):
    """Notes when our core first logs closing a connection with 1013 (slow reader)."""

    at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and "1013" in record.getMessage():
            self.at = time.time()


def serve(config: dict[str, Any], pipe: Any) -> None:
    raise_nofile()
    # Load the tables on every CPU (the parent's load-generator affinity was inherited), then
    # serve from the server's own CPU alone.
    if config.get("startup_cpus"):
        pin_process(set(config["startup_cpus"]))
    # The reference handlers print a traceback per failed send task; keep them in a file.
    log = os.open(config.get("log", "/tmp/perspective_asgi_bench_server.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    overflow = _FirstOverflow()
    logging.getLogger("perspective_asgi").addHandler(overflow)
    stack, impl = config["stack"], config["impl"]
    coalescer = None
    if config.get("polling"):
        from perspective_asgi.polling import PollCoalescer

        coalescer = PollCoalescer(interval=config.get("poll_interval", 0.0))
        engine = perspective.Server(on_poll_request=coalescer.request_poll)
    else:
        engine = perspective.Server()
    local = engine.new_local_client()
    local.table({"x": list(range(10)), "y": [str(i) for i in range(10)]}, name="small")
    state: dict[str, Any] = {}
    tables = config.get("tables", ())
    if "big" in tables:
        big = local.table(load_arrow(config["big_path"]), name="big")
        state["raw"] = big.view().to_arrow()
    if "heavy" in tables:
        local.table(load_arrow(config["heavy_path"]), name="heavy")
    feed = None
    if "feed" in tables:
        width = config.get("feed_width", 1)
        schema: dict[str, str] = {"seq": "integer", "ts": "float", "k": "integer"}
        schema.update({f"v{i}": "float" for i in range(width)})
        table = local.table(schema, name="feed", limit=config.get("feed_limit", 20000))
        feed = Feed(table, config.get("feed_hz", 20), config.get("feed_rows", 100),
                    config.get("feed_mode", "loop"), width)
    counting = CountingServer(engine) if config.get("count_sessions") else None
    factory: Any = counting if counting is not None else engine
    opened = OpenSessions() if impl == "ours" else None
    from perspective_asgi import Settings

    settings = Settings(observer=opened.observer if opened is not None else None,
                        share_views=config.get("share_views", True))

    if config.get("cpus"):
        pin_process(set(config["cpus"]))
    proto = config.get("proto", socket.IPPROTO_TCP)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    loop_holder: dict[str, asyncio.AbstractEventLoop] = {}

    def control() -> None:
        pipe.send(sock.getsockname()[1])
        while True:
            try:
                command, *args = pipe.recv()
            except EOFError:
                os._exit(0)
            reply: Any = None
            if command == "stats":
                reply = {
                    "rss_mb": rss_mb(os.getpid()),
                    "hwm_mb": rss_mb(os.getpid(), "VmHWM"),
                    "cpu_s": cpu_seconds(os.getpid()),
                    "cpus": sorted(process_cpus()),
                    "send_queue_bytes": settings.max_send_queue_bytes,
                    "sessions_wrapper": counting.open if counting is not None else None,
                    "sessions_observer": opened.open if opened is not None else None,
                    "close_codes": dict(opened.codes) if opened is not None else None,
                    "closed_at": dict(opened.closed_at) if opened is not None else None,
                    "threads": threading.active_count(),
                    "overflow_at": overflow.at,
                    "tcp": nodelay_report(),
                }
            elif command == "feed_start" and feed is not None:
                reply = feed.start(loop_holder["loop"], *args)
            elif command == "feed_stop" and feed is not None:
                reply = {"last": feed.stop(), "late": feed.late,
                         "coalesced": None if coalescer is None else
                         [coalescer.requests, coalescer.polls]}
            elif command == "gc":
                gc.collect()
                reply = True
            elif command == "trim":
                reply = trim_and_reset_peak()
            pipe.send(reply)

    async def main() -> None:
        loop_holder["loop"] = asyncio.get_running_loop()
        if coalescer is not None:
            coalescer.attach()
        threading.Thread(target=control, daemon=True).start()
        if stack == "asgi":
            await serve_uvicorn(asgi_app(factory, impl, state, settings), sock, config["deflate"])
        elif stack == "starlette":
            await serve_uvicorn(starlette_app(factory, impl, state, settings), sock,
                                config["deflate"])
        elif stack == "tornado":
            await serve_tornado(factory, impl, state, sock, settings,
                                config.get("tornado_nodelay", False))
        elif stack == "aiohttp":
            await serve_aiohttp(factory, impl, state, sock, settings)
        else:
            raise ValueError(stack)

    asyncio.run(main())
