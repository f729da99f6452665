"""A reader of the top-level fields of Perspective's protobuf ``Request`` envelope.

The core reads just enough of each inbound frame to refuse garbage before it reaches the engine
(an empty frame aborts the whole process in perspective-python 5.x) and to learn the request
kind, without depending on generated protobuf code. Field numbers follow Perspective's public
``perspective.proto``: ``msg_id = 1``, ``entity_id = 2``, and the ``client_req`` oneof, whose
member's field number is the request kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .._codes import CloseCode
from .._exceptions import ProtocolError

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

#: Request kinds whose engine cost is a few microseconds: metadata reads and (un)subscriptions.
#: Creating views, serialising data and updating tables are absent: those can take seconds.
CHEAP_REQUEST_KINDS = frozenset(
    {
        3,  # get_features
        4,  # get_hosted_tables
        5,  # table_make_port
        7,  # table_schema
        8,  # table_size
        10,  # view_column_paths
        12,  # view_dimensions
        13,  # view_expression_schema
        14,  # view_get_config
        15,  # view_schema
        17,  # server_system_info
        21,  # view_on_update
        22,  # view_remove_on_update
        29,  # table_on_delete
        30,  # table_remove_delete
        34,  # view_on_delete
        35,  # view_remove_delete
        37,  # remove_hosted_tables_update
        39,  # view_on_remove
        40,  # view_remove_on_remove
    }
)


#: Request kinds whose ``entity_id`` names a view rather than a table.
VIEW_REQUEST_KINDS = frozenset({10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                                34, 35, 36, 39, 40})

#: Request kinds whose ``entity_id`` names an existing table (``make_table`` names a new one).
TABLE_REQUEST_KINDS = frozenset({5, 6, 7, 8, 9, 28, 29, 30, 31, 32, 33, 41})

#: ``table_validate_expr``: field 9 in perspective-python 4.x, 41 in 5.x.
TABLE_VALIDATE_EXPR_KINDS = frozenset({9, 41})

#: Request kinds whose body carries a ``MakeTableData`` (field 1), which may name a view.
TABLE_DATA_REQUEST_KINDS = frozenset({27, 31, 32, 33})

GET_HOSTED_TABLES = 4
TABLE_MAKE_VIEW = 6
TABLE_SIZE = 8
VIEW_COLUMN_PATHS = 10
VIEW_TO_ARROW = 16
VIEW_DELETE = 11
VIEW_ON_UPDATE = 21
VIEW_REMOVE_ON_UPDATE = 22
VIEW_ON_DELETE = 34
VIEW_REMOVE_DELETE = 35
VIEW_ON_REMOVE = 39
VIEW_REMOVE_ON_REMOVE = 40
MAKE_TABLE = 27
TABLE_DELETE = 28
TABLE_REMOVE = 31
TABLE_REPLACE = 32
TABLE_UPDATE = 33
REMOVE_HOSTED_TABLES_UPDATE = 37
MAKE_JOIN_TABLE = 38
#: ``Response.server_error``: the member of the ``client_resp`` oneof that reports a failure.
SERVER_ERROR = 50


#: Names of the request kinds, from ``perspective.proto``'s ``Request.client_req`` oneof.
REQUEST_KIND_NAMES = {
    3: "get_features", 4: "get_hosted_tables", 5: "table_make_port", 6: "table_make_view",
    7: "table_schema", 8: "table_size", 9: "table_validate_expr", 10: "view_column_paths",
    11: "view_delete", 12: "view_dimensions", 13: "view_expression_schema",
    14: "view_get_config", 15: "view_schema", 16: "view_to_arrow", 17: "server_system_info",
    18: "view_collapse", 19: "view_expand", 20: "view_get_min_max", 21: "view_on_update",
    22: "view_remove_on_update", 23: "view_set_depth", 24: "view_to_columns_string",
    25: "view_to_csv", 26: "view_to_rows_string", 27: "make_table", 28: "table_delete",
    29: "table_on_delete", 30: "table_remove_delete", 31: "table_remove", 32: "table_replace",
    33: "table_update", 34: "view_on_delete", 35: "view_remove_delete",
    36: "view_to_ndjson_string", 37: "remove_hosted_tables_update", 38: "make_join_table",
    39: "view_on_remove", 40: "view_remove_on_remove", 41: "table_validate_expr",
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """The routing fields of one request; ``kind`` is ``None`` if no request body is present."""

    msg_id: int
    entity_id: str
    kind: int | None
    #: The serialised request message of the ``client_req`` oneof, e.g. a ``TableMakeViewReq``.
    body: bytes | memoryview = field(default=b"", compare=False, repr=False)


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(CloseCode.INVALID_PAYLOAD, f"undecodable request: {reason}")


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode the base-128 varint at ``pos``; return its value and the position after it."""
    if pos < len(data) and data[pos] < 0x80:
        return data[pos], pos + 1  # one byte: every key and most lengths of a request
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise _invalid("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >> 64:
                raise _invalid("varint overflows 64 bits")
            return result, pos
    raise _invalid("varint longer than 10 bytes")


def _tokens(view: memoryview) -> Iterator[tuple[int, int, int | memoryview | None]]:
    """Yield ``(number, wire type, value)`` for each field of one message, checking its framing.

    A varint's value is an ``int``, a length-delimited field's a ``memoryview`` of its bytes, a
    fixed-width field's ``None`` (nothing here needs one).
    """
    end = len(view)
    pos = 0
    while pos < end:
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise _invalid(f"field number {number} out of range")
        value: int | memoryview | None = None
        if wire_type == _VARINT:
            value, pos = read_varint(view, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = read_varint(view, pos)
            start, pos = pos, pos + length
            value = view[start:pos]
        else:
            raise _invalid(f"unsupported wire type {wire_type}")
        if pos > end:
            raise _invalid("field runs past the end of its message")
        yield number, wire_type, value


def read_envelope(data: bytes | memoryview) -> Envelope:
    """Check that ``data`` is a well-formed protobuf message and return its routing fields.

    Nested messages are not descended into here: the view guard reads the few it needs, and
    the engine answers other bad ones with a ``ServerError``. Unknown top-level fields are
    skipped, as protobuf requires.
    """
    view = memoryview(data)
    if not len(view):
        raise _invalid("empty frame")
    msg_id, entity_id, kind = 0, "", None
    body: bytes | memoryview = b""
    for number, wire_type, value in _tokens(view):
        if number == 1:
            if not isinstance(value, int) or wire_type != _VARINT:
                raise _invalid("msg_id is not a varint")
            if value >> 32:
                raise _invalid("msg_id does not fit 32 bits")
            msg_id = value
        elif number == 2:
            if not isinstance(value, memoryview):
                raise _invalid("entity_id is not a string")
            try:
                entity_id = str(value, "utf-8")
            except UnicodeDecodeError:
                raise _invalid("entity_id is not UTF-8") from None
        elif isinstance(value, memoryview):
            kind, body = number, value
    return Envelope(msg_id, entity_id, kind, body)


def read_fields(data: bytes | memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """Yield ``(field number, value)`` for each field of a nested message but fixed-width ones.

    A varint's value is an ``int``; a length-delimited field's is a ``memoryview`` of its bytes.
    """
    for number, _, value in _tokens(memoryview(data)):
        if value is not None:
            yield number, value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def encode_field(number: int, value: int | bytes) -> bytes:
    """Encode one field: a varint for an ``int``, length-delimited for ``bytes``."""
    if isinstance(value, int):
        return _encode_varint(number << 3 | _VARINT) + _encode_varint(value)
    return _length_delimited(number, value)


def encode_server_error(msg_id: int, entity_id: str, message: str, status_code: int = 0) -> bytes:
    """Encode a ``Response`` carrying a ``ServerError``, which rejects the client's request.

    ``status_code`` is Perspective's ``StatusCode``: 0 ``SERVER_ERROR``, 1 ``VIEW_NOT_FOUND``.
    """
    error = _length_delimited(1, message.encode())
    if status_code:
        error += _encode_varint(2 << 3 | _VARINT) + _encode_varint(status_code)
    return encode_header(msg_id, entity_id) + _length_delimited(SERVER_ERROR, error)


def encode_string(number: int, value: str) -> bytes:
    """Encode a string field as proto3 does: left out when empty, as the engine writes it."""
    return _length_delimited(number, value.encode()) if value else b""


def encode_header(msg_id: int, entity_id: str) -> bytes:
    """Encode the ``msg_id`` and ``entity_id`` fields that open a ``Request`` or ``Response``."""
    head = _encode_varint(1 << 3 | _VARINT) + _encode_varint(msg_id) if msg_id else b""
    return head + encode_string(2, entity_id)


def encode_message(msg_id: int, entity_id: str, kind: int, body: bytes | memoryview = b"") -> bytes:
    """Encode a ``Request`` or ``Response`` whose oneof member ``kind`` holds ``body``."""
    return encode_header(msg_id, entity_id) + _length_delimited(kind, bytes(body))


def split_header(data: bytes) -> tuple[int, int]:
    """Return a message's ``msg_id`` and where its fields after ``entity_id`` start.

    The engine writes fields in number order, so a reply is its header (fields 1 and 2)
    followed by the oneof member: swapping the header re-addresses it without decoding it.
    """
    msg_id, pos = 0, 0
    if data[:1] == b"\x08":
        msg_id, pos = read_varint(data, 1)
    if data[pos:pos + 1] == b"\x12":
        length, pos = read_varint(data, pos + 1)
        pos += length
    return msg_id, pos


def _varint_field(body: bytes | memoryview, wanted: int) -> int:
    # Protobuf leaves a zero out, so an absent field reads as 0.
    for number, value in read_fields(body):
        if number == wanted and isinstance(value, int):
            return value
    return 0


def _bytes_field(body: bytes | memoryview, wanted: int) -> bytes:
    for number, value in read_fields(body):
        if number == wanted and isinstance(value, memoryview):
            return bytes(value)
    return b""


def read_id(body: bytes | memoryview) -> int:
    """The ``id`` (field 1) of a request that ends a subscription, e.g. ``ViewRemoveDeleteReq``."""
    return _varint_field(body, 1)


def read_error_message(body: bytes | memoryview) -> str:
    """The ``message`` (field 1) of a ``ServerError``."""
    return _bytes_field(body, 1).decode("utf-8", "replace")


def read_table_size(body: bytes | memoryview) -> int:
    """The ``size`` (field 2) of a ``TableSizeResp``."""
    return _varint_field(body, 2)


def read_arrow(body: bytes | memoryview) -> bytes:
    """The Arrow IPC bytes (field 1) of a ``ViewToArrowResp``."""
    return _bytes_field(body, 1)


def read_make_view(body: bytes | memoryview) -> tuple[str, bytes | None]:
    """A ``TableMakeViewReq``'s view id and ``ViewConfig`` bytes (``None`` if it has none).

    Repeated occurrences of the config are joined, which is how protobuf merges them.
    """
    view_id, configs = "", []
    for number, value in read_fields(body):
        if not isinstance(value, memoryview):
            continue
        if number == 1:
            try:
                view_id = str(value, "utf-8")
            except UnicodeDecodeError:
                raise _invalid("view id is not UTF-8") from None
        elif number == 2:
            configs.append(bytes(value))
    return view_id, b"".join(configs) if configs else None


def read_source_view(body: bytes | memoryview) -> str | None:
    """The view id a request's ``MakeTableData`` (field 1 of ``body``) copies, if it names one
    (``from_view``, field 6)."""
    for number, data in read_fields(body):
        if number == 1 and isinstance(data, memoryview):
            for data_number, value in read_fields(data):
                if data_number == 6 and isinstance(value, memoryview):
                    return str(value, "utf-8", "replace")
    return None
