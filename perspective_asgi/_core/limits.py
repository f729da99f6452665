"""Limits on how much of a server one client, or one principal, may use.

* Connections: at most ``Settings.max_connections`` open connections to one Perspective
  server in this process, and ``max_connections_per_principal`` for any one authenticated
  principal. A connection past either is closed with 1013 before any session is created.
* Requests per second per connection: a token bucket holding ``request_burst`` tokens and
  refilled at ``max_requests_per_second``. A request finding it empty is refused with an error
  reply without reaching the engine; the connection stays open.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable


class TokenBucket:
    """Admits ``burst`` requests at once and ``rate`` per second on average."""

    __slots__ = ("_clock", "_tokens", "_updated", "burst", "rate")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def take(self) -> bool:
        """Spend one token if there is one; return whether the request may go ahead."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ConnectionSlots:
    """Counts the open connections of one server, in all and per principal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.per_principal: Counter[Hashable] = Counter()

    def acquire(
        self, principal: object, max_total: int | None, max_per_principal: int | None
    ) -> str | None:
        """Take a slot for a connection; return why it is refused (``None`` if admitted)."""
        key = principal_key(principal)
        with self._lock:
            if max_total is not None and self.total >= max_total:
                return "max_connections"
            limit = max_per_principal
            if key is not None and limit is not None and self.per_principal[key] >= limit:
                return "max_connections_per_principal"
            self.total += 1
            if key is not None:
                self.per_principal[key] += 1
        return None

    def release(self, principal: object) -> None:
        key = principal_key(principal)
        with self._lock:
            self.total -= 1
            if key is not None:
                self.per_principal[key] -= 1
                if not self.per_principal[key]:
                    del self.per_principal[key]


def principal_key(principal: object) -> Hashable | None:
    """How principals are told apart: by equality, or by ``str()`` when unhashable.

    ``None`` (no authentication) is not limited per principal.
    """
    if principal is None:
        return None
    try:
        hash(principal)
    except TypeError:
        return ("unhashable", type(principal).__qualname__, str(principal))
    return principal


_slots_lock = threading.Lock()
#: Connection counts per server (keyed by ``id``; a server outlives its connections).
_slots: dict[int, ConnectionSlots] = {}


def connection_slots(engine: object) -> ConnectionSlots:
    """Return the connection counts of ``engine``, shared by every adapter in the process."""
    with _slots_lock:
        slots = _slots.get(id(engine))
        if slots is None:
            slots = _slots[id(engine)] = ConnectionSlots()
        return slots
