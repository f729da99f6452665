"""Is answering cheap requests on the event loop worth it? Round-trip times, inline vs thread.

Serves one table with the raw ASGI adapter under uvicorn in a separate process, twice: once with
the default ``Settings.inline_request_kinds`` and once with none (every request takes a thread
hop). A stock ``perspective.AsyncClient`` sends sequential ``table.size()`` requests (cheap) and
``view.to_columns()`` on a 10-row view (not inline either way). Prints one JSON line per case.

    python benchmarks/inline_dispatch.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import perspective
import websockets

from perspective_asgi import PerspectiveASGIApp, Settings


def serve(sock: socket.socket, mode: str) -> None:
    import uvicorn

    server = perspective.Server()
    server.new_local_client().table({"x": list(range(10)), "y": [str(i) for i in range(10)]},
                                    name="t")
    settings = Settings() if mode == "inline" else Settings(inline_request_kinds=frozenset())
    app: object = PerspectiveASGIApp(server, settings=settings)
    if mode == "reference":
        from perspective.handlers.starlette import PerspectiveStarletteHandler
        from starlette.applications import Starlette
        from starlette.routing import WebSocketRoute

        async def endpoint(websocket: object) -> None:
            await PerspectiveStarletteHandler(perspective_server=server, websocket=websocket).run()

        app = Starlette(routes=[WebSocketRoute("/", endpoint)])
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws_per_message_deflate=False)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


async def measure(url: str, requests: int) -> dict[str, float]:
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        client = perspective.AsyncClient(ws.send)

        async def pump() -> None:
            async for message in ws:
                await client.handle_response(message)

        reader = asyncio.create_task(pump())
        table = await client.open_table("t")
        view = await table.view()
        result = {}
        for label, call in (("size", table.size), ("to_columns", view.to_columns)):
            for _ in range(200):
                await call()
            samples = []
            for _ in range(requests):
                start = time.perf_counter()
                await call()
                samples.append((time.perf_counter() - start) * 1e6)
            samples.sort()
            result[f"{label}_p50_us"] = round(statistics.median(samples), 1)
            result[f"{label}_p99_us"] = round(samples[int(len(samples) * 0.99)], 1)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    for mode in ("inline", "thread", "reference"):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        process = multiprocessing.Process(target=serve, args=(sock, mode), daemon=True)
        process.start()
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/"
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(sock.getsockname()):
                break
            time.sleep(0.05)
        result = asyncio.run(measure(url, args.requests))
        print(json.dumps({"dispatch": mode, **result}), flush=True)
        process.terminate()
        process.join()
        sock.close()


if __name__ == "__main__":
    main()
