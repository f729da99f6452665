"""Helpers shared by the test modules: demo data, a counting session factory, an in-memory
transport, the stock client over a real websocket, hand-built request frames, and server
processes.

Test modules import from here only (never from ``conftest`` or from one another).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import importlib.util
import inspect
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import anyio
import anyio.to_thread
import perspective
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from perspective_asgi import CloseCode, ConnectionClosed, SessionBridge
from perspective_asgi._core.wire import SERVER_ERROR, read_envelope, read_fields
from perspective_asgi._types import Frame

from ._frames import key, length_delimited, varint

#: How long any single wait in these tests may take before the test fails.
WAIT = 10
#: How long one client scenario against a live server may take, all its waits together.
SCENARIO_TIMEOUT = 60

DEMO_ROWS = {
    "id": [1, 2, 3, 4],
    "name": ["alpha", "beta", "gamma", "delta"],
    "group": ["x", "y", "x", "y"],
    "value": [1.5, 2.5, 3.5, 4.5],
}


# A session factory that counts -----------------------------------------------------------------


class CountingSession:
    """Forwards to a Perspective session; tells its factory of each request and of the close."""

    def __init__(self, factory: CountingFactory, session: Any) -> None:
        self._factory = factory
        self._session = session
        if hasattr(session, "close"):
            self.close = self._close

    def handle_request(self, request: bytes) -> Any:
        self._factory.request_started()
        return self._session.handle_request(request)

    def _close(self) -> Any:
        result = self._session.close()
        self._factory.closed_one()
        return result


class CountingFactory:
    """A session factory wrapping a real server that counts sessions opened and closed, and
    requests handed to them.

    The server runs on other threads than the test: the ``wait_*`` methods block, and their
    ``async`` forms wait in a worker thread so the test's event loop keeps running.
    """

    def __init__(self, server: Any) -> None:
        self.__wrapped__ = server
        self.opened = 0
        self.closed = 0
        self.without_close = 0
        #: Requests handed to a session's ``handle_request``, by all sessions together.
        self.requests = 0
        self._changed = threading.Condition()

    def new_session(self, callback: Any) -> CountingSession:
        session = self.__wrapped__.new_session(callback)
        with self._changed:
            # Virtual servers' sessions have no close() before perspective-python 5.
            if hasattr(session, "close"):
                self.opened += 1
            else:
                self.without_close += 1
        return CountingSession(self, session)

    def request_started(self) -> None:
        with self._changed:
            self.requests += 1
            self._changed.notify_all()

    def closed_one(self) -> None:
        with self._changed:
            self.closed += 1
            if self.closed > self.opened:
                raise AssertionError("a session was closed twice")
            self._changed.notify_all()

    def wait_opened(self, count: int, timeout: float = WAIT) -> bool:
        """Wait until at least ``count`` sessions have been opened; return whether they were."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.opened + self.without_close >= count, timeout
            )

    def wait_requests(self, count: int, timeout: float = WAIT) -> bool:
        """Wait until at least ``count`` requests reached a session; return whether they did."""
        with self._changed:
            return self._changed.wait_for(lambda: self.requests >= count, timeout)

    def wait_closed(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` sessions are closed; return whether they were."""
        with self._changed:
            return self._changed.wait_for(lambda: self.closed >= count, timeout)

    def wait_all_closed(self, timeout: float = 10.0) -> None:
        with self._changed:
            done = self._changed.wait_for(lambda: self.closed == self.opened, timeout)
            assert done, f"{self.opened} sessions opened but {self.closed} closed"
            assert self.closed == self.opened

    async def all_closed(self, timeout: float = 10.0) -> None:
        """``wait_all_closed``, without blocking the event loop."""
        await in_thread(self.wait_all_closed, timeout)

    async def requests_reached(self, count: int, timeout: float = WAIT) -> None:
        """Wait until at least ``count`` requests reached a session; fail if they do not."""
        assert await in_thread(self.wait_requests, count, timeout), (
            f"{self.requests} requests reached the sessions, not {count}, within {timeout} s"
        )


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``function(*args)`` in a worker thread; a cancelled test does not wait
    for it (the thread ends with its own timeout)."""
    return await anyio.to_thread.run_sync(function, *args, abandon_on_cancel=True)


# An in-memory transport, for the core in-process -------------------------------------------------


class MemoryTransport:
    """A ``Transport`` over memory streams: the test plays the peer at the other end."""

    def __init__(self) -> None:
        self._peer, self._inbound = anyio.create_memory_object_stream[Frame](64)
        self._sent, self.replies = anyio.create_memory_object_stream[bytes](10_000)
        #: Called with each message sent to the peer, e.g. ``AsyncClient.handle_response``.
        self.deliver: Callable[[bytes], Any] | None = None
        self.received = 0
        self.closes: list[tuple[int, str]] = []
        self.closed = anyio.Event()
        #: The same as ``closed``, for threads other than the event loop's.
        self.closed_flag = threading.Event()
        self.send_entered = anyio.Event()
        #: Set when a send starts waiting on a stalled client, for other threads to wait on.
        self.stalled_flag = threading.Event()
        self.cancelled_sends = 0
        self._gate: anyio.Event | None = None
        self._hangup_code: int = CloseCode.NO_STATUS_RECEIVED
        self._hung_up = False

    # The peer's side.

    async def feed(self, *frames: Frame) -> None:
        for frame in frames:
            await self._peer.send(frame)

    def hang_up(self, code: int = CloseCode.NO_STATUS_RECEIVED) -> None:
        """The peer goes away: ``receive`` raises ``ConnectionClosed(code)`` once drained."""
        if not self._hung_up:
            self._hung_up = True
            self._hangup_code = code
        self._peer.close()

    def stall(self) -> anyio.Event:
        """Make every later ``send`` wait until the returned event is set: a slow reader."""
        self._gate = anyio.Event()
        self.send_entered = anyio.Event()  # set again by the first send to stall
        return self._gate

    async def next_reply(self) -> bytes:
        with anyio.fail_after(WAIT):
            return await self.replies.receive()

    # The core's side.

    async def receive(self) -> Frame:
        try:
            frame = await self._inbound.receive()
        except anyio.EndOfStream:
            raise ConnectionClosed(self._hangup_code) from None
        self.received += 1
        return frame

    async def send(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        assert not self.closes, "send after close"
        self.send_entered.set()
        if self._gate is not None:
            self.stalled_flag.set()
            try:
                await self._gate.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled_sends += 1
                raise
        self._sent.send_nowait(data)
        if self.deliver is not None:
            result = self.deliver(data)
            if inspect.isawaitable(result):
                await result

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        self.closed.set()
        self.closed_flag.set()

    def dispose(self) -> None:
        for stream in (self._peer, self._inbound, self._sent, self.replies):
            stream.close()


NewTransport = Callable[[], MemoryTransport]


@contextlib.asynccontextmanager
async def serving(bridge: SessionBridge, transport: MemoryTransport) -> AsyncIterator[None]:
    """Run ``bridge`` while the body runs; the peer hangs up when it ends (if not before)."""
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(bridge.run, transport)
            try:
                yield
            finally:
                transport.hang_up()


# The stock client over a real websocket --------------------------------------------------------


@dataclass
class Connection:
    """The stock ``perspective.AsyncClient`` wired to one websocket, as a test drives it."""

    client: perspective.AsyncClient
    ws: ClientConnection
    #: Every request sent, after ``rewrite``, when recording was asked for.
    sent: list[bytes] | None = None
    _reader: asyncio.Task[None] | None = field(default=None, repr=False)

    def stop_reading(self) -> None:
        """Stall the client: nothing reads the socket, so the server's sends back up."""
        if self._reader is not None:
            self._reader.cancel()


@contextlib.asynccontextmanager
async def connect(
    url: str,
    rewrite: Callable[[bytes], bytes] | None = None,
    record: bool = False,
    **options: Any,
) -> AsyncIterator[Connection]:
    """Yield a ``Connection`` to ``url``; each request passes through ``rewrite`` (a hostile
    client's edit) and is recorded in ``Connection.sent`` when ``record`` is true."""
    options.setdefault("max_size", None)
    options.setdefault("compression", None)
    async with websockets.connect(url, **options) as ws:
        sent: list[bytes] | None = [] if record else None

        async def send(data: bytes) -> None:
            data = rewrite(bytes(data)) if rewrite else bytes(data)
            if sent is not None:
                sent.append(data)
            await ws.send(data)

        client = perspective.AsyncClient(send)

        async def pump() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for message in ws:
                    result = client.handle_response(message)
                    if inspect.isawaitable(result):
                        await result

        reader = asyncio.create_task(pump())
        try:
            yield Connection(client, ws, sent, reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def closed_with(ws: ClientConnection, timeout: float = 10) -> int | None:
    """Wait until the server closes ``ws``; return the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed), anyio.fail_after(timeout):
        async for _ in ws:
            pass
    await ws.wait_closed()
    return ws.close_code


async def resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable: a few client methods are sync in one version."""
    return await value if inspect.isawaitable(value) else value


async def still_serving(url: str) -> None:
    """A fresh connection gets a correct answer: the server survived what came before."""
    async with connect(url) as conn:
        table = await conn.client.open_table("demo")
        assert await table.size() == len(DEMO_ROWS["id"])


def local_table(server: perspective.Server, name: str = "demo") -> Any:
    """The table ``name`` of ``server`` through an in-process client."""
    return server.new_local_client().open_table(name)


# Hand-built request frames -----------------------------------------------------------------


def request(msg_id: int, entity_id: str, kind: int, body: bytes = b"") -> bytes:
    """A request envelope: ``msg_id``, ``entity_id`` and a body of the request ``kind``."""
    return key(1, 0) + varint(msg_id) + length_delimited(2, entity_id.encode()) + (
        length_delimited(kind, body)
    )


def make_view_frame(table: str, view_id: str, *filter_fields: bytes, msg_id: int = 5) -> bytes:
    """A ``table_make_view`` request whose config holds one filter made of ``filter_fields``."""
    config = length_delimited(4, b"".join(filter_fields)) if filter_fields else b""
    body = length_delimited(1, view_id.encode()) + length_delimited(2, config)
    return request(msg_id, table, 6, body)


def server_error(reply: bytes) -> tuple[int, str, str, int]:
    """Return the msg_id, entity_id, message and status code of a ``ServerError`` response."""
    envelope = read_envelope(reply)
    assert envelope.kind == SERVER_ERROR, f"expected a ServerError, got kind {envelope.kind}"
    message, status = "", 0
    for number, value in read_fields(envelope.body):
        if number == 1 and not isinstance(value, int):
            message = str(value, "utf-8")
        elif number == 2 and isinstance(value, int):
            status = value
    return envelope.msg_id, envelope.entity_id, message, status


async def reply(ws: ClientConnection) -> bytes:
    """The next message ``ws`` receives, which must be binary and come within ``WAIT``."""
    with anyio.fail_after(WAIT):
        data = await ws.recv()
    assert isinstance(data, bytes)
    return data


# Servers as processes of their own ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a server process gets to start listening, and to exit once signalled.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds, polling: for state that signals nothing when it
    changes (a gauge, a count kept on another thread); fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def refused_status(url: str, **options: Any) -> int:
    """The HTTP status of a handshake to ``url`` that must be refused."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, **options):
            raise AssertionError(f"{url} accepted the handshake")
    return refused.value.response.status_code


#: Prometheus samples by name and sorted labels.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(text: str) -> Samples:
    """The samples of a Prometheus text exposition (``/metrics``), by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` in this process."""
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look up the module's annotations
    spec.loader.exec_module(module)
    return module


def unavailable(reason: str, what: str) -> NoReturn:
    """Skip a test for want of something the machine lacks; under CI, which installs
    everything (.ci/run), fail instead, so that nothing is skipped there unnoticed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run {what} (see .ci/run)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, with the project importable and none of
    the app's data settings (unless given in ``extra``)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **extra}
    for name in ("PERSPECTIVE_ASGI_DEMO", "PERSPECTIVE_ASGI_FILES"):
        if name not in extra:
            env.pop(name, None)
    return env


def readiness(port: int, host: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a server's ``/readyz`` (an edge's replica status), asked
    directly: test hosts are never reached through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def command(*args: str) -> list[str]:
    """``perspective-asgi`` with ``args``, as this interpreter runs it."""
    return [sys.executable, "-m", "perspective_asgi", *args]


def viewer_bundle_installed() -> bool:
    bundle = importlib.resources.files("perspective") / "widget" / "static"
    return (bundle / "perspective-anywidget.js").is_file()


class ServerProcess:
    """A server started as a subprocess; its output goes to files, so a full pipe cannot
    stall it and the assertions can read it.

    The methods block (they wait on the process): async tests call them through
    ``in_thread``.
    """

    def __init__(
        self,
        args: list[str],
        port: int,
        logs: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.port = port
        self.stdout_path = logs / f"stdout-{port}.txt"
        self.stderr_path = logs / f"stderr-{port}.txt"
        env = environment(PORT=str(port)) if env is None else env
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket"

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the port accepts connections; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on {self.port} after {timeout} s:\n{self.stderr}")
            # Waiting on the process is the pause between attempts, and notices an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.popen.wait(0.05)
                pytest.fail(f"server exited with {code} before listening:\n{self.stderr}")

    def wait_exit(self, signum: int = signal.SIGTERM) -> int:
        """Return the exit code, failing unless the process exits within ``STOP_TIMEOUT``
        (``signum`` names the signal it was sent, for the message)."""
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT} s after {signal.Signals(signum).name}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the process and return its exit code, failing unless it exits in time."""
        self.popen.send_signal(signum)
        return self.wait_exit(signum)

    def assert_stopped_cleanly(self, code: int, signum: int = signal.SIGTERM) -> None:
        # uvicorn re-raises the signal it handled once it has shut down, so it exits "killed by
        # SIGTERM" after a graceful shutdown; a traceback is what tells a crash apart.
        assert code in (0, -signum), f"exit code {code}:\n{self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr

    def stop_cleanly(self, signum: int = signal.SIGTERM) -> None:
        """Signal the process; fail unless it exits in time, without a traceback."""
        self.assert_stopped_cleanly(self.stop(signum), signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@contextlib.asynccontextmanager
async def server_process(
    args: list[str],
    logs: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> AsyncIterator[ServerProcess]:
    """Start a server process (``$PORT`` set to ``port`` or a free one, unless ``env`` is
    given); yield it once it listens, and kill it after, if it still runs."""
    process = ServerProcess(args, port or free_port(), logs, env=env, cwd=cwd)
    try:
        await in_thread(process.wait_listening)
        yield process
    finally:
        process.kill()  # SIGKILL: its wait returns at once, and runs even when cancelled


class StdoutLines:
    """A subprocess's stdout, read line by line on a thread, so that each wait is bounded."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self._popen = popen
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._popen.stdout is not None
        with self._popen.stdout:
            for line in self._popen.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def next(self, deadline: float) -> str | None:
        """The next line, or ``None`` once stdout has ended; ``queue.Empty`` past ``deadline``
        (a ``time.monotonic()`` value)."""
        return self._lines.get(timeout=max(0.0, deadline - time.monotonic()))

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)
