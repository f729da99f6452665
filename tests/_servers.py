"""Real web servers on 127.0.0.1, each on its own event loop in a background thread.

Every runner binds port 0 itself, serves the given Perspective server at ``/websocket`` through
one adapter, and yields the websocket URL. Running the server loop on another thread than the
test's client loop keeps the two from hiding each other's blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, WebSocket

from perspective_asgi import Settings, close_all_connections

ServerMain = Callable[[socket.socket, asyncio.Event], Awaitable[None]]


def _bound_socket(port: int = 0) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on such sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def serve_in_thread(main: ServerMain, path: str = "/websocket", port: int = 0) -> Iterator[str]:
    """Run ``main(sock, stop)`` on a fresh event loop in a thread; yield the websocket URL.

    On ``port`` if given (a server restarted where its clients reconnect), else a free one."""
    sock = _bound_socket(port)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def body() -> None:
            ready.set()
            await main(sock, stop)

        try:
            loop.run_until_complete(body())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name=f"server-{port}", daemon=True)
    thread.start()
    try:
        # The socket listens already: a client that connects before the server accepts waits
        # in its backlog, so there is nothing to poll for once the loop runs.
        if not ready.wait(10):
            raise RuntimeError("server thread did not start within 10 s")
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("server thread did not stop within 15 s")
        if failure:
            raise failure[0]


@contextlib.asynccontextmanager
async def serve_in_background(
    main: ServerMain, path: str = "/websocket", port: int = 0
) -> AsyncIterator[str]:
    """``serve_in_thread`` for async tests: waiting for the server to listen and to stop
    blocks a worker thread, not the test's event loop."""
    manager = serve_in_thread(main, path, port)
    url = await anyio.to_thread.run_sync(manager.__enter__)
    try:
        yield url
    except BaseException as exc:
        # Stop the server even when the test is cancelled (a timeout): it must not outlive it.
        with anyio.CancelScope(shield=True):
            suppress = await anyio.to_thread.run_sync(manager.__exit__, type(exc), exc,
                                                      exc.__traceback__)
        if not suppress:
            raise
    else:
        await anyio.to_thread.run_sync(manager.__exit__, None, None, None)


# ASGI servers ---------------------------------------------------------------------------------


def uvicorn_main(app: Any, **options: Any) -> ServerMain:
    async def main(sock: socket.socket, stop: asyncio.Event) -> None:
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", lifespan="off", **options)
        server = uvicorn.Server(config)
        # uvicorn installs signal handlers only on the main thread; none here.
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        await stop.wait()
        server.should_exit = True
        await task

    return main


def hypercorn_main(app: Any, max_message_size: int) -> ServerMain:
    async def main(sock: socket.socket, stop: asyncio.Event) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        # Hypercorn closes the socket it is given; hand it a duplicate of ours.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        config.loglevel = "WARNING"
        config.accesslog = None
        config.graceful_timeout = 2
        config.websocket_max_message_size = max_message_size
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    return main


# Framework apps -------------------------------------------------------------------------------


def asgi_app(server: Any, settings: Settings) -> Any:
    from perspective_asgi.adapters.asgi import PerspectiveASGIApp

    return PerspectiveASGIApp(server, settings=settings)


def starlette_app(server: Any, settings: Settings) -> Any:
    from starlette.applications import Starlette

    from perspective_asgi.adapters.starlette import PerspectiveWebSocketRoute

    return Starlette(routes=[PerspectiveWebSocketRoute("/websocket", server, settings=settings)])


def fastapi_app(server: Any, settings: Settings) -> Any:
    # FastAPI reads the endpoint's annotations, so its names must resolve in this module.
    from perspective_asgi.adapters.starlette import PerspectiveStarletteHandler

    app = FastAPI()

    def dependency() -> str:
        return "ran"

    @app.websocket("/websocket")
    async def endpoint(websocket: WebSocket, marker: str = Depends(dependency)) -> None:
        assert marker == "ran"
        handler = PerspectiveStarletteHandler(
            perspective_server=server, websocket=websocket, settings=settings
        )
        await handler.run()

    return app


def tornado_main(server: Any, settings: Settings) -> ServerMain:
    async def main(sock: socket.socket, stop: asyncio.Event) -> None:
        import tornado.httpserver
        import tornado.web

        from perspective_asgi.adapters.tornado import PerspectiveTornadoHandler

        app = tornado.web.Application(
            [(r"/websocket", PerspectiveTornadoHandler,
              {"perspective_server": server, "settings": settings})]
        )
        http = tornado.httpserver.HTTPServer(app)
        http.add_sockets([sock])
        await stop.wait()
        http.stop()
        await close_all_connections()
        await http.close_all_connections()

    return main


def aiohttp_main(server: Any, settings: Settings) -> ServerMain:
    async def main(sock: socket.socket, stop: asyncio.Event) -> None:
        from aiohttp import web

        from perspective_asgi.adapters.aiohttp import PerspectiveAIOHTTPHandler

        async def endpoint(request: web.Request) -> web.StreamResponse:
            handler = PerspectiveAIOHTTPHandler(
                perspective_server=server, request=request, settings=settings
            )
            return await handler.run()

        app = web.Application()
        app.router.add_get("/websocket", endpoint)
        app.on_shutdown.append(lambda _: close_all_connections())
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await stop.wait()
        await runner.cleanup()  # runs on_shutdown

    return main


#: Every adapter under test, by name: each maps (perspective server, settings) to a server main.
ADAPTERS: dict[str, Callable[[Any, Settings], ServerMain]] = {
    "asgi-uvicorn": lambda server, settings: uvicorn_main(
        asgi_app(server, settings), ws_max_size=settings.max_message_size + 1024
    ),
    "asgi-hypercorn": lambda server, settings: hypercorn_main(
        asgi_app(server, settings), settings.max_message_size + 1024
    ),
    "starlette": lambda server, settings: uvicorn_main(
        starlette_app(server, settings), ws_max_size=settings.max_message_size + 1024
    ),
    "fastapi": lambda server, settings: uvicorn_main(
        fastapi_app(server, settings), ws_max_size=settings.max_message_size + 1024
    ),
    "tornado": tornado_main,
    "aiohttp": aiohttp_main,
}
