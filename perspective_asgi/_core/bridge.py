"""The core: one Perspective session bridged to one websocket, with bounded queues both ways.

Three tasks serve a connection:

* the reader takes frames from the transport, refuses what is not a Perspective request, and
  queues requests (a bounded queue: when it is full the reader stops, and TCP pushes back);
* the worker hands requests to the session one at a time, so replies keep their order; cheap
  requests run on the event loop, the rest in a worker thread, as the engine releases the GIL
  (a cheap request with nothing queued ahead of it is answered by the reader itself);
* the writer drains the outbound queue into the transport, at the pace the client reads.

Perspective calls the response callback on whichever thread ran the request or the
``table.update()`` that produced it. The callback appends to a lock-protected deque and, once per
burst, wakes the writer through the loop's thread-safe entry point; it never touches the loop's
objects from a foreign thread and never raises into Perspective.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import inspect
import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import perspective
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._codes import QUIET_CLOSE_CODES, CloseCode
from .._config import Settings
from .._exceptions import ConnectionClosed, ProtocolError
from .._observer import NULL_OBSERVER
from .._types import SessionFactory, Transport
from . import registry
from .hosted import HostedTablesProbe
from .limits import TokenBucket, connection_slots
from .policy import ALLOW_ALL, Policy, PolicyGuard, Refused
from .views import ViewGuard
from .wire import GET_HOSTED_TABLES, Envelope, encode_server_error, read_envelope

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("perspective_asgi")

_connection_ids = itertools.count(1)


class SessionState(enum.Enum):
    """Where a connection is in its life; checked on every send and receive."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Abort(Exception):
    """Ends a connection's tasks with a close code chosen by the core."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SessionBridge:
    """Serves one websocket connection from a Perspective session factory.

    Args:
        factory: ``perspective.Server``, ``perspective.AsyncServer``, a virtual server, or any
            object whose ``new_session(callback)`` returns an object with ``handle_request``.
        settings: limits and policies; the defaults of ``Settings`` if omitted.
        limiter: bound on worker threads; by default one per event loop, shared by every
            connection with the same ``Settings.max_request_threads``.
        peer: the client's address, added to the connection's name in log records.
        principal: who the client authenticated as (see ``Settings.authenticate``).
    """

    def __init__(
        self,
        factory: SessionFactory,
        settings: Settings | None = None,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        peer: str | None = None,
        principal: object | None = None,
    ) -> None:
        self.factory = factory
        #: The principal the handshake was accepted for; ``None`` without authentication.
        self.principal = principal
        self.settings = settings or Settings()
        #: Names the connection in log records, e.g. ``conn-7 (127.0.0.1:50312)``.
        self.name = f"conn-{next(_connection_ids)}" + (f" ({peer})" if peer else "")
        self.state = SessionState.CONNECTING
        #: The close code that ended the connection: the peer's, or the one the core sent.
        self.close_code: int | None = None
        self._limiter = limiter
        self._observer = self.settings.observer or NULL_OBSERVER
        # Wrappers that instrument a server (``functools.wraps`` style) expose it as __wrapped__.
        engine = getattr(factory, "__wrapped__", factory)
        self._is_async = isinstance(engine, perspective.AsyncServer)
        # Only the in-memory engine answers cheap requests in microseconds; a virtual server
        # may run a SQL query for any request, so everything of theirs goes to a thread.
        self._engine_is_server = isinstance(engine, perspective.Server)
        self._inline_kinds = (
            self.settings.inline_request_kinds if self._engine_is_server else frozenset()
        )
        self._engine = engine
        self._engine_key = id(engine)
        self._views = ViewGuard(engine, self.settings.max_views_per_connection)
        #: Set in ``run`` from ``Settings.policy``, once the principal is known.
        self._guard = PolicyGuard(ALLOW_ALL, self._views.table_of)
        rate = self.settings.max_requests_per_second
        self._bucket = None if rate is None else TokenBucket(
            rate, self.settings.request_burst or max(1, int(rate))
        )
        #: Requests refused by the policy or the view guard so far.
        self.violations = 0
        self._last_received = 0.0
        self._probe: HostedTablesProbe | None = None
        self._hosted_visible: frozenset[str] | None = None
        #: Hosted-tables change notifications waiting to be checked, by subscription msg_id.
        self._hosted_pending: dict[int, bytes] = {}
        self._hosted_wakeup: anyio.Event | None = None
        self._session: Any = None
        self._lock = threading.Lock()
        self._outbox: deque[bytes] = deque()
        self._outbox_bytes = 0
        self._wake_pending = False
        self._overflowed = False
        self._request_running = False
        self._request_started = False
        #: Requests handed to the worker task and not yet answered.
        self._queued_requests = 0
        self._answering_inline = False
        #: A task is inside ``_flush``; only one may send at a time.
        self._sending = False
        self._close_deferred = False
        self._session_closed = False
        self.loop_thread = 0
        self.loop: object = None
        self._handoff: Callable[[Callable[[], None]], object] | None = None
        #: The connection's task group while it runs: the request worker is started in it only
        #: when requests are queued, so an idle connection runs two tasks (reader, writer).
        self._tasks: anyio.abc.TaskGroup | None = None
        self._writer_wakeup: anyio.Event | None = None
        self._worker_running = False
        self._inbox_receive: MemoryObjectReceiveStream[tuple[bytes, Envelope]] | None = None
        self._drained: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._abort: _Abort | None = None

    @property
    def outbox_bytes(self) -> int:
        """Bytes of replies and updates waiting to be handed to the transport."""
        return self._outbox_bytes

    async def run(self, transport: Transport) -> None:
        """Serve ``transport`` until either side closes it; the session is closed on return."""
        if self.state is not SessionState.CONNECTING:
            raise RuntimeError(f"SessionBridge.run() called on a {self.state.value} connection")
        self.loop_thread = threading.get_ident()
        self.loop, self._handoff = registry.current_loop()
        self._finished = anyio.Event()
        registry.add(self)
        try:
            await self._serve(transport)
        finally:
            if self._session is not None:
                self._observer.connection_closed(self, self.close_code)
            self.state = SessionState.CLOSED
            registry.discard(self)
            self._finished.set()

    async def _serve(self, transport: Transport) -> None:
        slots = connection_slots(self._engine)
        refused = slots.acquire(self.principal, self.settings)
        if refused is not None:
            # Before any session exists: a refused connection costs the engine nothing.
            self._observer.connection_refused(refused)
            logger.warning("%s: closing with 1013: %s reached", self.name, refused)
            self.close_code = CloseCode.TRY_AGAIN_LATER
            await self._close_transport(transport, CloseCode.TRY_AGAIN_LATER, f"{refused} reached")
            return
        try:
            await self._serve_admitted(transport)
        finally:
            slots.release(self.principal)

    def _resolve_policy(self) -> Policy:
        source = self.settings.policy
        policy = ALLOW_ALL if source is None else (
            source if isinstance(source, Policy) else source(self.principal)
        )
        if not isinstance(policy, Policy):
            raise TypeError(f"Settings.policy returned {policy!r}, not a Policy")
        if self.settings.read_only and not policy.read_only:
            policy = dataclasses.replace(policy, read_only=True)
        return policy

    async def _serve_admitted(self, transport: Transport) -> None:
        try:
            self._guard = PolicyGuard(self._resolve_policy(), self._views.table_of)
        except Exception:
            logger.exception("%s: Settings.policy failed; closing with 1011", self.name)
            self.close_code = CloseCode.INTERNAL_ERROR
            await self._close_transport(transport, CloseCode.INTERNAL_ERROR, "internal error")
            return
        if self._guard.filters_tables:
            # Subscriptions to the hosted-tables list need a first listing on the worker task.
            self._inline_kinds = frozenset(self._inline_kinds) - {GET_HOSTED_TABLES}
        if self._limiter is None:
            if self._engine_is_server:
                self._limiter = registry.thread_limiter(0, self.settings.max_request_threads)
            else:
                # One limiter per virtual server: its backend connection is shared by all
                # sessions and may not be thread-safe (a DuckDB connection is not).
                engine = getattr(self.factory, "__wrapped__", self.factory)
                self._limiter = registry.thread_limiter(
                    id(engine), self.settings.virtual_server_threads
                )
        callback = self._on_response_async if self._is_async else self._on_response
        self._session = self.factory.new_session(callback)
        self.state = SessionState.OPEN
        self._observer.connection_opened(self)
        peer_gone = False
        inbox_send, inbox_receive = anyio.create_memory_object_stream[tuple[bytes, Envelope]](
            self.settings.max_pending_requests
        )
        self._inbox_receive = inbox_receive
        self._writer_wakeup = anyio.Event()
        try:
            try:
                async with anyio.create_task_group() as tasks:
                    self._tasks = tasks
                    self._scope = tasks.cancel_scope
                    tasks.start_soon(self._write_loop, transport)
                    if self._guard.filters_tables:
                        self._hosted_wakeup = anyio.Event()
                        tasks.start_soon(self._hosted_tables_loop)
                    if self.settings.idle_timeout is not None:
                        tasks.start_soon(self._idle_loop, self.settings.idle_timeout)
                    await self._read_loop(transport, inbox_send)
            finally:
                # No task may be started once the group has ended, not even by a wake-up
                # already scheduled from another thread.
                self._tasks = None
        except anyio.get_cancelled_exc_class():
            # The server is shutting down and cancelled this connection: tell the client why
            # rather than leave it to the server's default (hypercorn sends 1011).
            self.close_code = CloseCode.GOING_AWAY
            await self._close_transport(transport, CloseCode.GOING_AWAY, "server shutting down")
            raise
        except Exception as exc:
            peer_gone = self._record_failure(exc)
        finally:
            self.state = SessionState.CLOSING
            inbox_send.close()
            inbox_receive.close()
            with self._lock:
                self._outbox.clear()
                self._outbox_bytes = 0
            closing = self._release_session()
            with anyio.CancelScope(shield=True):
                if closing is not None:
                    await closing
                if self._probe is not None:
                    await self._close_probe()
        if not peer_gone:
            abort = self._abort or _Abort(CloseCode.GOING_AWAY, "")
            self.close_code = abort.code
            await self._close_transport(transport, abort.code, abort.reason)
        if self.close_code in QUIET_CLOSE_CODES:
            logger.debug("%s: closed with %s", self.name, self.close_code)
        elif peer_gone:
            logger.info("%s: the client closed with %s", self.name, self.close_code)

    async def _close_transport(self, transport: Transport, code: int, reason: str) -> None:
        """Close the websocket, waiting at most ``close_timeout`` for the closing handshake;
        past it, drop the TCP connection if the transport can (a peer that stopped reading
        would otherwise hold it open behind the bytes the kernel already has)."""
        with anyio.move_on_after(self.settings.close_timeout, shield=True) as scope:
            await transport.close(code, reason)
        abort = getattr(transport, "abort", None)
        if scope.cancelled_caught and abort is not None:
            abort()

    def _record_failure(self, exc: Exception) -> bool:
        """Choose the close code for what ended the tasks; return whether the peer is gone."""
        leaves = _leaves(exc)
        faults = [e for e in leaves if not isinstance(e, (ConnectionClosed, ProtocolError, _Abort))]
        for leaf in leaves:
            if isinstance(leaf, ConnectionClosed):
                self.close_code = leaf.code
                if faults:
                    logger.error("%s: internal error", self.name, exc_info=faults[0])
                return True
        if faults:
            logger.error("%s: internal error; closing with 1011", self.name, exc_info=faults[0])
            self._abort = _Abort(CloseCode.INTERNAL_ERROR, "internal error")
            return False
        for leaf in leaves:
            if isinstance(leaf, ProtocolError):
                self._abort = _Abort(leaf.code, leaf.reason)
                logger.warning("%s: closing with %d: %s", self.name, leaf.code, leaf.reason)
            elif isinstance(leaf, _Abort):
                self._abort = leaf
        return False

    # Inbound ------------------------------------------------------------------------------

    async def _read_loop(
        self,
        transport: Transport,
        inbox: MemoryObjectSendStream[tuple[bytes, Envelope]],
    ) -> None:
        limit = self.settings.max_message_size
        observer = self._observer
        while True:
            frame = await transport.receive()
            self._last_received = anyio.current_time()
            observer.message_received(len(frame))
            if isinstance(frame, str):
                raise ProtocolError(
                    CloseCode.UNSUPPORTED_DATA, "text frames are not supported; send binary"
                )
            if len(frame) > limit:
                raise ProtocolError(
                    CloseCode.MESSAGE_TOO_BIG, f"message of {len(frame)} bytes exceeds {limit}"
                )
            data = frame if isinstance(frame, bytes) else bytes(frame)
            envelope = read_envelope(data)
            kind = envelope.kind
            if (
                kind in self._inline_kinds
                and not self._queued_requests
                and not self._outbox
                and not registry.engine_is_busy(self._engine_key)
            ):
                # Fast path: nothing is ahead of this cheap request, so answering it here
                # keeps the order and saves two task switches per round trip.
                self._answering_inline = True
                started = time.perf_counter()
                try:
                    refusal = self._refusal(envelope)
                    if refusal is None:
                        self._guard.note_request(envelope)
                        self._handle(data)
                        self._views.handled(envelope)
                    else:
                        self._on_response(refusal)
                finally:
                    self._answering_inline = False
                observer.request_handled(kind, time.perf_counter() - started)
                await self._flush(transport)
                continue
            self._queued_requests += 1
            try:
                inbox.send_nowait((data, envelope))
            except anyio.WouldBlock:
                # Full: the worker is busy with the requests ahead (it only stops once the
                # queue is empty). Waiting here stops the reading, and TCP pushes back.
                await inbox.send((data, envelope))
                continue
            # The request is queued before the worker is looked for: a worker that found the
            # queue empty has already stopped, and a new one is started.
            if not self._worker_running and self._tasks is not None:
                self._worker_running = True
                self._tasks.start_soon(self._request_loop)

    async def _request_loop(self) -> None:
        """Hand queued requests to the session one at a time; return once none is left."""
        assert self._inbox_receive is not None
        inbox = self._inbox_receive
        while True:
            try:
                data, envelope = inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                # No await between this check and the flag: the reader starts a new worker
                # for the next request.
                self._worker_running = False
                return
            # Replies to earlier requests must reach the transport before the next request
            # runs: this bounds what a pipelining client can make us buffer to one reply.
            await self._wait_drained()
            if self._abort is not None:
                raise self._abort
            kind = envelope.kind
            started = time.perf_counter()
            # Checked here, not on arrival: view ids are claimed and freed in engine order.
            refusal = self._refusal(envelope)
            if refusal is not None:
                self._on_response(refusal)
                self._queued_requests -= 1
                continue
            if self._guard.note_request(envelope):
                # What the client may see of the hosted tables now; later notifications are
                # passed on only when that changes.
                self._hosted_visible = await self._visible_tables()
            if self._is_async:
                await self._session.handle_request(data)
            elif kind in self._inline_kinds and not registry.engine_is_busy(self._engine_key):
                self._handle(data)
            else:
                await self._handle_in_thread(data)
            self._views.handled(envelope)
            self._observer.request_handled(kind, time.perf_counter() - started)
            self._queued_requests -= 1

    async def _handle_in_thread(self, data: bytes) -> None:
        with self._lock:
            self._request_running = True
            self._request_started = False
        executor = self.settings.executor
        registry.mark_busy(self._engine_key, 1)
        try:
            if executor is None:
                # The thread is abandoned on cancel: it cannot be interrupted, and
                # _finish_request closes the session once it returns.
                await anyio.to_thread.run_sync(
                    self._run_request, data, limiter=self._limiter, abandon_on_cancel=True
                )
                return
            future = executor.submit(self._run_request, data)
            future.add_done_callback(self._on_executor_done)
            await asyncio.wrap_future(future)
        except anyio.get_cancelled_exc_class():
            with self._lock:
                if not self._request_started:
                    # Cancelled while waiting for a thread: anyio will never run it, so no
                    # thread is left to close the session; _release_session must do it.
                    self._request_running = False
            raise
        finally:
            registry.mark_busy(self._engine_key, -1)

    def _run_request(self, data: bytes) -> None:
        with self._lock:
            if not self._request_running:
                return  # Given up on before it started; the session may be closed already.
            self._request_started = True
        try:
            self._handle(data)
        finally:
            self._finish_request()

    def _refusal(self, envelope: Envelope) -> bytes | None:
        """Return a ``ServerError`` reply if a limit, the policy or the view guard refuses
        ``envelope``; raise to close with 1008 once the connection has too many refusals."""
        if self._bucket is not None and not self._bucket.take():
            # Not a violation: a client that bursts is throttled, not judged.
            refused = Refused(
                "rate", f"rate limit: over {self.settings.max_requests_per_second:g} "
                "requests per second"
            )
        else:
            found = self._guard.refuse(envelope) or self._views.refuse(envelope)
            if found is None:
                return None
            refused = found
            self.violations += 1
        self._observer.request_refused(envelope.kind, refused.reason)
        if self.violations > self.settings.max_violations:
            raise ProtocolError(
                CloseCode.POLICY_VIOLATION,
                f"too many refused requests ({self.violations}); the last: {refused.message}",
            )
        return encode_server_error(
            envelope.msg_id, envelope.entity_id, refused.message, refused.status
        )

    def _handle(self, data: bytes) -> None:
        try:
            self._session.handle_request(data)
        except ValueError as exc:
            # The engine answers a malformed request with a ServerError, but virtual servers
            # decode it in their Python layer and raise instead: that is the client's fault.
            if "decode" not in str(exc):
                raise
            raise ProtocolError(CloseCode.INVALID_PAYLOAD, f"undecodable request: {exc}") from None

    def _on_executor_done(self, future: concurrent.futures.Future[None]) -> None:
        # A request cancelled before it started never reaches _run_request's cleanup.
        if future.cancelled():
            self._finish_request()

    def _finish_request(self) -> None:
        with self._lock:
            self._request_running = False
            close_now = self._close_deferred
        if close_now:
            self._close_session()

    # Outbound -----------------------------------------------------------------------------

    def _on_response(self, data: bytes) -> None:
        """Perspective's callback: runs on any thread, must never block the engine or raise."""
        try:
            self._views.on_response(data)
            if self._guard.filters_tables:
                data, notification = self._guard.filter_reply(data)
                if notification:
                    self._hosted_tables_changed(data)
                    return
            self._enqueue(data)
        except Exception:
            # The loop may already be closed during interpreter or server shutdown.
            logger.debug("%s: dropped a response", self.name, exc_info=True)

    def _enqueue(self, data: bytes) -> None:
        """Queue ``data`` for the writer; any thread may call it."""
        size = len(data)
        on_loop = threading.get_ident() == self.loop_thread
        with self._lock:
            if self.state is not SessionState.OPEN or self._overflowed:
                return
            if self._outbox and self._outbox_bytes + size > self.settings.max_send_queue_bytes:
                # Only pushed updates can get here (see _request_loop). Holding more would
                # let one stalled client grow server memory without limit.
                self._overflowed = True
                self._outbox.clear()
                self._outbox_bytes = 0
            else:
                self._outbox.append(data)
                self._outbox_bytes += size
            if not self._overflowed and (
                self._wake_pending or (on_loop and self._answering_inline)
            ):
                return  # A wake-up is on its way, or the reader flushes right after.
            self._wake_pending = True
        if on_loop:
            self._wake_writer()
        elif self._handoff is not None:
            self._handoff(self._wake_writer)

    async def _on_response_async(self, data: bytes) -> None:
        # AsyncServer awaits its callback on the event loop.
        self._on_response(data)

    async def _idle_loop(self, timeout: float) -> None:
        """Close the connection once it has been silent for ``timeout`` with nothing to wait
        for: no views (whose updates it may be watching), no subscription, no request."""
        self._last_received = anyio.current_time()
        while True:
            silent_until = self._last_received + timeout
            now = anyio.current_time()
            if now < silent_until:
                await anyio.sleep(silent_until - now)
                continue
            if self._views.holds_views or self._guard.subscriptions or self._queued_requests:
                self._last_received = now  # not idle: look again a full period later
                continue
            logger.info("%s: closing after %gs idle", self.name, timeout)
            self.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
            return

    # Hosted tables, under a table allow-list ----------------------------------------------

    def _hosted_tables_changed(self, notification: bytes) -> None:
        """A subscription was told the hosted tables changed; any thread may call it."""
        with self._lock:
            if self.state is not SessionState.OPEN:
                return
            first = not self._hosted_pending
            self._hosted_pending[read_envelope(notification).msg_id] = notification
        if not first:
            return  # The check already scheduled covers this one.
        if threading.get_ident() == self.loop_thread:
            self._wake_hosted()
        elif self._handoff is not None:
            self._handoff(self._wake_hosted)

    def _wake_hosted(self) -> None:
        if self._hosted_wakeup is not None:
            self._hosted_wakeup.set()

    async def _hosted_tables_loop(self) -> None:
        while True:
            assert self._hosted_wakeup is not None
            await self._hosted_wakeup.wait()
            self._hosted_wakeup = anyio.Event()
            with self._lock:
                pending, self._hosted_pending = self._hosted_pending, {}
            if not pending:
                continue
            visible = await self._visible_tables()
            if visible == self._hosted_visible:
                continue  # Only hidden tables came or went: the client must not know.
            self._hosted_visible = visible
            for notification in pending.values():
                self._enqueue(notification)

    async def _visible_tables(self) -> frozenset[str]:
        if self._probe is None:
            self._probe = HostedTablesProbe(self.factory, self._is_async)
        probe = self._probe
        if self._engine_is_server or self._is_async:
            names = await probe.names()  # microseconds on the in-memory engine
        else:
            names = await probe.names(
                lambda call: anyio.to_thread.run_sync(call, limiter=self._limiter)
            )
        return self._guard.visible(names)

    async def _close_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        try:
            await probe.close()
        except Exception:
            logger.exception("%s: closing the hosted-tables session failed", self.name)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Ask a running connection to close with ``code``; call it on the connection's loop."""
        if self._scope is not None and self._abort is None and self.state is SessionState.OPEN:
            self._abort = _Abort(code, reason)
            # Cancel rather than signal: the writer may be stuck sending to a stalled client.
            self._scope.cancel()

    async def wait_closed(self) -> None:
        """Wait until ``run`` has returned."""
        await self._finished.wait()

    def _wake_writer(self) -> None:
        if self._overflowed and self._abort is None:
            reason = "outbound queue overflow: the client reads too slowly"
            logger.warning("%s: closing with 1013: %s", self.name, reason)
            self.close(CloseCode.TRY_AGAIN_LATER, reason)
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()

    async def _write_loop(self, transport: Transport) -> None:
        # Always running: wake-ups come from loop callbacks scheduled by other threads, where
        # no task can be started.
        while True:
            await self._flush(transport)
            with self._lock:
                if self._outbox and not self._sending:
                    continue
                self._wake_pending = False
                wakeup = self._writer_wakeup = anyio.Event()
            await wakeup.wait()

    async def _flush(self, transport: Transport) -> None:
        """Send everything queued, unless another task is already doing so."""
        if self._sending:
            return  # Two concurrent sends could reorder frames on some frameworks.
        self._sending = True
        try:
            while True:
                with self._lock:
                    if not self._outbox:
                        break
                    data = self._outbox.popleft()
                    self._outbox_bytes -= len(data)
                await transport.send(data)
                self._observer.message_sent(len(data))
        finally:
            self._sending = False
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    async def _wait_drained(self) -> None:
        with self._lock:
            if not self._outbox and not self._sending:
                return
            drained = self._drained = anyio.Event()
        await drained.wait()

    # Teardown -----------------------------------------------------------------------------

    def _release_session(self) -> Awaitable[Any] | None:
        with self._lock:
            if self._request_running:
                # The engine is still inside handle_request on a worker thread; closing the
                # session under it is unsafe, so the thread closes it when it returns.
                self._close_deferred = True
                return None
        return self._close_session()

    def _close_session(self) -> Awaitable[Any] | None:
        """Close the Perspective session exactly once; an async session returns an awaitable."""
        with self._lock:
            if self._session_closed or self._session is None:
                return None
            self._session_closed = True
        close: Callable[[], Any] | None = getattr(self._session, "close", None)
        if close is None:
            self._views.release_all()
            return None  # Virtual server sessions have nothing to release.
        try:
            result = close()
        except Exception:
            logger.exception("%s: closing the Perspective session failed", self.name)
            self._views.release_all()
            return None
        if inspect.isawaitable(result):
            return self._release_views_after(result)
        # The session deleted its views: their ids may now be taken by other connections.
        self._views.release_all()
        return None

    async def _release_views_after(self, closing: Awaitable[Any]) -> None:
        try:
            await closing
        finally:
            self._views.release_all()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
