"""Settings shared by every adapter: one frozen dataclass, validated on construction."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ._auth import Authenticate
from ._core.policy import Policy, PolicySource
from ._core.wire import CHEAP_REQUEST_KINDS
from ._observer import SessionObserver

MiB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How the core treats one websocket connection; the defaults suit a dashboard server."""

    #: Largest inbound message in bytes; a larger one closes the connection with 1009.
    #: 64 MiB admits a sizeable table upload while bounding what one client can make us buffer.
    #: The web server's own limit (uvicorn ``ws_max_size``, 16 MiB by default) applies first.
    max_message_size: int = 64 * MiB

    #: Bytes of responses and update notifications waiting for a slow client. A request's reply
    #: is always admitted into an empty queue whatever its size, and requests are not processed
    #: while replies are waiting, so only pushed updates can overflow it; when they do, the
    #: connection is closed with 1013 and everything it held is freed.
    max_send_queue_bytes: int = 16 * MiB

    #: Inbound messages read ahead of the one being processed. When full, the connection stops
    #: reading, so TCP pushes back on a client that pipelines faster than the engine answers.
    max_pending_requests: int = 8

    #: Origins allowed besides same-origin browser pages and clients sending no ``Origin`` at all,
    #: e.g. ``{"https://dash.example.com"}``; ``{"*"}`` allows every origin. Stored as a
    #: frozenset of lowercase origins without a trailing slash.
    allowed_origins: Collection[str] = field(default_factory=frozenset)

    #: Accept handshakes with no ``Origin`` header (scripts, the Python and Node clients).
    allow_missing_origin: bool = True

    #: Request kinds (``Request.client_req`` field numbers) always answered on the event loop
    #: instead of in a worker thread: their engine cost is a few microseconds, less than a
    #: thread hop. Other kinds join them while requests of that kind on that table prove cheap
    #: (three in a row under 1 ms of engine time; one over sends them back for 30 s).
    inline_request_kinds: Collection[int] = CHEAP_REQUEST_KINDS

    #: Worker threads running requests across all connections of one adapter instance; each
    #: connection still runs one request at a time, in order.
    max_request_threads: int = 8

    #: Refuse every request that creates, changes or deletes a table (``make_table``,
    #: ``update``, ``replace``, ``remove``, ``delete``, ``join``) with a ``ServerError`` reply,
    #: for every connection whatever its ``policy``.
    read_only: bool = False

    #: What each connection may do: a ``Policy`` for all, or a function of the principal
    #: (see ``authenticate``) returning one, called once per connection before its session is
    #: created. ``None`` allows everything but what ``read_only`` refuses.
    policy: PolicySource | None = None

    #: Requests refused by the policy or the view guard that a connection is answered for with
    #: an error reply; the next one closes it with 1008. A client that keeps probing is hostile
    #: or broken; the stock clients never send a refused request by themselves.
    max_violations: int = 16

    #: Open connections to one Perspective server in this process (across every adapter that
    #: serves it); past it a connection is closed with 1013 before any session is created.
    #: ``None`` for no limit. Each idle connection costs tens of KiB and a file descriptor.
    max_connections: int | None = 10_000

    #: Open connections per principal (compared by equality); ``None`` for no limit.
    #: Connections without a principal (no ``authenticate`` hook) count only toward
    #: ``max_connections``.
    max_connections_per_principal: int | None = None

    #: Views a connection may hold at once; a ``table.view()`` past it is refused. A viewer
    #: holds one or two; ``None`` for no limit.
    max_views_per_connection: int | None = 256

    #: Requests per second a connection may send on average (a token bucket); a request past
    #: the rate is refused with an error reply without reaching the engine. ``None`` (the
    #: default) for no limit: scripts legitimately send thousands of cheap requests a second.
    max_requests_per_second: float | None = None

    #: Requests a connection may send at once before the rate applies; ``None`` means one
    #: second's worth of ``max_requests_per_second`` (at least 1).
    request_burst: int | None = None

    #: Worker threads shared by all connections to one virtual server (any factory other than
    #: ``perspective.Server``/``AsyncServer``). 1 serialises its requests, as Perspective's own
    #: handlers do, because its backend connection may not be thread-safe (DuckDB's is not).
    virtual_server_threads: int = 1

    #: Run requests on this executor instead of anyio's worker threads (asyncio only).
    executor: concurrent.futures.Executor | None = None

    #: Seconds allowed for a closing handshake; past it, Tornado and aiohttp reset the
    #: connection (ASGI servers keep it: SECURITY.md).
    close_timeout: float = 5.0

    #: Seconds between keepalive pings, for adapters whose server does not ping by itself
    #: (Tornado, aiohttp; uvicorn pings every 20 s by default, hypercorn only when configured).
    #: A peer that vanished without a TCP reset is detected within about
    #: ``ping_interval + ping_timeout``. ``None`` turns pings off.
    ping_interval: float | None = 20.0

    #: Seconds to wait for the answer to a ping before closing (Tornado; aiohttp waits half
    #: of ``ping_interval``, its own rule).
    ping_timeout: float | None = 20.0

    #: Close a connection with 1000 once it has sent nothing for this many seconds while it
    #: holds no views and no hosted-tables subscription (a forgotten script or tab). ``None``
    #: (the default) keeps idle connections open.
    idle_timeout: float | None = None

    #: Give connections that make identical views of a ``perspective.Server`` table one engine
    #: view between them (``table_make_view`` requests with equal table and configuration
    #: bytes): the engine then computes it once per update, however many viewers it has. A
    #: client cannot tell: every request and update behaves as on a view of its own. Other
    #: session factories (``AsyncServer``, virtual servers) are served as before.
    share_views: bool = True

    #: Receives connection events, e.g. ``perspective_asgi.metrics.PrometheusObserver``.
    observer: SessionObserver | None = None

    #: Async hook run once per connection before its handshake is accepted (after the origin
    #: check): it gets a ``HandshakeRequest`` and returns a principal, kept as
    #: ``SessionBridge.principal``, or ``None`` to refuse with 401; it may raise
    #: ``AuthenticationFailed`` to refuse with 401 or 403. ``None`` accepts every handshake.
    authenticate: Authenticate | None = None

    def __post_init__(self) -> None:
        for name in ("max_message_size", "max_send_queue_bytes", "max_pending_requests",
                     "max_request_threads", "virtual_server_threads"):
            _check_count(name, getattr(self, name))
        for name in ("max_connections", "max_connections_per_principal",
                     "max_views_per_connection", "request_burst"):
            value = getattr(self, name)
            if value is not None:
                _check_count(name, value)
        violations = self.max_violations
        if not isinstance(violations, int) or isinstance(violations, bool) or violations < 0:
            raise ValueError(
                f"max_violations must be a non-negative integer, got {violations!r}"
            )
        rate = self.max_requests_per_second
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0
        ):
            raise ValueError(f"max_requests_per_second must be a positive number, got {rate!r}")
        if self.request_burst is not None and rate is None:
            raise ValueError("request_burst needs max_requests_per_second")
        if self.policy is not None and not (
            isinstance(self.policy, Policy) or callable(self.policy)
        ):
            raise ValueError(
                f"policy must be a Policy or a function of the principal, got {self.policy!r}"
            )
        _check_seconds("close_timeout", self.close_timeout)
        for name in ("ping_interval", "ping_timeout", "idle_timeout"):
            if getattr(self, name) is not None:
                _check_seconds(name, getattr(self, name))
        if self.authenticate is not None and not callable(self.authenticate):
            raise ValueError(f"authenticate must be an async callable, got {self.authenticate!r}")
        if isinstance(self.allowed_origins, str):
            raise ValueError("allowed_origins must be a collection of origins, not a string")
        object.__setattr__(self, "allowed_origins", _normalise_origins(self.allowed_origins))
        object.__setattr__(self, "inline_request_kinds", frozenset(self.inline_request_kinds))


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _normalise_origins(origins: Iterable[str]) -> frozenset[str]:
    # Browsers send the origin in lowercase without a trailing slash; compare in that form.
    normalised = set()
    for origin in origins:
        if not isinstance(origin, str) or not origin:
            raise ValueError(f"allowed_origins entries must be non-empty strings, got {origin!r}")
        normalised.add(origin if origin == "*" else origin.lower().rstrip("/"))
    return frozenset(normalised)


def resolve_settings(
    settings: Settings | None, executor: concurrent.futures.Executor | None = None
) -> Settings:
    """Return ``settings`` (the defaults if ``None``), with ``executor`` taking precedence.

    The adapters accept ``executor=`` beside ``settings=`` for compatibility with Perspective's
    reference handlers.
    """
    settings = settings or Settings()
    return settings if executor is None else dataclasses.replace(settings, executor=executor)
