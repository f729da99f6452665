"""How one connection's requests reach its Perspective session, and how that session ends.

A request runs in one of four places, chosen per request:

* on the event loop, for cheap kinds on the in-memory engine (microseconds, less than a thread
  hop), and for any other kind whose recent requests on the same table proved cheap
  (``costs.py``); unless a request of the same engine is running in a thread: the engine's
  lock may be held (a ``view.delete()`` holds it for 100s of ms) and the loop would stall;
* in one of anyio's worker threads, bounded by a limiter, for everything else: the engine
  releases the GIL while it computes, so other connections go on being served;
* on ``Settings.executor`` instead, when one is given (asyncio only);
* awaited on the loop, for ``perspective.AsyncServer``, whose sessions are coroutines.

The session is closed exactly once. A thread cannot be interrupted, and closing a session
under a thread that is inside ``handle_request`` is unsafe; so a close asked for then is left
to that thread, which closes the session when the request returns.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import anyio
import perspective

from .._codes import CloseCode
from .._config import Settings
from .._exceptions import ProtocolError
from . import registry
from .costs import MAX_FRAME, CostBook, Key, close_book, loop_cost, open_book
from .wire import Envelope

logger = logging.getLogger("perspective_asgi")


class EngineKind(enum.Enum):
    """What serves the session, which decides where its requests run."""

    #: ``perspective.Server``: cheap kinds on the loop, the rest in threads.
    SERVER = "server"
    #: ``perspective.AsyncServer``: every request awaited on the loop.
    ASYNC_SERVER = "async_server"
    #: Any other factory (DuckDB, Polars, ... virtual servers): a request may run a SQL query,
    #: so every one goes to a thread, on a limiter shared by the server's connections.
    VIRTUAL = "virtual"

    @classmethod
    def of(cls, engine: object) -> EngineKind:
        if isinstance(engine, perspective.AsyncServer):
            return cls.ASYNC_SERVER
        if isinstance(engine, perspective.Server):
            return cls.SERVER
        return cls.VIRTUAL


def default_limiter(engine: object, settings: Settings) -> anyio.CapacityLimiter:
    """The worker threads a connection to ``engine`` shares with the others on its loop."""
    if EngineKind.of(engine) is EngineKind.VIRTUAL:
        # One limiter per virtual server: its backend connection is shared by all sessions
        # and may not be thread-safe (a DuckDB connection is not).
        return registry.thread_limiter(id(engine), settings.virtual_server_threads)
    return registry.thread_limiter(0, settings.max_request_threads)


class Handoff(enum.Enum):
    """Where the session is with respect to worker threads; changed under the runner's lock."""

    #: No request of this connection is in a thread.
    IDLE = "idle"
    #: A request was handed to a thread that has not started it yet.
    QUEUED = "queued"
    #: A thread is inside ``handle_request``.
    IN_ENGINE = "in_engine"
    #: As ``IN_ENGINE``, and the session is to be closed by that thread when it returns.
    CLOSE_ON_RETURN = "close_on_return"
    #: The session is closed (or is being closed); no request may reach it.
    CLOSED = "closed"


class RequestRunner:
    """Runs one connection's requests on its session, one at a time, and closes it once."""

    __slots__ = (
        "_at_once", "_costs", "_engine_key", "_executor", "_handoff", "_inline_kinds",
        "_limiter", "_lock", "_may_inline", "_on_closed", "_session", "kind", "name",
    )

    def __init__(
        self,
        session: Any,
        kind: EngineKind,
        *,
        engine_key: int,
        inline_kinds: Collection[int],
        limiter: anyio.CapacityLimiter,
        executor: Any = None,
        on_closed: Callable[[], None],
        name: str = "",
    ) -> None:
        self._session = session
        #: A session that does more than the engine for some requests (``sharing.ViewRouter``)
        #: says which of them must not run on the loop however cheap their kind.
        self._may_inline: Callable[[Envelope], bool] | None = getattr(
            session, "may_run_inline", None
        )
        #: And which it answers without the engine: those run on the loop whatever else does.
        self._at_once: Callable[[Envelope], bool] | None = getattr(
            session, "answers_at_once", None
        )
        #: The connection's name, for log records.
        self.name = name
        self.kind = kind
        self._engine_key = engine_key
        self._inline_kinds = inline_kinds if kind is EngineKind.SERVER else frozenset()
        #: What requests have cost this engine, shared by its connections (in-memory only).
        self._costs: CostBook | None = (
            open_book(engine_key) if kind is EngineKind.SERVER else None
        )
        self._limiter = limiter
        self._executor = executor
        #: Called once the session is closed: its view ids are free for other connections.
        self._on_closed = on_closed
        self._handoff = Handoff.IDLE
        self._lock = threading.Lock()

    def runs_inline(
        self, kind: int | None, table: str = "", size: int = 0, envelope: Envelope | None = None
    ) -> bool:
        """Whether a request of ``kind`` on ``table``, ``size`` bytes long, would run on the
        loop without waiting for anything."""
        if self._costs is None or kind is None:
            return False
        if envelope is not None and self._at_once is not None and self._at_once(envelope):
            return True
        if registry.engine_is_busy(self._engine_key):
            return False
        if envelope is not None and self._may_inline is not None and not self._may_inline(
            envelope
        ):
            return False
        if kind in self._inline_kinds:
            return True
        return size <= MAX_FRAME and self._costs.cheap((kind, table))

    async def run(
        self, data: bytes, kind: int | None, table: str = "", envelope: Envelope | None = None
    ) -> None:
        """Hand one request to the session, wherever it belongs; return once it has run."""
        if self.kind is EngineKind.ASYNC_SERVER:
            await self._session.handle_request(data)
            return
        # Cheap kinds cost microseconds whatever the table: only the others are measured.
        key = None if kind is None or kind in self._inline_kinds else (kind, table)
        if self.runs_inline(kind, table, len(data), envelope):
            self._timed(data, key, on_loop=True)
        else:
            await self._run_in_thread(data, key)

    async def _run_in_thread(self, data: bytes, key: Key | None) -> None:
        with self._lock:
            if self._handoff is not Handoff.IDLE:
                return  # closed meanwhile: nobody is left to answer
            self._handoff = Handoff.QUEUED
        registry.mark_busy(self._engine_key, 1)
        try:
            if self._executor is None:
                # The thread is abandoned on cancel: it cannot be interrupted, and it closes
                # the session itself if a close came while it was inside the engine.
                await anyio.to_thread.run_sync(
                    self._in_thread, data, key, limiter=self._limiter, abandon_on_cancel=True
                )
            else:
                await asyncio.wrap_future(self._executor.submit(self._in_thread, data, key))
        finally:
            registry.mark_busy(self._engine_key, -1)
            with self._lock:
                if self._handoff is Handoff.QUEUED:
                    # Cancelled before a thread took it: none ever will.
                    self._handoff = Handoff.IDLE

    def _in_thread(self, data: bytes, key: Key | None) -> None:
        with self._lock:
            if self._handoff is not Handoff.QUEUED:
                return  # given up on before it started; the session may be closed already
            self._handoff = Handoff.IN_ENGINE
        try:
            self._timed(data, key, on_loop=False)
        finally:
            with self._lock:
                close_now = self._handoff is Handoff.CLOSE_ON_RETURN
                self._handoff = Handoff.CLOSED if close_now else Handoff.IDLE
            if close_now:
                self._close_now()

    def _timed(self, data: bytes, key: Key | None, on_loop: bool) -> None:
        if key is None or self._costs is None:
            self._handle(data)
            return
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self._handle(data)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            self._costs.record(key, wall if on_loop else loop_cost(wall, cpu))

    def _handle(self, data: bytes) -> None:
        try:
            self._session.handle_request(data)
        except ValueError as exc:
            # The engine answers a malformed request with a ServerError, but virtual servers
            # decode it in their Python layer and raise instead: that is the client's fault.
            if "decode" not in str(exc):
                raise
            raise ProtocolError(CloseCode.INVALID_PAYLOAD, f"undecodable request: {exc}") from None

    def close_session(self) -> Awaitable[Any] | None:
        """Close the session exactly once, now or when the thread inside it returns.

        An ``AsyncServer`` session returns an awaitable, which the caller must await.
        """
        with self._lock:
            handoff = self._handoff
            if handoff is Handoff.IN_ENGINE:
                self._handoff = Handoff.CLOSE_ON_RETURN
                return None
            if handoff is Handoff.CLOSE_ON_RETURN or handoff is Handoff.CLOSED:
                return None
            self._handoff = Handoff.CLOSED
        return self._close_now()

    def _close_now(self) -> Awaitable[Any] | None:
        if self._costs is not None:
            close_book(self._engine_key)
        close: Callable[[], Any] | None = getattr(self._session, "close", None)
        if close is None:
            self._on_closed()  # virtual server sessions before 5.6 have nothing to release
            return None
        try:
            result = close()
        except Exception:
            logger.exception("%s: closing the Perspective session failed", self.name)
            self._on_closed()
            return None
        if inspect.isawaitable(result):
            return self._closed_after(result)
        self._on_closed()
        return None

    async def _closed_after(self, closing: Awaitable[Any]) -> None:
        try:
            await closing
        finally:
            self._on_closed()
