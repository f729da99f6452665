"""Websocket close codes (RFC 6455 section 7.4.1) as the core uses them."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Close codes sent or understood by perspective-asgi."""

    #: ``Settings.idle_timeout`` elapsed while the connection held no views or subscriptions.
    NORMAL_CLOSURE = 1000
    #: The server is shutting down (``close_all_connections()``, or the web server cancelled
    #: the connection).
    GOING_AWAY = 1001
    #: A text frame: Perspective speaks binary protobuf only.
    UNSUPPORTED_DATA = 1003
    #: Never sent on the wire; reported when the peer closed without a code.
    NO_STATUS_RECEIVED = 1005
    #: Never sent on the wire; reported when the TCP connection dropped without a close frame.
    ABNORMAL_CLOSURE = 1006
    #: A binary frame that is not a well-formed Perspective request, including an empty frame
    #: (which aborts the whole process in perspective-python 5.x if passed on).
    INVALID_PAYLOAD = 1007
    #: More than ``Settings.max_violations`` requests refused by the policy or the view guard.
    POLICY_VIOLATION = 1008
    #: A frame larger than ``Settings.max_message_size``.
    MESSAGE_TOO_BIG = 1009
    #: The session factory or ``Settings.policy`` raised; the fault is logged once with the
    #: connection's id.
    INTERNAL_ERROR = 1011
    #: Sent by web servers that restart (uvicorn on shutdown), never by the core.
    SERVICE_RESTART = 1012
    #: The client read too slowly and the outbound queue overflowed, or ``max_connections`` or
    #: ``max_connections_per_principal`` was reached.
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
