"""Dropping a TCP connection at once, for the adapters whose frameworks expose the socket.

An ordinary close sends the FIN only after every byte the kernel already holds for the peer.
A peer that stopped reading never takes those bytes, so its end of the connection stays
ESTABLISHED for as long as the kernel keeps retrying (minutes), whatever the application did.
Closing with ``SO_LINGER`` set to zero seconds resets the connection instead: the kernel
discards the queued bytes and sends an RST, which reaches the peer even when it reads nothing.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Protocol

#: ``struct linger``: on, zero seconds.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class _Socket(Protocol):
    def setsockopt(self, level: int, option: int, value: bytes, /) -> None: ...


def reset_on_close(sock: _Socket | None) -> None:
    """Make the next close of ``sock`` reset the connection; quiet if it is gone already."""
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
