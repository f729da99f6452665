"""Properties of the envelope reader, against a small protobuf encoder written here.

The encoder is independent of ``tests/_frames.py`` on purpose: it writes non-minimal varints
and interleaves unknown fields, which the client never does, and it keeps a model of what
``read_envelope`` must return (the last ``msg_id``, the last ``entity_id``, and the number of
the last length-delimited field from 3 up) so every example checks the exact answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import hypothesis
import hypothesis.strategies as st
from hypothesis import given

from perspective_asgi import CloseCode, ProtocolError
from perspective_asgi._core.wire import Envelope, read_envelope, read_varint

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
MAX_FIELD_NUMBER = 2**29 - 1
UINT64 = st.integers(0, 2**64 - 1)
UINT32 = st.integers(0, 2**32 - 1)

#: Quick enough for every run of the suite; the database is off so runs leave no files behind.
FAST = hypothesis.settings(max_examples=200, deadline=None, database=None)


def encode_varint(value: int, padding: int = 0) -> bytes:
    """Encode ``value`` in base 128, with ``padding`` redundant zero groups (still valid)."""
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    groups += [0] * min(padding, 10 - len(groups))
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


@dataclass(frozen=True)
class Field:
    """One encoded top-level field: its number, wire type, and the bytes after its key."""

    number: int
    wire_type: int
    body: bytes
    key_padding: int = 0

    def encode(self) -> bytes:
        return encode_varint(self.number << 3 | self.wire_type, self.key_padding) + self.body


def varint_field(number: int, value: int, padding: int = 0) -> Field:
    return Field(number, VARINT, encode_varint(value, padding))


def bytes_field(number: int, payload: bytes, padding: int = 0) -> Field:
    return Field(number, LENGTH_DELIMITED, encode_varint(len(payload), padding) + payload)


def expected_envelope(fields: list[Field]) -> Envelope:
    """What ``read_envelope`` must return for ``fields``: the model the tests check against."""
    msg_id, entity_id, kind = 0, "", None
    for field in fields:
        if field.number == 1:
            msg_id, _ = read_varint(field.body, 0)
        elif field.number == 2:
            length, start = read_varint(field.body, 0)
            entity_id = field.body[start : start + length].decode()
        elif field.wire_type == LENGTH_DELIMITED:
            kind = field.number
    return Envelope(msg_id, entity_id, kind)


paddings = st.integers(0, 3)
unknown_numbers = st.integers(3, MAX_FIELD_NUMBER)

msg_id_fields = st.builds(varint_field, st.just(1), UINT32, paddings)
entity_id_fields = st.builds(
    lambda text, padding: bytes_field(2, text.encode(), padding), st.text(), paddings
)
kind_fields = st.builds(bytes_field, unknown_numbers, st.binary(max_size=64), paddings)
unknown_fields = st.one_of(
    st.builds(varint_field, unknown_numbers, UINT64, paddings),
    st.builds(Field, unknown_numbers, st.just(FIXED64), st.binary(min_size=8, max_size=8)),
    st.builds(Field, unknown_numbers, st.just(FIXED32), st.binary(min_size=4, max_size=4)),
    # Length-delimited fields from 3 up are what the reader takes for the request body.
    kind_fields,
)


@st.composite
def requests(draw: st.DrawFn) -> list[Field]:
    """A request like the client's (msg_id, entity_id, body), in any order, among unknowns."""
    fields = [draw(msg_id_fields), draw(entity_id_fields), draw(kind_fields)]
    fields += draw(st.lists(st.one_of(unknown_fields, msg_id_fields, entity_id_fields),
                            max_size=6))
    # Keys may be non-minimal varints too.
    fields = [replace(field, key_padding=draw(paddings)) for field in fields]
    return draw(st.permutations(fields))


def assert_refused(data: bytes) -> None:
    try:
        read_envelope(data)
    except ProtocolError as refused:
        assert refused.code is CloseCode.INVALID_PAYLOAD
    else:
        raise AssertionError(f"{data!r} was accepted")


# read_varint --------------------------------------------------------------------------------


@FAST
@given(UINT64, paddings, st.binary(max_size=4), st.binary(max_size=4))
def test_varint_round_trips_anywhere(value: int, padding: int, before: bytes, after: bytes) -> None:
    encoded = encode_varint(value, padding)
    data = before + encoded + after
    assert read_varint(data, len(before)) == (value, len(before) + len(encoded))
    assert read_varint(memoryview(data), len(before)) == (value, len(before) + len(encoded))


@FAST
@given(UINT64, paddings, st.data())
def test_truncated_varint_is_refused(value: int, padding: int, data: st.DataObject) -> None:
    encoded = encode_varint(value, padding)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    try:
        read_varint(encoded[:cut], 0)
    except ProtocolError as refused:
        assert refused.code is CloseCode.INVALID_PAYLOAD
    else:
        raise AssertionError("a truncated varint was accepted")


@FAST
@given(st.integers(2**64, 2**70 - 1))
def test_varint_past_64_bits_is_refused(value: int) -> None:
    try:
        read_varint(encode_varint(value), 0)
    except ProtocolError as refused:
        assert refused.code is CloseCode.INVALID_PAYLOAD
    else:
        raise AssertionError("a varint of more than 64 bits was accepted")


@FAST
@given(st.binary(max_size=16), st.integers(0, 16))
def test_read_varint_of_any_bytes_returns_or_refuses(data: bytes, pos: int) -> None:
    try:
        value, end = read_varint(data, pos)
    except ProtocolError as refused:
        assert refused.code is CloseCode.INVALID_PAYLOAD
    else:
        assert 0 <= value < 2**64
        assert pos < end <= min(len(data), pos + 10)


# read_envelope ------------------------------------------------------------------------------


@FAST
@given(requests())
def test_envelope_round_trips(fields: list[Field]) -> None:
    frame = b"".join(field.encode() for field in fields)
    assert read_envelope(frame) == expected_envelope(fields)
    assert read_envelope(memoryview(frame)) == expected_envelope(fields)


@FAST
@given(requests())
def test_truncation_is_refused_unless_on_a_field_boundary(fields: list[Field]) -> None:
    frame = b"".join(field.encode() for field in fields)
    boundaries = {}
    offset = 0
    for count, field in enumerate(fields, 1):
        offset += len(field.encode())
        boundaries[offset] = count
    for cut in range(len(frame)):
        if cut in boundaries:
            assert read_envelope(frame[:cut]) == expected_envelope(fields[: boundaries[cut]])
        else:
            assert_refused(frame[:cut])


@FAST
@given(requests(), st.sampled_from([START_GROUP, END_GROUP, 6, 7]), unknown_numbers, st.data())
def test_group_and_reserved_wire_types_are_refused(
    fields: list[Field], wire_type: int, number: int, data: st.DataObject
) -> None:
    # Groups (3, 4) are valid but deprecated protobuf, unused by perspective.proto; the reader
    # refuses them rather than track nesting. 6 and 7 are not wire types at all.
    at = data.draw(st.integers(0, len(fields)))
    fields = [*fields[:at], Field(number, wire_type, b""), *fields[at:]]
    assert_refused(b"".join(field.encode() for field in fields))


@FAST
@given(st.binary(max_size=256))
def test_any_bytes_parse_or_are_refused_with_1007(data: bytes) -> None:
    try:
        envelope = read_envelope(data)
    except ProtocolError as refused:
        assert refused.code is CloseCode.INVALID_PAYLOAD
    else:
        assert 0 <= envelope.msg_id < 2**32
        assert envelope.kind is None or 3 <= envelope.kind <= MAX_FIELD_NUMBER


@FAST
@given(requests(), st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4))
def test_mutated_requests_parse_or_are_refused_with_1007(
    fields: list[Field], edits: list[tuple[int, int]]
) -> None:
    # Random bytes rarely get past the first key; edits of valid frames reach deeper states.
    frame = bytearray(b"".join(field.encode() for field in fields))
    for position, byte in edits:
        frame[position % len(frame)] = byte
    try:
        read_envelope(bytes(frame))
    except ProtocolError as refused:
        assert refused.code is CloseCode.INVALID_PAYLOAD
