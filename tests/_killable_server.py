"""A Perspective server in a process of its own, for tests that kill it mid-request.

Prints its websocket URL, then ``stalled`` when a ``view_to_csv`` request arrives; that request
never completes, so the client has a call in flight when the test kills the process.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import perspective
import uvicorn

from perspective_asgi import PerspectiveASGIApp
from perspective_asgi._core.wire import read_envelope

VIEW_TO_CSV = 25


class StallingSession:
    def __init__(self, session: Any) -> None:
        self._session = session

    def handle_request(self, request: bytes) -> Any:
        if read_envelope(request).kind == VIEW_TO_CSV:
            print("stalled", flush=True)
            threading.Event().wait()  # until the process is killed
        return self._session.handle_request(request)

    def close(self) -> Any:
        return self._session.close()


class StallingServer:
    def __init__(self, server: perspective.Server) -> None:
        self._server = server

    def new_session(self, callback: Any) -> StallingSession:
        return StallingSession(self._server.new_session(callback))


def main() -> None:
    server = perspective.Server()
    server.new_local_client().table({"id": [1, 2, 3], "x": [1.0, 2.0, 3.0]}, name="demo")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    print(f"ws://127.0.0.1:{sock.getsockname()[1]}/websocket", flush=True)
    config = uvicorn.Config(PerspectiveASGIApp(StallingServer(server)), log_level="warning",
                            lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
