"""Where do 44 ms round trips come from? Nagle's algorithm against delayed ACKs, per stack.

Serves the same small table on each stack (``_bench_server.py``) and times, on one connection,
a request answered in a worker thread (``view.to_columns()``) sent together with a cheap one
(``table.size()``), next to the same requests one at a time. Each server reports how many of
its established connections have ``TCP_NODELAY`` set. uvicorn runs twice: on a listening socket
made with ``IPPROTO_TCP`` (as ``loop.create_server(host=..., port=...)`` makes it) and on one
made with protocol 0 (as ``uvicorn.Config.bind_socket()`` makes it for ``--workers``,
``--reload`` and ``--fd``, and as ``socket.socket()`` does in tests). Tornado runs once more
with a handler that calls ``self.set_nodelay(True)`` in ``open()``, the proposed fix. Prints
one JSON line per case.

    python benchmarks/nodelay.py [--cycles 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _bench_client as clients  # noqa: E402
import _bench_server  # noqa: E402

#: (stack, implementation, listening socket's protocol, Tornado handler calls set_nodelay(True))
CASES = [
    ("asgi", "ours", socket.IPPROTO_TCP, False), ("asgi", "ours", 0, False),
    ("starlette", "ref", socket.IPPROTO_TCP, False), ("starlette", "ref", 0, False),
    ("tornado", "ours", socket.IPPROTO_TCP, False), ("tornado", "ref", socket.IPPROTO_TCP, False),
    ("tornado", "ours", socket.IPPROTO_TCP, True),
    ("aiohttp", "ours", socket.IPPROTO_TCP, False), ("aiohttp", "ref", socket.IPPROTO_TCP, False),
]


async def measure(url: str, pipe: object, cycles: int) -> dict[str, object]:
    client = await clients.Client.connect(url)
    loop = asyncio.get_running_loop()
    pipe.send(("stats",))  # type: ignore[attr-defined]
    tcp = (await loop.run_in_executor(None, pipe.recv))["tcp"]  # type: ignore[attr-defined]
    table = await client.perspective.open_table("small")
    view = await table.view()
    alone, together = [], []
    for _ in range(cycles):
        start = time.perf_counter()
        await view.to_columns()
        await table.size()
        alone.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        await asyncio.gather(view.to_columns(), table.size())
        together.append((time.perf_counter() - start) * 1e3)
    await client.close()
    return {
        "server_sockets": tcp,
        "sequential_p50_ms": round(statistics.median(alone), 2),
        "pipelined_p50_ms": round(statistics.median(together), 2),
        "pipelined_max_ms": round(max(together), 2),
        "pipelined_over_30ms": sum(1 for t in together if t > 30),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=30)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    for stack, impl, proto, nodelay in CASES:
        parent, child = spawn.Pipe()
        config = {"stack": stack, "impl": impl, "deflate": False, "proto": proto,
                  "tornado_nodelay": nodelay}
        process = spawn.Process(target=_bench_server.serve, args=(config, child), daemon=True)
        process.start()
        port = parent.recv()
        result = asyncio.run(measure(f"ws://127.0.0.1:{port}/ws", parent, args.cycles))
        print(json.dumps({"stack": stack, "impl": impl,
                          "listen_proto": "IPPROTO_TCP" if proto else "0",
                          "handler_set_nodelay": nodelay, **result}), flush=True)
        process.terminate()
        process.join()


if __name__ == "__main__":
    main()
