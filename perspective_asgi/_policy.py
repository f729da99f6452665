"""Policies applied to requests on the wire, before the engine sees them.

Perspective's own handlers let every client create, update and delete tables. ``read_only``
refuses those requests with a ``ServerError`` reply: the client's promise rejects with the
reason and the connection stays usable for everything that only reads, which is all a
``<perspective-viewer>`` needs.
"""

from __future__ import annotations

from ._wire import Envelope, encode_server_error

#: Request kinds that create, change or delete tables (``perspective.proto`` field numbers).
MUTATING_REQUEST_KINDS = frozenset(
    {
        27,  # make_table
        28,  # table_delete
        31,  # table_remove
        32,  # table_replace
        33,  # table_update
        38,  # make_join_table
    }
)


def refuse_read_only(envelope: Envelope) -> bytes | None:
    """Return a ``ServerError`` reply if ``envelope`` would change a table, else ``None``."""
    if envelope.kind not in MUTATING_REQUEST_KINDS:
        return None
    return encode_server_error(
        envelope.msg_id, envelope.entity_id, "read-only: this server refuses changes to tables"
    )
