"""Lists a server's hosted tables through a private session of its own.

With a table allow-list, a connection must not learn that a hidden table was created or
deleted. The engine tells every subscriber of the hosted-tables list that the list changed,
without saying how; so before passing such a notification on, the core lists the tables
itself and compares the part the connection may see with what it saw last.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from .._types import SessionFactory
from .policy import hosted_table_names
from .wire import GET_HOSTED_TABLES, encode_field

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
