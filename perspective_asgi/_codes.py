"""Websocket close codes (RFC 6455 section 7.4.1) as the core uses them."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Close codes sent or understood by perspective-asgi."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    #: A text frame: Perspective speaks binary protobuf only.
    UNSUPPORTED_DATA = 1003
    #: Never sent on the wire; reported when the peer closed without a code.
    NO_STATUS_RECEIVED = 1005
    #: Never sent on the wire; reported when the TCP connection dropped without a close frame.
    ABNORMAL_CLOSURE = 1006
    #: A binary frame that is not a well-formed Perspective request.
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    #: A frame larger than ``Settings.max_message_size``.
    MESSAGE_TOO_BIG = 1009
    #: The session factory raised; the fault is logged with the connection's id.
    INTERNAL_ERROR = 1011
    #: Sent by servers that restart (uvicorn on shutdown).
    SERVICE_RESTART = 1012
    #: The client read too slowly and the outbound queue overflowed.
    TRY_AGAIN_LATER = 1013


#: Closes that are part of normal life and are logged at DEBUG only.
QUIET_CLOSE_CODES = frozenset(
    {
        CloseCode.NORMAL_CLOSURE,
        CloseCode.GOING_AWAY,
        CloseCode.NO_STATUS_RECEIVED,
        CloseCode.ABNORMAL_CLOSURE,
        CloseCode.SERVICE_RESTART,
    }
)
