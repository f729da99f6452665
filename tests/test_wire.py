"""The protobuf envelope reader, on frames from the real client and on malformed ones."""

from __future__ import annotations

import perspective
import pytest

from perspective_asgi import CloseCode, ProtocolError
from perspective_asgi._core.wire import CHEAP_REQUEST_KINDS, Envelope, read_envelope, read_varint

from ._frames import Exchange, capture, key, length_delimited, varint

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

#: What the scenario below makes the client send: (request, client_req field number).
EXPECTED_REQUESTS = [
    ("make_table", 27),
    ("get_hosted_tables", 4),
    ("table_size", 8),
    ("table_make_view", 6),
    ("view_to_arrow", 16),
    ("view_on_update", 21),
    ("table_update", 33),
]


async def _scenario(client: perspective.AsyncClient) -> None:
    table = await client.table({"a": [1, 2, 3]}, name="t")
    assert await client.get_hosted_table_names() == ["t"]
    assert await table.size() == 3
    view = await table.view()
    await view.to_arrow()
    await view.on_update(lambda *_: None)
    await table.update({"a": [4]})


@pytest.fixture(scope="module")
def exchange() -> Exchange:
    recorded = capture(perspective.Server(), _scenario)
    assert len(recorded.requests) == len(EXPECTED_REQUESTS)
    return recorded


@pytest.fixture(scope="module")
def frames(exchange: Exchange) -> dict[str, bytes]:
    names = [name for name, _ in EXPECTED_REQUESTS]
    return dict(zip(names, exchange.requests, strict=True))


def _refused(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        read_envelope(data)
    assert refused.value.code is CloseCode.INVALID_PAYLOAD
    assert refused.value.reason.startswith("undecodable request: ")
    return refused.value


# Frames from the real client ----------------------------------------------------------------


def test_request_kinds_of_captured_frames(exchange: Exchange) -> None:
    kinds = [read_envelope(frame).kind for frame in exchange.requests]
    assert kinds == [kind for _, kind in EXPECTED_REQUESTS]


def test_entity_ids_of_captured_frames(frames: dict[str, bytes]) -> None:
    for name in ("make_table", "table_size", "table_make_view", "table_update"):
        assert read_envelope(frames[name]).entity_id == "t", name
    assert read_envelope(frames["get_hosted_tables"]).entity_id == ""
    # A view's requests are addressed to the id the client chose when it made the view.
    view_id = read_envelope(frames["view_to_arrow"]).entity_id
    assert view_id
    assert view_id.encode() in frames["table_make_view"]
    assert read_envelope(frames["view_on_update"]).entity_id == view_id


def test_msg_ids_of_captured_frames_match_the_engines_replies(exchange: Exchange) -> None:
    sent = [read_envelope(frame).msg_id for frame in exchange.requests]
    assert len(set(sent)) == len(sent)
    assert all(0 < msg_id < 2**32 for msg_id in sent)
    # Every request was answered (the on_update one by the update), under the same msg_id.
    answered = [read_envelope(frame).msg_id for frame in exchange.replies]
    assert sorted(answered) == sorted(sent)


def test_cheap_kinds_are_all_known_request_kinds() -> None:
    assert all(3 <= kind <= 40 for kind in CHEAP_REQUEST_KINDS)
    for heavy in (6, 16, 27, 33):  # make_view, to_arrow, make_table, update
        assert heavy not in CHEAP_REQUEST_KINDS


@pytest.mark.parametrize("frame_type", [bytes, bytearray, memoryview])
def test_any_bytes_like_frame_is_read(frames: dict[str, bytes], frame_type: type) -> None:
    frame = frames["table_size"]
    assert read_envelope(frame_type(frame)) == read_envelope(frame)


# Hand-built frames --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x08\x96\x01", Envelope(150, "", None)),
        (b"\x08\x00", Envelope(0, "", None)),
        (b"\x12\x00", Envelope(0, "", None)),
        (b"\x08" + varint(2**32 - 1), Envelope(2**32 - 1, "", None)),
        (b"\x08\x07" + length_delimited(2, "tablé".encode()) + b"B\x00", Envelope(7, "tablé", 8)),
        # Fields may come in any order, and a repeated scalar keeps its last value.
        (b"B\x00" + length_delimited(2, b"x") + b"\x08\x03", Envelope(3, "x", 8)),
        (b"\x08\x01\x08\x02" + length_delimited(2, b"a") + length_delimited(2, b"b"),
         Envelope(2, "b", None)),
        (b"\x08\x09" + length_delimited(29, b""), Envelope(9, "", 29)),
    ],
    ids=["msg_id-150", "msg_id-0", "empty-entity", "msg_id-max", "utf8-entity", "any-order",
         "last-wins", "kind-only"],
)
def test_hand_built_frames(data: bytes, expected: Envelope) -> None:
    assert read_envelope(data) == expected


def test_unknown_fields_of_every_wire_type_are_skipped(frames: dict[str, bytes]) -> None:
    original = read_envelope(frames["table_size"])
    unknown = (
        key(1000, VARINT) + varint(2**64 - 1)
        + key(1001, FIXED64) + b"\xff" * 8
        + key(1002, FIXED32) + b"\xff" * 4
        + length_delimited(2**29 - 1, b"\xff\xfe not utf-8")  # the largest field number
    )
    assert read_envelope(unknown + frames["table_size"]) == original
    # After the request body too; what the kind then says is not asserted here: it only
    # decides whether the request runs inline or in a worker thread.
    after = read_envelope(frames["table_size"] + unknown)
    assert (after.msg_id, after.entity_id) == (original.msg_id, original.entity_id)


# read_varint --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"\x00", 0),
        (b"\x01", 1),
        (b"\x7f", 127),
        (b"\x80\x01", 128),
        (b"\x96\x01", 150),
        (b"\xff\xff\x03", 65535),
        (b"\xff" * 9 + b"\x01", 2**64 - 1),
        # A non-minimal encoding is still valid protobuf.
        (b"\x81\x80\x80\x00", 1),
    ],
)
def test_read_varint(data: bytes, value: int) -> None:
    assert read_varint(data, 0) == (value, len(data))
    assert read_varint(b"\xaa" + data + b"\xbb", 1) == (value, len(data) + 1)
    assert read_varint(memoryview(data), 0) == (value, len(data))


@pytest.mark.parametrize("value", [0, 1, 300, 2**31, 2**32 - 1, 2**63, 2**64 - 1])
def test_read_varint_round_trips(value: int) -> None:
    encoded = varint(value)
    assert read_varint(encoded, 0) == (value, len(encoded))


@pytest.mark.parametrize(
    ("data", "pos"),
    [
        (b"", 0),
        (b"\x01", 1),
        (b"\x80", 0),
        (b"\xff\xff", 0),
        (b"\xff" * 9 + b"\x02", 0),  # 2**64
        (b"\xff" * 10 + b"\x01", 0),  # eleven bytes
        (b"\x80" * 10 + b"\x00", 0),  # eleven bytes, even though the value is zero
        (b"\xff" * 10, 0),  # ten bytes, all continuing
    ],
    ids=["empty", "at-end", "truncated", "truncated-2", "overflow", "eleven", "eleven-zero",
         "ten-continuing"],
)
def test_read_varint_refuses(data: bytes, pos: int) -> None:
    with pytest.raises(ProtocolError) as refused:
        read_varint(data, pos)
    assert refused.value.code is CloseCode.INVALID_PAYLOAD


# Malformed frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",  # field 0, varint
        b"\x02\x00",  # field 0, length-delimited
        key(2**29, VARINT) + b"\x00",  # one past the largest field number
        b"\x08" + b"\xff" * 10 + b"\x01",  # varint longer than ten bytes
        b"\x08" + b"\x80" * 10 + b"\x00",
        b"\x28" + b"\xff" * 9 + b"\x02",  # a varint of 2**64 in an unknown field
        b"\xff" * 9 + b"\x02",  # a key of 2**64
        b"\x80",  # truncated key
        b"\x08",  # key without its value
        b"\x08\x80",  # truncated msg_id
        b"\x12\x10short",  # entity_id longer than the frame
        b"\x22\x05abc",  # request body longer than the frame
        b"\x22" + varint(2**40),  # a length far past the end
        b"\x22" + varint(2**64 - 1),
        key(5, FIXED64) + b"\x00" * 7,  # fixed64 past the end
        key(5, FIXED32) + b"\x00" * 3,  # fixed32 past the end
        key(5, 3),  # start group
        key(5, 4),  # end group
        key(5, 6),
        key(5, 7),
        b"\x0b\x01",  # wire type 3 on msg_id
        b"\x08\x01" + key(40, 3) + b"\x00",  # wire type 3 after a valid field
        b"\x12\x02\xff\xfe",  # entity_id not UTF-8
        b"\x12\x02\xc3\x28",  # invalid continuation byte
        b"\x12\x01\xc3",  # truncated multi-byte character
        b"\x0a\x01x",  # msg_id as a string
        key(1, FIXED64) + b"\x00" * 8,  # msg_id as fixed64
        key(1, FIXED32) + b"\x00" * 4,  # msg_id as fixed32
        b"\x08" + varint(2**32),  # msg_id past 32 bits
        b"\x10\x01",  # entity_id as a varint
        key(2, FIXED32) + b"\x00" * 4,  # entity_id as fixed32
        bytes(range(256)),
    ],
    ids=[
        "empty", "field0-varint", "field0-string", "field-number-too-big", "varint-11-bytes",
        "varint-11-zero-bytes", "varint-overflow", "key-overflow", "truncated-key",
        "missing-value", "truncated-msg-id", "entity-past-end", "body-past-end", "length-2^40",
        "length-2^64", "fixed64-past-end", "fixed32-past-end", "wire-type-3", "wire-type-4",
        "wire-type-6", "wire-type-7", "msg-id-wire-type-3", "wire-type-3-later",
        "entity-not-utf8", "entity-bad-continuation", "entity-truncated-char",
        "msg-id-string", "msg-id-fixed64", "msg-id-fixed32", "msg-id-33-bits", "entity-varint",
        "entity-fixed32", "bytes-0-255",
    ],
)
def test_malformed_frames_are_refused(data: bytes) -> None:
    _refused(data)


@pytest.mark.parametrize("name", [name for name, _ in EXPECTED_REQUESTS])
def test_truncated_captured_frames_are_refused(frames: dict[str, bytes], name: str) -> None:
    # The last field of each frame runs to its end, so dropping a byte always cuts a field.
    _refused(frames[name][:-1])


@pytest.mark.parametrize("name", [name for name, _ in EXPECTED_REQUESTS])
def test_trailing_garbage_is_refused(frames: dict[str, bytes], name: str) -> None:
    _refused(frames[name] + b"\x00")
