"""The bridge: one Perspective session served over one websocket, from handshake to close.

While a connection is idle it runs one task, the reader, inside the connection's task group.
Other tasks exist only while there is work for them:

* the request worker, while requests are queued (a cheap request with nothing ahead of it is
  answered by the reader itself, which keeps the order and saves two task switches);
* a drain, while the outbox holds messages pushed from another thread (a table update);
* a hosted-tables check, under a table allow-list, when the list may have changed.

Perspective calls the session's callback on whichever thread ran the request or the
``table.update()`` behind it. The callback puts into the outbox, which has its own lock, and
when a drain must start it hands that to the event loop through its thread-safe entry point;
it never touches the loop's objects from a foreign thread and never raises into Perspective.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import anyio
import anyio.abc

from .._codes import QUIET_CLOSE_CODES, CloseCode
from .._config import Settings
from .._exceptions import ConnectionClosed, ProtocolError
from .._observer import NULL_OBSERVER
from .._types import SessionFactory, Transport
from . import registry, sharing
from .guards import GuardChain
from .hosted import HostedTablesGate, HostedTablesProbe
from .idle import IdleWatch
from .limits import connection_slots
from .memory import release_after_send
from .outbox import Outbox, OutboxState
from .policy import resolve_policy
from .runner import EngineKind, RequestRunner, default_limiter
from .wire import Envelope, read_envelope

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("perspective_asgi")

_connection_ids = itertools.count(1)


class SessionState(enum.Enum):
    """Where a connection is in its life."""

    #: Created; ``run`` has not been called, or the connection is not admitted yet.
    CONNECTING = "connecting"
    #: The Perspective session exists and requests are being served.
    OPEN = "open"
    #: A close was asked for or has begun: no new work starts, the session is being released.
    CLOSING = "closing"
    #: ``run`` has returned.
    CLOSED = "closed"


class _Close(NamedTuple):
    """The close frame the core sends when it ends a connection."""

    code: int
    reason: str


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

    #: How foreign threads reach the connection's loop; set when ``run`` starts.
    _handoff: registry.LoopHandle

    __slots__ = (
        "__weakref__", "_closing", "_drained", "_engine", "_finished", "_gate", "_guards",
        "_handoff", "_idle", "_inbox", "_inbox_space", "_limiter", "_observer", "_outbox",
        "_runner", "_tasks", "_transport", "_writer_wake", "close_code", "factory", "loop",
        "name", "principal", "settings", "state",
    )

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
        #: The event loop (or trio token) serving the connection, once it runs.
        self.loop: object = None
        self._limiter = limiter
        self._observer = self.settings.observer or NULL_OBSERVER
        # Wrappers that instrument a server (``functools.wraps`` style) expose it as __wrapped__.
        self._engine = getattr(factory, "__wrapped__", factory)
        self._outbox = Outbox(self.settings.max_send_queue_bytes)
        # Made once the connection is admitted, and only what its settings need:
        self._guards: GuardChain | None = None
        self._gate: HostedTablesGate | None = None
        self._runner: RequestRunner | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._transport: Transport | None = None
        self._idle: IdleWatch | None = None
        # Made while there is work, dropped after it:
        #: Requests waiting for the worker; the worker runs exactly while this is not None.
        self._inbox: deque[tuple[bytes, Envelope]] | None = None
        self._inbox_space: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        #: Set while the writer task waits for the outbox to fill again.
        self._writer_wake: _Wake | None = None
        self._finished: anyio.Event | None = None
        #: The close frame the core will send, once it has decided to end the connection.
        self._closing: _Close | None = None

    @property
    def outbox_bytes(self) -> int:
        """Bytes of replies and updates waiting to be handed to the transport."""
        return self._outbox.queued_bytes

    @property
    def violations(self) -> int:
        """Requests refused by the policy or the view guard so far."""
        return 0 if self._guards is None else self._guards.violations

    # Lifecycle ----------------------------------------------------------------------------

    async def run(self, transport: Transport) -> None:
        """Serve ``transport`` until either side closes it; the session is closed on return."""
        if self.state is not SessionState.CONNECTING or self.loop is not None:
            raise RuntimeError(
                f"SessionBridge.run() called on a {self.state.value} connection; "
                "expected a new one"
            )
        self._handoff = registry.LoopHandle()
        self.loop = self._handoff.loop
        if self._limiter is None:
            self._limiter = default_limiter(self._engine, self.settings)
        registry.add(self)
        try:
            await self._admit(transport)
        finally:
            if self._runner is not None:
                self._observer.connection_closed(self, self.close_code)
            self.state = SessionState.CLOSED
            registry.discard(self)
            if self._finished is not None:
                self._finished.set()

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Ask a running connection to close with ``code``; call it on the connection's loop."""
        if self.state is SessionState.OPEN and self._tasks is not None:
            self.state = SessionState.CLOSING
            self._closing = _Close(code, reason)
            # Cancel rather than signal: a drain may be stuck sending to a stalled client.
            self._tasks.cancel_scope.cancel()

    async def wait_closed(self) -> None:
        """Wait until ``run`` has returned; at once if it never started or has returned."""
        if self.loop is None or self.state is SessionState.CLOSED:
            return
        if self._finished is None:
            self._finished = anyio.Event()
        await self._finished.wait()

    async def _admit(self, transport: Transport) -> None:
        slots = connection_slots(self._engine)
        settings = self.settings
        refused = slots.acquire(
            self.principal, settings.max_connections, settings.max_connections_per_principal
        )
        if refused is not None:
            # Before any session exists: a refused connection costs the engine nothing.
            self._observer.connection_refused(refused)
            logger.warning("%s: closing with 1013: %s reached", self.name, refused)
            await self._close_transport(
                transport, _Close(CloseCode.TRY_AGAIN_LATER, f"{refused} reached")
            )
            return
        try:
            try:
                guards, gate = self._make_guards()
            except Exception:
                logger.exception("%s: Settings.policy failed; closing with 1011", self.name)
                await self._close_transport(
                    transport, _Close(CloseCode.INTERNAL_ERROR, "internal error")
                )
                return
            await self._serve(transport, guards, gate)
        finally:
            slots.release(self.principal)

    def _make_guards(self) -> tuple[GuardChain, HostedTablesGate | None]:
        settings = self.settings
        policy = resolve_policy(settings.policy, self.principal, read_only=settings.read_only)
        guards = GuardChain.for_connection(self._engine, policy, settings, self._observer)
        if not guards.policy.filters_tables:
            return guards, None
        kind = EngineKind.of(self._engine)
        probe = HostedTablesProbe(self.factory, kind is EngineKind.ASYNC_SERVER)
        in_thread = None if kind is not EngineKind.VIRTUAL else functools.partial(
            anyio.to_thread.run_sync, limiter=self._limiter
        )
        return guards, HostedTablesGate(probe, guards.policy.visible, in_thread)

    async def _serve(
        self, transport: Transport, guards: GuardChain, gate: HostedTablesGate | None
    ) -> None:
        kind = EngineKind.of(self._engine)
        asynchronous = kind is EngineKind.ASYNC_SERVER
        callback = self._on_response_async if asynchronous else self._on_response
        self._guards, self._gate, self._transport = guards, gate, transport
        limiter = self._limiter
        assert limiter is not None, "resolved in run()"
        session = _new_session(self.factory, self._engine, kind, self.settings, callback)
        self._runner = RequestRunner(
            session, kind, engine_key=id(self._engine), limiter=limiter, name=self.name,
            inline_kinds=self.settings.inline_request_kinds, executor=self.settings.executor,
            on_closed=guards.views.release_all)
        self.state = SessionState.OPEN
        self._observer.connection_opened(self)
        peer_gone = False
        try:
            await self._run_tasks(transport)
        except anyio.get_cancelled_exc_class():
            # The server is shutting down and cancelled this connection: tell the client why
            # rather than leave it to the server's default (hypercorn sends 1011).
            await self._release()
            await self._close_transport(
                transport, _Close(CloseCode.GOING_AWAY, "server shutting down")
            )
            raise
        except Exception as exc:
            peer_code, closing = _what_ended(exc, self.name)
            peer_gone = peer_code is not None
            if peer_gone:
                self.close_code = peer_code
            self._closing = closing or self._closing
        await self._release()
        if not peer_gone:
            closing = self._closing or _Close(CloseCode.GOING_AWAY, "")
            await self._close_transport(transport, closing)
        if self.close_code in QUIET_CLOSE_CODES:
            logger.debug("%s: closed with %s", self.name, self.close_code)
        elif peer_gone:
            logger.info("%s: the client closed with %s", self.name, self.close_code)

    async def _run_tasks(self, transport: Transport) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                if self.settings.idle_timeout is not None:
                    self._idle = IdleWatch(self.settings.idle_timeout)
                    tasks.start_soon(self._idle.watch, self._busy, self._close_idle)
                await self._read_loop(transport)
        finally:
            # No task may start once the group has ended, not even from a wake-up that
            # another thread scheduled already.
            self._tasks = None

    def _busy(self) -> bool:
        return self._inbox is not None or (self._guards is not None and self._guards.holds_state)

    def _close_idle(self) -> None:
        logger.info("%s: closing after %gs idle", self.name, self.settings.idle_timeout)
        self.close(CloseCode.NORMAL_CLOSURE, "idle timeout")

    async def _release(self) -> None:
        """Drop what is queued and close the session (deferred while a thread is inside)."""
        self.state = SessionState.CLOSING
        self._outbox.close()
        self._inbox = None
        assert self._runner is not None
        closing = self._runner.close_session()
        with anyio.CancelScope(shield=True):
            if closing is not None:
                await closing
            if self._gate is not None:
                try:
                    await self._gate.close()
                except Exception:
                    logger.exception("%s: closing the hosted-tables session failed", self.name)

    async def _close_transport(self, transport: Transport, close: _Close) -> None:
        """Close the websocket, waiting at most ``close_timeout`` for the closing handshake;
        past it, drop the TCP connection if the transport can (a peer that stopped reading
        would otherwise hold it open behind the bytes the kernel already has)."""
        self.close_code = close.code
        with anyio.move_on_after(self.settings.close_timeout, shield=True) as scope:
            await transport.close(close.code, close.reason)
        abort = getattr(transport, "abort", None)
        if scope.cancelled_caught and abort is not None:
            abort()

    # Inbound ------------------------------------------------------------------------------

    async def _read_loop(self, transport: Transport) -> None:
        limit = self.settings.max_message_size
        observer = self._observer
        runner, outbox, guards = self._runner, self._outbox, self._guards
        assert runner is not None and guards is not None
        while True:
            frame = await transport.receive()
            if self._idle is not None:
                self._idle.touch()
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
            if (
                self._inbox is None
                and runner.runs_inline(
                    envelope.kind, guards.table_of(envelope), len(data), envelope
                )
                and outbox.claim()
            ):
                # Nothing is ahead of this cheap request and the outbox is ours: answering it
                # here keeps the order and saves two task switches per round trip.
                await self._handle(data, envelope)
                await self._drain(transport)
            else:
                await self._enqueue_request(data, envelope)

    async def _enqueue_request(self, data: bytes, envelope: Envelope) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
            assert self._tasks is not None
            self._tasks.start_soon(self._work, inbox)
        inbox.append((data, envelope))
        while len(inbox) >= self.settings.max_pending_requests and self._inbox is inbox:
            # Full: waiting here stops the reading, and TCP pushes back on the client.
            space = self._inbox_space = anyio.Event()
            await space.wait()

    async def _work(self, inbox: deque[tuple[bytes, Envelope]]) -> None:
        """Hand queued requests to the session one at a time; return once none is left."""
        while inbox:
            data, envelope = inbox.popleft()
            if self._inbox_space is not None:
                self._inbox_space.set()
                self._inbox_space = None
            # Replies to earlier requests must reach the transport before the next request
            # runs: this bounds what a pipelining client can make us buffer to one reply.
            await self._wait_drained()
            await self._handle(data, envelope)
        # No await since the check: the reader starts a new worker for the next request.
        self._inbox = None

    async def _handle(self, data: bytes, envelope: Envelope) -> None:
        """Admit one request and run it: the one path of the reader and the worker."""
        guards, runner = self._guards, self._runner
        assert guards is not None and runner is not None
        started = time.perf_counter()
        # Checked here, not on arrival: view ids are claimed and freed in engine order.
        refusal = guards.admit(envelope)
        if refusal is not None:
            self._put(refusal)
            return
        if self._gate is not None:
            await self._gate.before(envelope)
        await runner.run(data, envelope.kind, guards.table_of(envelope), envelope)
        guards.handled(envelope)
        self._observer.request_handled(envelope.kind, time.perf_counter() - started)

    # Outbound -----------------------------------------------------------------------------

    def _on_response(self, data: bytes) -> None:
        """Perspective's callback: runs on any thread, must never block the engine or raise."""
        try:
            guards = self._guards
            assert guards is not None
            data, notification = guards.filter_reply(data)
            if notification:
                assert self._gate is not None
                if self._gate.changed(data):
                    self._handoff.call(self._start_check)
                return
            self._put(data)
        except Exception:
            # The loop may already be closed during interpreter or server shutdown.
            logger.debug("%s: dropped a response", self.name, exc_info=True)

    async def _on_response_async(self, data: bytes) -> None:
        # AsyncServer awaits its callback on the event loop.
        self._on_response(data)

    def _put(self, data: bytes) -> None:
        """Queue ``data`` for the client; any thread may call it."""
        if self._outbox.put(data):
            self._handoff.call(self._start_drain)

    def _start_drain(self) -> None:
        """On the loop: start draining the outbox, or close if it overflowed."""
        if self._tasks is None or self._transport is None:
            return  # the connection has ended
        if self._outbox.state is OutboxState.OVERFLOWED:
            if self.state is SessionState.OPEN:
                reason = "outbound queue overflow: the client reads too slowly"
                logger.warning("%s: closing with 1013: %s", self.name, reason)
                self.close(CloseCode.TRY_AGAIN_LATER, reason)
            return
        wake, self._writer_wake = self._writer_wake, None
        if wake is not None:
            wake.set()  # the writer is waiting: cheaper than a new task on every update
        else:
            self._tasks.start_soon(self._write_loop, self._transport)

    def _start_check(self) -> None:
        if self._tasks is not None and self._gate is not None:
            self._tasks.start_soon(self._gate.check, self._put)

    async def _write_loop(self, transport: Transport) -> None:
        """Drain the outbox each time it fills; wait for more while the connection holds
        views (their updates keep coming), end once it holds none."""
        assert self._guards is not None
        while True:
            await self._drain(transport)
            if not self._guards.holds_state:
                return
            # No await since the drain ended: a put that follows finds this wake-up.
            wake = self._writer_wake = _wake_event(self.loop)
            await wake.wait()

    async def _drain(self, transport: Transport) -> None:
        """Send what the outbox holds until it is empty; only the outbox's drainer calls it."""
        outbox, observer = self._outbox, self._observer
        while (data := outbox.take()) is not None:
            size = len(data)
            await transport.send(data)
            del data  # the last reference: a large reply's memory is free before the trim
            observer.message_sent(size)
            release_after_send(size)
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    async def _wait_drained(self) -> None:
        if self._outbox.state is OutboxState.DRAINING:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()


def _new_session(
    factory: SessionFactory, engine: SessionFactory, kind: EngineKind, settings: Settings,
    callback: Callable[[bytes], Any],
) -> Any:
    """The session a connection's runner drives: its own, or, when views are shared, a
    router that sends view requests to the engine's shared views and the rest to its own."""
    session = factory.new_session(callback)
    if kind is EngineKind.SERVER and settings.share_views:
        return sharing.router_for(engine, session, callback)
    return session


class _Wake(Protocol):
    def set(self) -> None: ...
    async def wait(self) -> Any: ...


def _wake_event(loop: object) -> _Wake:
    """An event for the writer to wait on, once per update it sends.

    On asyncio, asyncio's own: ``anyio.Event()`` looks the running backend up each time it is
    made, which took 12 % of the loop's samples with 600 subscribers of one update stream;
    without it the server used 14 % less CPU (py-spy on benchmarks/run.py's fan-out). It is
    set on the loop only, and cancelled as any await is, so anyio's cancel scopes apply.
    """
    return asyncio.Event() if isinstance(loop, asyncio.AbstractEventLoop) else anyio.Event()


def _what_ended(exc: Exception, name: str) -> tuple[int | None, _Close | None]:
    """Read what ended a connection's tasks: the peer's close code if the peer is gone, or
    the close frame to send it; faults are logged once, with the connection's ``name``."""
    leaves = _leaves(exc)
    faults = [e for e in leaves if not isinstance(e, (ConnectionClosed, ProtocolError))]
    for leaf in leaves:
        if isinstance(leaf, ConnectionClosed):
            if faults:
                logger.error("%s: internal error", name, exc_info=faults[0])
            return leaf.code, None
    if faults:
        logger.error("%s: internal error; closing with 1011", name, exc_info=faults[0])
        return None, _Close(CloseCode.INTERNAL_ERROR, "internal error")
    for leaf in leaves:
        if isinstance(leaf, ProtocolError):
            logger.warning("%s: closing with %d: %s", name, leaf.code, leaf.reason)
            return None, _Close(leaf.code, leaf.reason)
    return None, None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
