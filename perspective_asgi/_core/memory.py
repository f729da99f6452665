"""Gives the C allocator's free memory back to the system after a large message is sent.

glibc's malloc keeps a heap (an "arena") per thread that allocates. A large reply computed in
a worker thread is allocated in that thread's arena, and once it is sent and freed the arena
keeps the pages for its next allocation: every worker thread that once serialised a large view
goes on holding tens of megabytes. Measured in-process with six 28 MB ``to_arrow`` replies of
a 1M-row view: RSS rose 137-169 MB through worker threads (61-69 MB on the loop thread), and
fell by 59 MB with a trim after each reply. A trim costs well under a millisecond per 100 MB
of heap, nothing next to sending 8 MiB.

Other C libraries (musl, macOS) have no ``malloc_trim``; there this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

#: Bytes of a sent message from which the allocator is trimmed afterwards.
TRIM_AFTER = 8 * 1024 * 1024


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_trim = _find_trim()


def release_after_send(size: int) -> bool:
    """After a message of ``size`` bytes is sent and dropped, give free memory back to the
    system if it was large; return whether a trim ran."""
    if size < TRIM_AFTER or _trim is None:
        return False
    _trim(0)
    return True
