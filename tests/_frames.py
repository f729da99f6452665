"""Request frames as the stock ``perspective.AsyncClient`` puts them on the wire.

The client serialises its own requests, so recording what it sends to a local session gives
real frames for tests that speak bytes to the core, with no generated protobuf code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import perspective

Scenario = Callable[[perspective.AsyncClient], Awaitable[object]]


@dataclass
class Exchange:
    """What a client sent to a session, and what the session sent back, each in order."""

    requests: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)


def capture(server: Any, scenario: Scenario) -> Exchange:
    """Run ``scenario`` with an ``AsyncClient`` on a new session of ``server``; record the traffic.

    Runs on a fresh event loop in a thread of its own, so it may be called from anywhere,
    including from inside a test's event loop (asyncio or trio).
    """
    exchange = Exchange()

    async def main() -> None:
        undelivered: list[bytes] = []

        def on_reply(data: bytes) -> None:
            exchange.replies.append(bytes(data))
            undelivered.append(bytes(data))

        session = server.new_session(on_reply)

        async def send(data: bytes) -> None:
            exchange.requests.append(bytes(data))
            session.handle_request(data)
            while undelivered:
                await client.handle_response(undelivered.pop(0))

        client = perspective.AsyncClient(send)
        try:
            await scenario(client)
        finally:
            session.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result(timeout=60)
    return exchange


def varint(value: int) -> bytes:
    """Encode ``value`` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    """Encode a protobuf field key."""
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Encode a length-delimited protobuf field."""
    return key(number, 2) + varint(len(payload)) + payload
