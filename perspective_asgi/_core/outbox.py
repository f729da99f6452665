"""The outbound queue of one connection: filled from any thread, drained by one task at a time.

Perspective calls a session's callback on whichever thread ran the request or the
``table.update()`` behind it, so ``put`` takes a lock of its own and never blocks beyond it.
The queue is bounded in bytes, with one exception that keeps large replies working: a message
put into an empty outbox is always admitted, whatever its size. The bridge hands the engine
the next request only once the outbox is empty (see ``bridge.py``), so a reply always finds it
empty and only pushed updates can overflow it.

The state says who must act next, so exactly one drain runs at a time without a flag beside it:

    IDLE --put/claim--> DRAINING --take() finds it empty--> IDLE
      \\                    |
       +------- a put past the bound ------> OVERFLOWED (everything dropped)
    any state --close()--> CLOSED
"""

from __future__ import annotations

import enum
import threading
from collections import deque


class OutboxState(enum.Enum):
    """Who must act on an outbox next."""

    #: Empty, and nobody is draining it: the next ``put`` must arrange a drain.
    IDLE = "idle"
    #: A drain is scheduled or running; it goes on until ``take`` finds the outbox empty.
    DRAINING = "draining"
    #: A put crossed the bound: what was queued is dropped and the connection must close.
    OVERFLOWED = "overflowed"
    #: The connection has ended; puts are dropped.
    CLOSED = "closed"


class Outbox:
    """Messages waiting to be sent, at most ``limit`` bytes of them but for the first."""

    __slots__ = ("_items", "_lock", "limit", "queued_bytes", "state")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.state = OutboxState.IDLE
        #: Bytes queued and not yet taken.
        self.queued_bytes = 0
        # Created on the first put of a burst and dropped when drained: an idle connection
        # holds no deque.
        self._items: deque[bytes] | None = None
        self._lock = threading.Lock()

    def put(self, data: bytes) -> bool:
        """Queue ``data``; any thread may call it.

        Return whether the caller must act: start a drain (the outbox was idle), or close the
        connection (this put overflowed it).
        """
        with self._lock:
            state = self.state
            if state is OutboxState.OVERFLOWED or state is OutboxState.CLOSED:
                return False
            items = self._items
            if items and self.queued_bytes + len(data) > self.limit:
                # Holding more would let one stalled client grow server memory without limit.
                self.state = OutboxState.OVERFLOWED
                self._items = None
                self.queued_bytes = 0
                return True
            if items is None:
                items = self._items = deque()
            items.append(data)
            self.queued_bytes += len(data)
            if state is OutboxState.IDLE:
                self.state = OutboxState.DRAINING
                return True
            return False

    def claim(self) -> bool:
        """Become the drainer of an idle, empty outbox; return whether the caller now is.

        A task that is about to produce replies itself and send them right after claims the
        outbox first, so the replies do not also wake another drainer.
        """
        with self._lock:
            if self.state is OutboxState.IDLE:
                self.state = OutboxState.DRAINING
                return True
            return False

    def take(self) -> bytes | None:
        """Return the next message; ``None`` once empty, which ends the drain (state IDLE)."""
        with self._lock:
            if self.state is not OutboxState.DRAINING:
                return None
            items = self._items
            if not items:
                self._items = None
                self.state = OutboxState.IDLE
                return None
            data = items.popleft()
            self.queued_bytes -= len(data)
            return data

    def close(self) -> None:
        """Drop everything queued and every later put."""
        with self._lock:
            self.state = OutboxState.CLOSED
            self._items = None
            self.queued_bytes = 0
