"""What requests cost the engine, learnt as they run: which may run on the event loop.

A thread hop costs tens of microseconds and two loop wake-ups; on a busy or single-core server
that is more than most requests cost the engine. But a request that computes for milliseconds
must not run on the loop, where it would stall every other connection. The request kind alone
does not tell (a view of a 100-row table is cheap, a group-by of 10 million rows is not), so the
cost of recent requests of the same kind on the same table decides:

* a kind runs on the loop once ``PROOF`` requests of it in a row, on that table, took the
  engine less than ``BUDGET`` each;
* one that takes longer anywhere (in a thread or on the loop) sends that kind on that table
  back to threads for ``COOLDOWN`` seconds, and it must prove itself again.

What a request run in a thread would cost the loop is its thread's CPU time, not its wall
time: in a thread it may wait for the engine's lock, or for a core while other connections'
requests run, and on the loop it would not. But the engine may also compute on threads of its
own, which that thread's CPU time does not see; so a run in a thread that took longer than
``THREAD_WALL_LIMIT`` counts at its wall time. On the loop, wall time is the cost.

Frames larger than ``MAX_FRAME`` never run on the loop: what they carry (an update's rows)
decides their cost, not the table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Engine seconds under which a request counts as cheap. The loop can afford a stall of this
#: much now and then: it is below a client's ping jitter.
BUDGET = 0.001
#: Wall seconds past which a run in a thread counts at its wall time, not its CPU time.
THREAD_WALL_LIMIT = 0.01
#: Cheap runs in a row before a kind runs on the loop.
PROOF = 3
#: Seconds a kind stays in threads after one run over budget.
COOLDOWN = 30.0
#: Largest request frame that may run on the loop.
MAX_FRAME = 16 * 1024
#: Keys remembered per engine; past it the book starts over (clients name tables freely).
MAX_KEYS = 4096

Key = tuple[int, str]


def loop_cost(wall: float, cpu: float) -> float:
    """What a request that ran in a thread for ``wall`` seconds, ``cpu`` of them on that
    thread, would have cost the event loop."""
    return cpu if wall <= THREAD_WALL_LIMIT else wall


class CostBook:
    """Recent engine cost of requests on one engine, by request kind and table."""

    __slots__ = ("_clock", "_lock", "_proven", "_slow_until")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        #: Cheap runs in a row, up to PROOF.
        self._proven: dict[Key, int] = {}
        #: When each kind that ran over budget may be tried on the loop again.
        self._slow_until: dict[Key, float] = {}

    def cheap(self, key: Key) -> bool:
        """Whether requests of ``key`` have proven cheap enough to run on the loop."""
        if self._proven.get(key, 0) < PROOF:
            return False
        until = self._slow_until.get(key)
        return until is None or self._clock() >= until

    def record(self, key: Key, seconds: float) -> None:
        """Note what one request of ``key`` cost the engine; any thread may call it."""
        with self._lock:
            if len(self._proven) >= MAX_KEYS or len(self._slow_until) >= MAX_KEYS:
                self._proven.clear()
                self._slow_until.clear()
            if seconds > BUDGET:
                self._proven.pop(key, None)
                self._slow_until[key] = self._clock() + COOLDOWN
            else:
                runs = self._proven.get(key, 0)
                if runs < PROOF:
                    self._proven[key] = runs + 1


_books_lock = threading.Lock()
#: One book per engine, with the number of sessions using it. Engines are keyed by ``id``
#: (they take no weak references): a book is dropped with its engine's last session, so an
#: engine that reuses a collected one's id starts with a clean book.
_books: dict[int, tuple[CostBook, int]] = {}


def open_book(engine_key: int) -> CostBook:
    """Return the cost book of the engine ``engine_key`` for one more session."""
    with _books_lock:
        book, sessions = _books.get(engine_key) or (CostBook(), 0)
        _books[engine_key] = (book, sessions + 1)
        return book


def close_book(engine_key: int) -> None:
    """One session of the engine ``engine_key`` has ended."""
    with _books_lock:
        entry = _books.get(engine_key)
        if entry is None:
            return
        book, sessions = entry
        if sessions > 1:
            _books[engine_key] = (book, sessions - 1)
        else:
            del _books[engine_key]
