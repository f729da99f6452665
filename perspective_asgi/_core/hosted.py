"""The hosted-tables gate: under a table allow-list, hidden tables come and go unseen.

With a table allow-list, a connection must not learn that a hidden table was created or
deleted. The engine tells every subscriber of the hosted-tables list that the list changed,
without saying how; so before passing such a notification on, the gate lists the tables
itself, through a private session of the server, and compares the part the connection may
see with what it saw last. Connections without an allow-list have no gate.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import threading
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from .._types import SessionFactory
from .policy import hosted_table_names, subscribes
from .wire import GET_HOSTED_TABLES, Envelope, encode_field, read_envelope

RunInThread = Callable[[Callable[[], list[str]]], Awaitable[list[str]]]


class HostedTablesProbe:
    """A private session that asks for the hosted tables' names; opened on first use."""

    def __init__(self, factory: SessionFactory, is_async: bool) -> None:
        self._factory = factory
        self._is_async = is_async
        self._session: Any = None
        self._replies: list[bytes] = []
        self._msg_ids = itertools.count(1)

    def _open(self) -> Any:
        if self._session is None:
            if self._is_async:
                async def on_reply(data: bytes) -> None:
                    self._replies.append(bytes(data))

                self._session = self._factory.new_session(on_reply)
            else:
                self._session = self._factory.new_session(
                    lambda data: self._replies.append(bytes(data))
                )
        return self._session

    def _request(self) -> bytes:
        self._replies.clear()
        return encode_field(1, next(self._msg_ids)) + encode_field(GET_HOSTED_TABLES, b"")

    def _names(self) -> list[str]:
        if not self._replies:
            raise RuntimeError("the server did not answer a hosted-tables request in its call")
        return hosted_table_names(self._replies[-1])

    def _list_sync(self) -> list[str]:
        self._open().handle_request(self._request())
        return self._names()

    async def names(self, run_in_thread: RunInThread | None = None) -> list[str]:
        """List the hosted tables; ``run_in_thread`` runs a synchronous session's request."""
        if self._is_async:
            await self._open().handle_request(self._request())
            return self._names()
        if run_in_thread is not None:
            return await run_in_thread(self._list_sync)
        return self._list_sync()

    async def close(self) -> None:
        session, self._session = self._session, None
        close = getattr(session, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result


class GateState(enum.Enum):
    """Whether a check of the hosted tables is due."""

    #: No notification is waiting: the next one must schedule a check.
    IDLE = "idle"
    #: A check is scheduled or running; it takes every notification that arrives meanwhile.
    CHECKING = "checking"
    #: The connection has ended.
    CLOSED = "closed"


class HostedTablesGate:
    """Passes a hosted-tables change notification on only if the visible tables changed."""

    __slots__ = ("_lock", "_pending", "_probe", "_run_in_thread", "_visible", "_visible_of",
                 "state")

    def __init__(
        self,
        probe: HostedTablesProbe,
        visible_of: Callable[[Collection[str]], frozenset[str]],
        run_in_thread: RunInThread | None,
    ) -> None:
        self._probe = probe
        #: The part of a listing this connection may see.
        self._visible_of = visible_of
        #: How a listing runs for a virtual server (a thread); ``None`` runs it inline.
        self._run_in_thread = run_in_thread
        #: What the client saw last.
        self._visible: frozenset[str] | None = None
        #: Notifications waiting for the check, by subscription msg_id (the latest of each).
        self._pending: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.state = GateState.IDLE

    async def before(self, envelope: Envelope) -> None:
        """Before a subscription reaches the engine, note what the client sees now."""
        if subscribes(envelope):
            self._visible = await self._list()

    def changed(self, notification: bytes) -> bool:
        """Hold a change notification; return whether the caller must schedule ``check``.

        Any thread may call it.
        """
        msg_id = read_envelope(notification).msg_id
        with self._lock:
            if self.state is GateState.CLOSED:
                return False
            self._pending[msg_id] = notification
            if self.state is GateState.CHECKING:
                return False  # the check under way takes this one too
            self.state = GateState.CHECKING
            return True

    async def check(self, deliver: Callable[[bytes], object]) -> None:
        """List the tables and ``deliver`` the held notifications if the client would see a
        change; repeat while more arrive."""
        while True:
            with self._lock:
                pending, self._pending = self._pending, {}
                if not pending:
                    if self.state is GateState.CHECKING:
                        self.state = GateState.IDLE
                    return
            visible = await self._list()
            if visible == self._visible:
                continue  # only hidden tables came or went: the client must not know
            self._visible = visible
            for notification in pending.values():
                deliver(notification)

    async def _list(self) -> frozenset[str]:
        return self._visible_of(await self._probe.names(self._run_in_thread))

    async def close(self) -> None:
        with self._lock:
            self.state = GateState.CLOSED
            self._pending = {}
        await self._probe.close()
