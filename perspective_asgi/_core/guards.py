"""Every check a request passes before it reaches the engine, in one chain with one contract.

    rate (limits.TokenBucket) -> policy (policy.PolicyGuard) -> views (views.ViewGuard)

``admit`` is asked in the order requests are handed to the engine, one at a time, and answers
with nothing (go ahead) or the ``ServerError`` reply to send instead; ``handled`` is told once
the engine has run an admitted request; ``filter_reply`` sees every reply on its way out, on
whichever thread produced it. The chain does no I/O and never waits, so the bridge's inline and
queued paths use it alike.
"""

from __future__ import annotations

from .._codes import CloseCode
from .._config import Settings
from .._exceptions import ProtocolError
from .._observer import SessionObserver
from .limits import TokenBucket
from .policy import Policy, PolicyGuard, Refused
from .views import ViewGuard
from .wire import VIEW_REQUEST_KINDS, Envelope, encode_server_error


class GuardChain:
    """One connection's rate limit, policy and view guard, applied in that order."""

    __slots__ = ("_bucket", "_max_violations", "_observer", "_rate", "policy", "views",
                 "violations")

    def __init__(
        self,
        views: ViewGuard,
        policy: PolicyGuard,
        *,
        observer: SessionObserver,
        max_violations: int,
        rate: tuple[float, int] | None = None,
    ) -> None:
        self.views = views
        self.policy = policy
        self._observer = observer
        self._max_violations = max_violations
        #: ``(requests per second, burst)``; the bucket is made on the first request.
        self._rate = rate
        self._bucket: TokenBucket | None = None
        #: Requests refused by the policy or the view guard so far.
        self.violations = 0

    @classmethod
    def for_connection(
        cls, engine: object, policy: Policy, settings: Settings, observer: SessionObserver
    ) -> GuardChain:
        """The chain of one connection to ``engine`` under ``policy`` and ``settings``."""
        views = ViewGuard(engine, settings.max_views_per_connection)
        rate = settings.max_requests_per_second
        return cls(
            views, PolicyGuard(policy, views.table_of), observer=observer,
            max_violations=settings.max_violations,
            rate=None if rate is None else (rate, settings.request_burst or max(1, int(rate))),
        )

    @property
    def holds_state(self) -> bool:
        """Whether the connection holds something it may be waiting on: a view, or a
        hosted-tables subscription."""
        return self.views.holds_views or bool(self.policy.subscriptions)

    def admit(self, envelope: Envelope) -> bytes | None:
        """Return ``None`` to let ``envelope`` reach the engine, or the error reply to send.

        Raises ``ProtocolError`` (1008) once the connection has more than ``max_violations``
        refusals by the policy or the view guard.
        """
        refused = self._over_rate()
        if refused is None:
            refused = self.policy.refuse(envelope) or self.views.refuse(envelope)
            if refused is None:
                self.policy.note_request(envelope)
                return None
            self.violations += 1
        self._observer.request_refused(envelope.kind, refused.reason)
        if self.violations > self._max_violations:
            raise ProtocolError(
                CloseCode.POLICY_VIOLATION,
                f"too many refused requests ({self.violations}); the last: {refused.message}",
            )
        return encode_server_error(
            envelope.msg_id, envelope.entity_id, refused.message, refused.status
        )

    def _over_rate(self) -> Refused | None:
        if self._rate is None:
            return None
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = TokenBucket(*self._rate)
        if bucket.take():
            return None
        # Not a violation: a client that bursts is throttled, not judged.
        return Refused("rate", f"rate limit: over {self._rate[0]:g} requests per second")

    def table_of(self, envelope: Envelope) -> str:
        """The table a request is about: its view's for a view request, else its entity."""
        if envelope.kind in VIEW_REQUEST_KINDS:
            return self.views.table_of(envelope.entity_id) or ""
        return envelope.entity_id

    def handled(self, envelope: Envelope) -> None:
        """Note that the engine has run ``envelope`` (a deleted view's id is free again)."""
        self.views.handled(envelope)

    def filter_reply(self, data: bytes) -> tuple[bytes, bool]:
        """Return the reply to send in place of ``data``, and whether it is a hosted-tables
        change notification to pass on only if the visible tables changed. Any thread."""
        self.views.on_response(data)
        if self.policy.filters_tables:
            return self.policy.filter_reply(data)
        return data, False
