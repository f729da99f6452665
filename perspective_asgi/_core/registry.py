"""What the connections of one process share: who is running, and the threads they may use.

Each piece is keyed by the event loop or the engine it belongs to, so two servers (or two
event loops, as in tests) in one process never share a limit by accident.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

import anyio
import anyio.lowlevel

from .._codes import CloseCode

try:
    import sniffio
except ImportError:  # anyio without sniffio detects asyncio by its running loop
    sniffio = None  # type: ignore[assignment]

class Served(Protocol):
    """What the registry needs of a connection (a ``SessionBridge``)."""

    #: The event loop (or trio token) serving it.
    loop: object

    @property
    def outbox_bytes(self) -> int: ...

    def close(self, code: int = ..., reason: str = ...) -> None: ...

    async def wait_closed(self) -> None: ...


class LoopHandle:
    """The event loop (or trio token) a connection runs on, and how to call into it.

    Callbacks run through it may start tasks in an anyio task group, whether they run in a
    task or not.
    """

    __slots__ = ("_thread", "loop")

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self.loop = current_loop()

    def call(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop: now on the loop's thread, soon from any other."""
        loop = self.loop
        if isinstance(loop, asyncio.AbstractEventLoop):
            if threading.get_ident() == self._thread:
                _as_asyncio(callback)
            else:
                loop.call_soon_threadsafe(_as_asyncio, callback)
        elif threading.get_ident() == self._thread:
            callback()
        else:
            loop.run_sync_soon(callback)  # type: ignore[attr-defined]


def _as_asyncio(callback: Callable[[], object]) -> None:
    # A loop callback that runs in no task (Perspective's, a PollCoalescer's, ours handed over
    # from a thread) is somewhere anyio cannot tell which library runs it: tell it.
    if sniffio is None or asyncio.current_task() is not None:
        callback()
        return
    previous = getattr(sniffio.thread_local, "name", None)
    sniffio.thread_local.name = "asyncio"
    try:
        callback()
    finally:
        sniffio.thread_local.name = previous


def current_loop() -> object:
    """The running event loop, or trio token."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        import trio  # the only other backend anyio runs on

        return trio.lowlevel.current_trio_token()


# Running connections --------------------------------------------------------------------------

#: Connections being served in this process, for ``close_all_connections`` and metrics.
_running: weakref.WeakSet[Served] = weakref.WeakSet()


def add(bridge: Served) -> None:
    _running.add(bridge)


def discard(bridge: Served) -> None:
    _running.discard(bridge)


def running() -> Iterator[Served]:
    """The connections being served in this process, on any event loop."""
    return iter(list(_running))


def queued_bytes() -> int:
    """Bytes waiting in the outboxes of every connection of this process."""
    return sum(bridge.outbox_bytes for bridge in running())


async def close_all_connections(
    code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down"
) -> None:
    """Close every connection served on the running event loop and wait for them to end.

    For servers that leave open websockets to the application at shutdown (Tornado,
    aiohttp): call it from the shutdown hook so clients get a 1001 and sessions are closed.
    """
    here = current_loop()
    bridges = [bridge for bridge in running() if bridge.loop is here]
    for bridge in bridges:
        bridge.close(code, reason)
    for bridge in bridges:
        await bridge.wait_closed()


# Worker threads -------------------------------------------------------------------------------

_thread_limiters: anyio.lowlevel.RunVar[dict[tuple[int, int], anyio.CapacityLimiter]] = (
    anyio.lowlevel.RunVar("perspective_asgi_thread_limiters")
)


def thread_limiter(owner: int, tokens: int) -> anyio.CapacityLimiter:
    """Return this event loop's limiter of ``tokens`` threads for ``owner``."""
    try:
        limiters = _thread_limiters.get()
    except LookupError:
        limiters = {}
        _thread_limiters.set(limiters)
    key = (owner, tokens)
    if key not in limiters:
        limiters[key] = anyio.CapacityLimiter(tokens)
    return limiters[key]


_busy_lock = threading.Lock()
#: Requests running in worker threads, per engine (keyed by ``id``). While one runs, a cheap
#: request could still wait for the engine's lock (a ``view.delete()`` holds it for 100s of
#: ms), and inline it would stall the event loop: it goes to a thread too.
_engine_busy: dict[int, int] = {}


def engine_is_busy(key: int) -> bool:
    return key in _engine_busy


def mark_busy(key: int, delta: int) -> None:
    with _busy_lock:
        count = _engine_busy.get(key, 0) + delta
        if count:
            _engine_busy[key] = count
        else:
            _engine_busy.pop(key, None)
