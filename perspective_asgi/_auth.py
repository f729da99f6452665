"""Authentication of websocket handshakes, run once per connection before it is accepted.

``Settings.authenticate`` is an async hook that sees a ``HandshakeRequest`` (the upgrade request,
whichever framework received it) and returns a principal to accept the connection, ``None`` to
refuse it with 401, or raises ``AuthenticationFailed`` to refuse it with a status of its choice.
The principal is kept on the connection's ``SessionBridge`` for later policy decisions.

Browsers cannot set headers on a websocket handshake, so a browser client passes its token in
the query string or a cookie; scripts may also use the ``Authorization`` header.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import parse_qsl


class _Headers(Mapping[str, str]):
    """Request headers looked up case-insensitively; repeated headers are joined with ", "."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            # Repeated cookie headers (HTTP/2) join with "; ", every other header with ", ".
            joiner = "; " if key == "cookie" else ", "
            self._items[key] = f"{self._items[key]}{joiner}{value}" if key in self._items else value

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True)
class HandshakeRequest:
    """The websocket upgrade request as every adapter presents it to ``Settings.authenticate``."""

    #: The request path, e.g. ``"/websocket"``.
    path: str
    #: Request headers; lookup is case-insensitive and keys are lowercase.
    headers: Mapping[str, str]
    #: Cookies from the ``Cookie`` header; the first wins when a name repeats.
    cookies: Mapping[str, str]
    #: Query string parameters, the first value of each.
    query: Mapping[str, str]
    #: The client's address, when the server knows it.
    client: tuple[str, int] | None

    @classmethod
    def build(
        cls,
        path: str,
        headers: Iterable[tuple[str, str]],
        query_string: str,
        client: tuple[str, int] | None,
    ) -> HandshakeRequest:
        """Parse the cookies and the query string of a request given as its raw parts."""
        parsed = _Headers(headers)
        query: dict[str, str] = {}
        for key, value in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(key, value)
        return cls(
            path=path,
            headers=parsed,
            cookies=MappingProxyType(_parse_cookies(parsed.get("cookie", ""))),
            query=MappingProxyType(query),
            client=client,
        )


#: The hook of ``Settings.authenticate``: a principal accepts the handshake, ``None`` refuses it.
Authenticate = Callable[[HandshakeRequest], Awaitable[object | None]]


def _parse_cookies(header: str) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


def parse_header(text: str) -> tuple[str, str]:
    """A ``NAME:VALUE`` command-line argument as a header's name and value.

    Raises ``argparse.ArgumentTypeError``, which argparse reports as a usage error.
    """
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()
