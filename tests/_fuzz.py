"""Hostile request frames for fuzzing a server: random bytes and mutations of real requests.

Shared by ``tests/test_fuzz.py`` (a few thousand frames through an in-process server) and
``scripts/fuzz`` (millions, against a server in a subprocess that is allowed to crash).
The seed frames are what the stock ``perspective.AsyncClient`` sends for a broad scenario,
recorded with ``tests/_frames.capture``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import perspective

from perspective_asgi import ProtocolError
from perspective_asgi._core.wire import read_envelope, read_varint

from ._frames import capture, key, length_delimited, varint

#: The table the seed scenario reads; a fuzzed server should host one of this name and shape.
SEED_TABLE = "demo"
SEED_ROWS = {
    "id": [1, 2, 3, 4],
    "name": ["alpha", "beta", "gamma", "delta"],
    "group": ["x", "y", "x", "y"],
    "value": [1.5, 2.5, 3.5, 4.5],
}
#: msg_id of the probe request that ends each batch; no seed frame uses one this large.
PROBE_MSG_ID = 2**32 - 7

#: Request kinds whose hostile forms are known to crash perspective-python itself:
#: table_make_view (6) with a filter lacking its value (SIGSEGV), and view_delete (11) of
#: another session's view followed by closing that session (abort).
CRASHING_KINDS = frozenset({6, 11})


async def _seed_scenario(client: perspective.AsyncClient) -> None:
    async def attempt(call: Callable[[], Awaitable[object]]) -> None:
        # Client signatures differ between perspective-python 4 and 5; a call one version
        # refuses just contributes no frame.
        with contextlib.suppress(Exception):
            await call()

    await client.get_hosted_table_names()
    table = await client.open_table(SEED_TABLE)
    view = await table.view(
        group_by=["group"],
        split_by=["name"],
        columns=["value", "id"],
        aggregates={"value": "sum"},
        sort=[["value", "desc"]],
        filter=[["value", ">", 1.0]],
        expressions={"double": '"value" * 2'},
    )
    calls: list[Callable[[], Awaitable[object]]] = [
        table.schema, table.size, lambda: table.validate_expressions({"d": '"value" * 2'}),
        view.schema, view.dimensions, view.expression_schema, view.get_config,
        view.column_paths, lambda: view.column_paths({}), lambda: view.get_min_max("value"),
        view.to_arrow, view.to_columns, view.to_json, view.to_csv, view.to_ndjson,
        lambda: view.to_json({"start_row": 0, "end_row": 2}),
        lambda: view.expand(0), lambda: view.collapse(0), lambda: view.set_depth(1),
        lambda: view.on_update(lambda *_: None),
        lambda: table.update([{"id": 5, "name": "eps", "group": "x", "value": 9.0}]),
        view.delete,
    ]
    for call in calls:
        await attempt(call)
    flat = await table.view(columns=["id", "name"])
    await attempt(flat.to_columns)
    await attempt(flat.delete)
    other = await client.table({"a": [1, 2, 3]}, name="fuzz-scratch", index="a")
    await attempt(lambda: other.replace({"a": [4]}))
    await attempt(lambda: other.remove([4]))
    await attempt(other.delete)


def seed_frames() -> list[bytes]:
    """Request frames the stock client sends for a broad scenario, in order."""
    server = perspective.Server()
    server.new_local_client().table(SEED_ROWS, name=SEED_TABLE, index="id")
    return capture(server, _seed_scenario).requests


def probe_frame() -> bytes:
    """A cheap valid request (get_hosted_tables) whose reply marks the end of a batch."""
    return key(1, 0) + varint(PROBE_MSG_ID) + length_delimited(4, b"")


def kind_of(frame: bytes) -> int | None:
    """The request kind the server's envelope reader will see, or None if it refuses the frame."""
    try:
        return read_envelope(frame).kind
    except ProtocolError:
        return None


@dataclass
class Field:
    start: int
    end: int
    number: int
    wire_type: int
    #: Where a length-delimited field's payload starts (its length varint ends).
    payload: int


def fields_of(data: bytes, start: int = 0, end: int | None = None) -> list[Field] | None:
    """The fields of a protobuf message, or None if the bytes do not parse as one."""
    end = len(data) if end is None else end
    fields = []
    pos = start
    try:
        while pos < end:
            begin = pos
            tag, pos = read_varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            payload = pos
            if wire_type == 0:
                _, pos = read_varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, payload = read_varint(data, pos)
                pos = payload + length
            else:
                return None
            if pos > end or number == 0:
                return None
            fields.append(Field(begin, pos, number, wire_type, payload))
    except ProtocolError:
        return None
    return fields


def all_fields(data: bytes, depth: int = 3) -> list[Field]:
    """Every field of ``data``, descending into length-delimited payloads that parse."""
    found: list[Field] = []
    todo = [(0, len(data), 0)]
    while todo:
        start, end, level = todo.pop()
        fields = fields_of(data, start, end)
        if not fields:
            continue
        found += fields
        if level < depth:
            todo += [(f.payload, f.end, level + 1) for f in fields if f.wire_type == 2]
    return found


def _random_bytes(rng: random.Random, _: bytes) -> bytes:
    return rng.randbytes(rng.choice([1, 2, 3, 5, 8, 16, 64, 256]))


def _truncate(rng: random.Random, frame: bytes) -> bytes:
    return frame[: rng.randrange(len(frame))]


def _bit_flips(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _byte_edits(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.choice([1, 2, 3])):
        where = rng.randrange(len(data) + 1)
        action = rng.randrange(3)
        interesting = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        if action == 0 and where < len(data):
            data[where] = interesting
        elif action == 1:
            data.insert(where, interesting)
        elif where < len(data):
            del data[where]
    return bytes(data)


def _oversized_varint(rng: random.Random, frame: bytes) -> bytes:
    """Replace a varint (a key, a value or a length) with an overlong or out-of-range one."""
    fields = all_fields(frame)
    if not fields:
        return _byte_edits(rng, frame)
    field = rng.choice(fields)
    replacement = rng.choice(
        [
            b"\xff" * 9 + b"\x01",  # 2**64 - 1
            b"\xff" * 9 + b"\x02",  # 2**64
            b"\x80" * 10 + b"\x00",  # eleven bytes
            b"\xff" * 10,  # ten bytes, all continuing
            varint(2**32),
            varint(2**31),
            varint(rng.getrandbits(64)),
        ]
    )
    # Either the key or the first varint after it (a varint value or a length).
    if rng.random() < 0.5:
        _, after = read_varint(frame, field.start)
        return frame[: field.start] + replacement + frame[after:]
    _, value_start = read_varint(frame, field.start)
    if field.wire_type not in (0, 2):
        return frame[:value_start] + replacement + frame[value_start:]
    _, value_end = read_varint(frame, value_start)
    return frame[:value_start] + replacement + frame[value_end:]


def _huge_length(rng: random.Random, frame: bytes) -> bytes:
    """Give a length-delimited field, at any depth, a length far past the end of the frame."""
    fields = [f for f in all_fields(frame) if f.wire_type == 2]
    if not fields:
        return _byte_edits(rng, frame)
    field = rng.choice(fields)
    _, length_start = read_varint(frame, field.start)
    length = rng.choice([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
                         len(frame), field.end - field.payload + 1])
    return frame[:length_start] + varint(length) + frame[field.payload :]


def _wrong_wire_type(rng: random.Random, frame: bytes) -> bytes:
    fields = all_fields(frame)
    if not fields:
        return _byte_edits(rng, frame)
    field = rng.choice(fields)
    wire_type = rng.choice([t for t in range(8) if t != field.wire_type])
    _, after = read_varint(frame, field.start)
    return frame[: field.start] + key(field.number, wire_type) + frame[after:]


def _garbage_field(rng: random.Random) -> bytes:
    number = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 27, 33, 100, 2**29 - 1])
    wire_type = rng.choice([0, 1, 2, 5])
    if wire_type == 0:
        return key(number, 0) + varint(rng.getrandbits(rng.choice([7, 32, 64])))
    if wire_type == 1:
        return key(number, 1) + rng.randbytes(8)
    if wire_type == 5:
        return key(number, 5) + rng.randbytes(4)
    inner = rng.choice([b"", rng.randbytes(rng.randrange(16)), _garbage_field(rng)])
    return length_delimited(number, inner)


def _duplicate_or_insert_field(rng: random.Random, frame: bytes) -> bytes:
    """Duplicate a field at any depth, or insert a garbage one, fixing up enclosing lengths."""
    fields = all_fields(frame)
    if not fields:
        return frame + _garbage_field(rng)
    field = rng.choice(fields)
    extra = frame[field.start : field.end] if rng.random() < 0.5 else _garbage_field(rng)
    return _insert(frame, field.end, extra)


def _insert(frame: bytes, at: int, extra: bytes) -> bytes:
    """Insert ``extra`` at ``at`` and grow the lengths of the messages that enclose it."""
    data = frame[:at] + extra + frame[at:]
    # Enclosing fields are those whose payload spans ``at``; rewrite them outermost last.
    enclosing = [f for f in all_fields(frame, depth=8) if f.wire_type == 2
                 and f.payload < at <= f.end]
    for field in sorted(enclosing, key=lambda f: -f.start):
        _, length_start = read_varint(data, field.start)
        old_length, payload = read_varint(data, length_start)
        data = data[:length_start] + varint(old_length + len(extra)) + data[payload:]
    return data


def _splice(rng: random.Random, frame: bytes, others: list[bytes]) -> bytes:
    other = rng.choice(others)
    return frame[: rng.randrange(len(frame) + 1)] + other[rng.randrange(len(other) + 1) :]


Mutation = Callable[[random.Random, bytes], bytes]

MUTATIONS: dict[str, Mutation] = {
    "random-bytes": _random_bytes,
    "truncate": _truncate,
    "bit-flips": _bit_flips,
    "byte-edits": _byte_edits,
    "oversized-varint": _oversized_varint,
    "huge-length": _huge_length,
    "wrong-wire-type": _wrong_wire_type,
    "duplicate-or-insert-field": _duplicate_or_insert_field,
}


class FrameSource:
    """Hostile frames from a seeded RNG; ``allow_crashing=False`` never yields a kind 6 or 11."""

    def __init__(self, seed: int, seeds: list[bytes], *, allow_crashing: bool = True) -> None:
        self.rng = random.Random(seed)
        self.allow_crashing = allow_crashing
        self.seeds = [s for s in seeds if allow_crashing or kind_of(s) not in CRASHING_KINDS]
        self.names = list(MUTATIONS)

    def next(self) -> tuple[str, bytes]:
        """Return a mutation's name and the frame it made."""
        while True:
            name, frame = self._one()
            if frame and (self.allow_crashing or kind_of(frame) not in CRASHING_KINDS):
                return name, frame

    def _one(self) -> tuple[str, bytes]:
        rng = self.rng
        roll = rng.random()
        frame = rng.choice(self.seeds)
        if roll < 0.05:
            return "valid", frame
        if roll < 0.1:
            return "splice", _splice(rng, frame, self.seeds)
        name = rng.choice(self.names)
        frame = MUTATIONS[name](rng, frame)
        if rng.random() < 0.2:  # stack a second mutation now and then
            second = rng.choice(self.names)
            frame = MUTATIONS[second](rng, frame) if frame else frame
            name = f"{name}+{second}"
        return name, frame


# Driving a server ---------------------------------------------------------------------------


@dataclass
class FuzzStats:
    """What one fuzzing client saw."""

    frames: int = 0
    connections: int = 0
    #: Close codes the server sent (1006 when the TCP connection ended without a close frame).
    close_codes: dict[int, int] = dataclasses.field(default_factory=dict)
    mutations: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Batches after which the server did not answer the probe in time.
    hangs: list[list[bytes]] = dataclasses.field(default_factory=list)
    #: The most recent batches, oldest first: what was in flight if the server went away.
    recent: collections.deque[list[bytes]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=8)
    )

    def merge(self, other: FuzzStats) -> None:
        self.frames += other.frames
        self.connections += other.connections
        for code, count in other.close_codes.items():
            self.close_codes[code] = self.close_codes.get(code, 0) + count
        for name, count in other.mutations.items():
            self.mutations[name] = self.mutations.get(name, 0) + count
        self.hangs += other.hangs


async def fuzz(
    url: str,
    source: FrameSource,
    frames: int,
    *,
    batch: int = 4,
    batches_per_connection: int = 50,
    probe_timeout: float = 10.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> FuzzStats:
    """Send ``frames`` hostile frames to ``url`` in batches, each followed by a probe request.

    Reconnects whenever the server closes the connection, and closes it itself (1000) every
    ``batches_per_connection`` batches so that session teardown is fuzzed too.
    """
    import asyncio

    import websockets

    stats = FuzzStats()
    probe = probe_frame()
    while stats.frames < frames and not should_stop():
        stats.connections += 1
        try:
            ws = await websockets.connect(url, max_size=None, compression=None, open_timeout=10)
        except (OSError, websockets.InvalidHandshake, TimeoutError):
            stats.close_codes[-1] = stats.close_codes.get(-1, 0) + 1  # refused to connect
            if should_stop():
                break
            raise
        try:
            for _ in range(batches_per_connection):
                if stats.frames >= frames or should_stop():
                    break
                sent = []
                for _ in range(batch):
                    name, frame = source.next()
                    stats.mutations[name] = stats.mutations.get(name, 0) + 1
                    sent.append(frame)
                stats.recent.append(sent)
                stats.frames += len(sent)
                for frame in sent:
                    await ws.send(frame)
                await ws.send(probe)
                async with asyncio.timeout(probe_timeout):
                    async for reply in ws:
                        if isinstance(reply, bytes) and reply[:1] == b"\x08":
                            msg_id, _ = read_varint(reply, 1)
                            if msg_id == PROBE_MSG_ID:
                                break
            await ws.close()
        except websockets.ConnectionClosed:
            code = ws.close_code if ws.close_code is not None else 1006
            stats.close_codes[code] = stats.close_codes.get(code, 0) + 1
        except TimeoutError:
            stats.hangs.append(sent)
            await ws.close()
        finally:
            if ws.transport is not None:
                ws.transport.abort()
    return stats
