"""Coalesce a Perspective server's update processing into one ``server.poll()`` per loop tick.

A plain ``perspective.Server`` applies pending table updates, and computes every subscribed
view's notification, at the end of each request and each ``table.update()``: a burst of N
updates costs every subscriber N notifications. Built with ``on_poll_request``, the server calls
that hook instead and leaves the work for ``server.poll()``. ``PollCoalescer`` answers the hook
with one poll per event-loop tick, or at most one per ``interval`` seconds, however many updates
arrived meanwhile and from whichever threads::

    coalescer = PollCoalescer()
    server = perspective.Server(on_poll_request=coalescer.request_poll)

    async def lifespan(app):
        async with coalescer:  # on the loop that serves the websockets
            yield

Polls run on that loop, so notifications reach the connections without a thread hop each.
Until the coalescer is attached to a loop, and once it is closed, each hook call polls at once,
as a server without the hook does.

The trade-offs: a request reads the tables as of the last poll, so a client that updates a table
and at once reads it back may see it without its update until the next tick (or ``interval``).
And it pays only for bursts, many updates within one tick: at a steady rate there is little to
merge, and a thread calling ``table.update()`` is no longer slowed by the notifications it
triggers, so past saturation it can outrun the subscribers (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from types import TracebackType

import perspective

logger = logging.getLogger("perspective_asgi")


class PollCoalescer:
    """An ``on_poll_request`` hook that polls its server once per loop tick or ``interval``.

    Give each ``perspective.Server`` its own coalescer: the hook receives a new Python wrapper
    of the server on every call, so servers sharing one could not be told apart.

    Args:
        interval: least seconds between two polls of the same coalescer; 0 polls on the next
            tick after a request, batching only what arrives within one tick.
    """

    def __init__(self, *, interval: float = 0.0) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
            math.isfinite(interval) and interval >= 0
        ):
            raise ValueError(f"interval must be a non-negative number, got {interval!r}")
        self.interval = float(interval)
        #: Hook calls received, and polls run: their ratio is the coalescing achieved.
        self.requests = 0
        self.polls = 0
        # The hook runs on whatever thread ran the request or the update; the lock guards the
        # loop binding and the server waiting for a poll.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._waiting: perspective.Server | None = None
        self._scheduled = False
        self._last_poll = -math.inf

    def request_poll(self, server: perspective.Server) -> None:
        """Perspective's hook: schedule one poll of ``server``; safe to call from any thread."""
        with self._lock:
            self.requests += 1
            loop = self._loop
            if loop is not None:
                self._waiting = server
                if self._scheduled:
                    return  # The poll already scheduled will take this update too.
                self._scheduled = True
        if loop is None:
            self._poll_now(server)
            return
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(self._schedule)
            else:
                loop.call_soon_threadsafe(self._schedule)
        except RuntimeError:
            # The loop closed under us (shutdown): nobody will poll later, so poll here.
            self._drain()

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Poll on ``loop`` (the running loop if omitted) from now on."""
        running = _running_loop()
        loop = loop or running
        if loop is None:
            raise RuntimeError("PollCoalescer.attach() needs a loop, or a running one")
        with self._lock:
            if self._loop is not None and self._loop is not loop:
                raise RuntimeError("PollCoalescer is attached to another event loop already")
            self._loop = loop
            # Updates that arrive on the loop thread skip the thread-safe wake-up.
            if loop is running:
                self._loop_thread = threading.get_ident()

    def close(self) -> None:
        """Stop polling on the loop and run any poll still pending; later requests poll at once."""
        with self._lock:
            self._loop = None
            self._loop_thread = 0
        self._drain()

    async def __aenter__(self) -> PollCoalescer:
        self.attach()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _schedule(self) -> None:
        loop = self._loop
        delay = self._last_poll + self.interval - loop.time() if loop is not None else 0.0
        if loop is not None and delay > 0:
            loop.call_later(delay, self._drain)
        else:
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            server = self._waiting
            self._waiting = None
            # Cleared before polling: an update arriving during the poll schedules another.
            self._scheduled = False
        loop = self._loop
        if loop is not None:
            self._last_poll = loop.time()
        if server is not None:
            self._poll_now(server)

    def _poll_now(self, server: perspective.Server) -> None:
        with self._lock:
            self.polls += 1
        try:
            server.poll()
        except Exception:
            # Raising into the loop or back into Perspective would lose every later update.
            logger.exception("perspective_asgi: server.poll() failed")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
