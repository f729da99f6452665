"""Access policies applied to requests on the wire, before the engine sees them.

Perspective's own handlers let every client list, read, create, change and delete every table,
and author expressions. A ``Policy`` narrows that for one connection, usually chosen per
principal by ``Settings.policy``:

* ``read_only`` refuses every request that creates, changes or deletes a table;
* ``tables`` is an allow-list of table names: requests on other tables are refused, and the
  hosted-tables list (and its change notifications) is filtered so hidden tables are never
  revealed;
* ``allow_expressions=False`` refuses views with expression columns and expression validation.

A refused request is answered with Perspective's own ``ServerError`` reply, so the client's
promise rejects with the reason and the connection stays usable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

from .._codes import CloseCode
from .._exceptions import ProtocolError
from .wire import (
    GET_HOSTED_TABLES,
    MAKE_JOIN_TABLE,
    REMOVE_HOSTED_TABLES_UPDATE,
    REQUEST_KIND_NAMES,
    TABLE_MAKE_VIEW,
    TABLE_REQUEST_KINDS,
    TABLE_VALIDATE_EXPR_KINDS,
    VIEW_REQUEST_KINDS,
    Envelope,
    encode_field,
    read_envelope,
    read_fields,
    read_id,
)

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

#: What the engine answers for a table it does not host. A hidden table gets the same answer,
#: so a client cannot tell a hidden table from a missing one.
TABLE_NOT_FOUND_MESSAGE = "Couldn't find key."


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What one connection may do; the defaults allow everything, as Perspective does."""

    #: Refuse ``make_table``, ``update``, ``replace``, ``remove``, ``clear``, ``delete`` and
    #: ``join``.
    read_only: bool = False
    #: Names of the tables the connection may see and use; ``None`` allows every table. A table
    #: this connection creates must be named here too.
    tables: Collection[str] | None = None
    #: Allow views with expression columns, and expression validation.
    allow_expressions: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tables, str):
            raise ValueError("Policy.tables must be a collection of table names, not a string")
        if self.tables is not None:
            object.__setattr__(self, "tables", frozenset(self.tables))


#: ``Settings.policy``: one ``Policy`` for every connection, or a function of the principal.
#: The principal is whatever the ``authenticate`` hook returned, so the function may name its
#: own type for it (``def policy(user: User) -> Policy``).
PolicySource = Union[Policy, Callable[[Any], Policy]]  # noqa: UP007 - a runtime alias

#: The policy of a connection when ``Settings.policy`` is ``None``.
ALLOW_ALL = Policy()


def resolve_policy(
    source: PolicySource | None, principal: object, *, read_only: bool = False
) -> Policy:
    """The policy of one connection: ``Settings.policy`` for its principal, made read-only
    when ``Settings.read_only`` says so."""
    policy = ALLOW_ALL if source is None else (
        source if isinstance(source, Policy) else source(principal)
    )
    if not isinstance(policy, Policy):
        raise TypeError(f"Settings.policy returned {policy!r}, not a Policy")
    if read_only and not policy.read_only:
        policy = dataclasses.replace(policy, read_only=True)
    return policy


class Refused(NamedTuple):
    """Why a request is refused: a short label for metrics, and the client's ``ServerError``."""

    reason: str
    message: str
    #: Perspective's ``StatusCode``: 0 ``SERVER_ERROR``, 1 ``VIEW_NOT_FOUND``.
    status: int = 0


class PolicyGuard:
    """Applies one connection's ``Policy`` to its requests and to the hosted-tables replies."""

    __slots__ = ("_table_of", "_tables", "policy", "subscriptions")

    def __init__(self, policy: Policy, table_of: Callable[[str], str | None]) -> None:
        self.policy = policy
        self._tables: frozenset[str] | None = (
            None if policy.tables is None else frozenset(policy.tables)
        )
        #: The table a view of this connection was made on (``None``: not its view).
        self._table_of = table_of
        #: ``msg_id`` of each hosted-tables subscription (their notifications are filtered);
        #: made on the first one.
        self.subscriptions: set[int] | None = None

    @property
    def filters_tables(self) -> bool:
        """Whether replies must be filtered (only with a table allow-list)."""
        return self._tables is not None

    def allows_table(self, name: str) -> bool:
        return self._tables is None or name in self._tables

    def refuse(self, envelope: Envelope) -> Refused | None:
        """Return why ``envelope`` is refused, or ``None`` to let it through."""
        kind = envelope.kind
        policy = self.policy
        if policy.read_only and kind in MUTATING_REQUEST_KINDS:
            return Refused("read_only", "read-only: this server refuses changes to tables")
        if not policy.allow_expressions and (
            kind in TABLE_VALIDATE_EXPR_KINDS
            or (kind == TABLE_MAKE_VIEW and _has_expressions(envelope.body))
        ):
            return Refused("expressions", "expressions are not allowed on this server")
        if self._tables is not None:
            return self._refuse_table(envelope)
        return None

    def _refuse_table(self, envelope: Envelope) -> Refused | None:
        kind = envelope.kind
        if kind == 27:  # make_table: the new table's name must be on the list
            if not self.allows_table(envelope.entity_id):
                return Refused("table", f"table '{envelope.entity_id}' is not permitted")
            return None
        if kind in TABLE_REQUEST_KINDS:
            if not self.allows_table(envelope.entity_id):
                return Refused("table", TABLE_NOT_FOUND_MESSAGE)
            return None
        if kind == MAKE_JOIN_TABLE:
            names = [envelope.entity_id, *_join_sources(envelope.body)]
            if not all(self.allows_table(name) for name in names):
                return Refused("table", TABLE_NOT_FOUND_MESSAGE)
            return None
        if kind in VIEW_REQUEST_KINDS:
            # The view guard admits only this connection's views, all made on permitted
            # tables; checked again here so the allow-list stands on its own.
            table = self._table_of(envelope.entity_id)
            if table is not None and not self.allows_table(table):
                return Refused("table", TABLE_NOT_FOUND_MESSAGE)
            return None
        if kind in REQUEST_KIND_NAMES:
            return None  # the other known kinds name no table
        # A kind this version does not know: let it through only if it names nothing hidden.
        entity = envelope.entity_id
        if entity and not self.allows_table(entity) and self._table_of(entity) is None:
            return Refused("table", TABLE_NOT_FOUND_MESSAGE)
        return None

    def note_request(self, envelope: Envelope) -> None:
        """Track hosted-tables subscriptions as their requests go to the engine."""
        if envelope.kind == GET_HOSTED_TABLES:
            if subscribes(envelope):
                if self.subscriptions is None:
                    self.subscriptions = set()
                self.subscriptions.add(envelope.msg_id)
        elif envelope.kind == REMOVE_HOSTED_TABLES_UPDATE and self.subscriptions:
            self.subscriptions.discard(read_id(envelope.body))

    def filter_reply(self, data: bytes) -> tuple[bytes, bool]:
        """Return the reply to send in place of ``data``, and whether it is a hosted-tables
        change notification (which the caller passes on only if the visible list changed).

        Any thread may call it. Called only when ``filters_tables``.
        """
        try:
            reply = read_envelope(data)
        except ProtocolError:
            return data, False
        if reply.kind == GET_HOSTED_TABLES:
            kept = [
                encode_field(1, bytes(info))
                for number, info in read_fields(reply.body)
                if number == 1 and isinstance(info, memoryview)
                and self.allows_table(_hosted_table_name(info))
            ]
            return replace_body(data, reply, b"".join(kept)), False
        if reply.kind is None and self.subscriptions and reply.msg_id in self.subscriptions:
            return data, True
        return data, False

    def visible(self, names: Collection[str]) -> frozenset[str]:
        return frozenset(name for name in names if self.allows_table(name))


def subscribes(envelope: Envelope) -> bool:
    """Whether ``envelope`` asks for the hosted tables and their later changes."""
    if envelope.kind != GET_HOSTED_TABLES:
        return False
    # GetHostedTablesReq.subscribe (1)
    return any(number == 1 and value == 1 for number, value in read_fields(envelope.body))


def replace_body(data: bytes, reply: Envelope, body: bytes) -> bytes:
    """Re-encode ``reply`` (parsed from ``data``) with a new body for the same oneof member."""
    assert reply.kind is not None
    head = encode_field(1, reply.msg_id) if reply.msg_id else b""
    if reply.entity_id:
        head += encode_field(2, reply.entity_id.encode())
    return head + encode_field(reply.kind, body)


def hosted_table_names(reply: bytes) -> list[str]:
    """Return the table names in a ``GetHostedTablesResp`` reply."""
    envelope = read_envelope(reply)
    if envelope.kind != GET_HOSTED_TABLES:
        raise ProtocolError(
            CloseCode.INTERNAL_ERROR, f"expected a hosted-tables reply, got kind {envelope.kind}"
        )
    return [
        _hosted_table_name(info)
        for number, info in read_fields(envelope.body)
        if number == 1 and isinstance(info, memoryview)
    ]


def _hosted_table_name(info: memoryview) -> str:
    # ``HostedTable.entity_id`` (4.x and 5.x); a name that is not UTF-8 is hidden.
    for number, value in read_fields(info):
        if number == 1 and isinstance(value, memoryview):
            return str(value, "utf-8", "replace")
    return ""


def _has_expressions(body: bytes | memoryview) -> bool:
    # TableMakeViewReq.config (2) -> ViewConfig.expressions (6), a map of name to expression.
    for number, config in read_fields(body):
        if number == 2 and isinstance(config, memoryview):
            for config_number, _ in read_fields(config):
                if config_number == 6:
                    return True
    return False


def _join_sources(body: bytes | memoryview) -> list[str]:
    # MakeJoinTableReq: left table (1), right table (2), join column (3). A missing name is
    # the empty string, which no policy allows.
    left, right = "", ""
    for number, value in read_fields(body):
        if isinstance(value, memoryview):
            if number == 1:
                left = str(value, "utf-8", "replace")
            elif number == 2:
                right = str(value, "utf-8", "replace")
    return [left, right]

