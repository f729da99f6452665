"""Closes a connection that has gone silent with nothing to wait for (``Settings.idle_timeout``).

A forgotten script or tab holds a session and a file descriptor for ever. A connection that
holds views, a hosted-tables subscription or a queued request is waiting on the server, not
idle, however long the client has been silent.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio


class IdleWatch:
    """Notes when a connection last received a message, and ends it once idle too long."""

    __slots__ = ("_last", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._last = anyio.current_time()

    def touch(self) -> None:
        """A message arrived."""
        self._last = anyio.current_time()

    async def watch(self, busy: Callable[[], bool], on_idle: Callable[[], object]) -> None:
        """Call ``on_idle`` once the connection has been silent for ``timeout`` while not
        ``busy``; a busy connection is looked at again a full period later."""
        while True:
            silent_until = self._last + self.timeout
            now = anyio.current_time()
            if now < silent_until:
                await anyio.sleep(silent_until - now)
            elif busy():
                self._last = now
            else:
                on_idle()
                return
