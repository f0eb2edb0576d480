"""What both drivers share beyond the session: settings turned into session
options, the hooks (policy, masking), the event sink and the decision path.

The runtime is the only place that knows about services; the session stays
sans-IO and the drivers stay byte movers.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from pgwarden import metrics
from tap import protocol as pg
from tap.actions import NeedAuth
from tap.hooks import ALLOW_ALL, AuthResult, Decision, StatementRequest, Verdict
from tap.session import Hooks, Session
from tap.tls import UpstreamTLS, server_context

Decider = Callable[[StatementRequest], Awaitable[Decision]]
Authenticator = Callable[[NeedAuth], Awaitable[AuthResult]]
EventSink = Callable[[dict[str, Any]], None]


# While the audit trail cannot take events, no statement runs (PCI DSS 10.7.2).
AUDIT_DENY = Decision(verdict=Verdict.DENY, sqlstate="58000",
                      reasons=("the audit trail cannot record statements right now",))


def cancelled_decision(held: bool) -> Decision:
    """What a statement gets when its client cancels it before it ran: during
    an approval hold (PW003, the approval request is marked cancelled) or
    while its decision was pending (57014, as PostgreSQL's own cancel)."""
    if held:
        return Decision(verdict=Verdict.DENY, sqlstate=pg.APPROVAL_CANCELLED,
                        reasons=("canceled by the client while it waited for approval",))
    return Decision(verdict=Verdict.DENY, sqlstate="57014",
                    reasons=("canceled by the client while its decision was pending",))


async def _allow(_: StatementRequest) -> Decision:
    return ALLOW_ALL


async def _no_identity_service(_: NeedAuth) -> AuthResult:
    return AuthResult(ok=False, reason="no identity service is configured", sqlstate="28000")


@dataclass(slots=True)
class TapSettings:
    tls_cert: str | None = None
    tls_key: str | None = None
    require_client_tls: bool = False
    upstream_sslmode: str = "disable"
    upstream_ca: str | None = None
    upstream_hostname: str | None = None
    max_message_size: int = pg.DEFAULT_MAX_MESSAGE
    auth_mode: str = "passthrough"  # passthrough | token
    allow_plaintext_tokens: bool = False
    idle_timeout: float | None = 900.0
    max_result_bytes: int | None = None


@dataclass
class Runtime:
    settings: TapSettings = field(default_factory=TapSettings)
    decider: Decider = _allow
    authenticator: Authenticator = _no_identity_service
    hook_factory: Callable[[], Hooks] = Hooks
    sink: EventSink | None = None
    log: Any = field(default_factory=lambda: structlog.get_logger("pgwarden.tap"))
    sessions_open: int = 0
    policy_client: Any = None
    audit: Any = None  # tap.audit_sink.AuditSink, or None: events go to the log only
    approvals: Any = None  # policyd.approvals.client.ApprovalClient, or None
    catalog: Any = None  # tap.catalog.Catalog (names FunctionCall targets), or None
    # How long a FunctionCall, or a statement whose plan has column rules,
    # waits for its database's first catalog load.
    catalog_wait: float = 5.0
    holding: set[str] = field(default_factory=set)  # session ids waiting for approval
    driver: str = "inline"
    draining: bool = False
    audit_ok: bool = True
    _tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        s = self.settings
        if s.tls_cert and s.tls_key:
            self._tls = server_context(s.tls_cert, s.tls_key)

    def session_options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "tls_context": self._tls,
            "require_client_tls": s.require_client_tls,
            "upstream_tls": UpstreamTLS(mode=s.upstream_sslmode, ca_file=s.upstream_ca,
                                        server_hostname=s.upstream_hostname),
            "max_message_size": s.max_message_size,
            "auth_mode": s.auth_mode,
            "allow_plaintext_tokens": s.allow_plaintext_tokens,
            "idle_timeout": s.idle_timeout,
            "max_result_bytes": s.max_result_bytes,
        }

    def hooks(self) -> Hooks:
        return self.hook_factory()

    async def decide(self, request: StatementRequest) -> Decision:
        """The final decision for a statement: a HOLD is resolved here, by
        waiting for a human's approval (or its refusal, expiry, a cancel)."""
        if not self.audit_ok:
            return AUDIT_DENY
        if request.function is not None:
            request = await self._name_function(request)
        started = time.perf_counter()
        decision = await self.decider(request)
        metrics.DECISION_LATENCY.labels(source="policyd").observe(time.perf_counter() - started)
        if decision.verdict is Verdict.DENY and decision.sqlstate == pg.SYSTEM_ERROR:
            metrics.POLICY_UNAVAILABLE.inc()  # policyd or OPA did not answer: refused
        if not await self._catalog_ready(decision, request.session.database):
            return replace(decision, verdict=Verdict.DENY, sqlstate="55000", reasons=(
                *decision.reasons, "the gateway cannot apply this statement's column masking "
                "rules: the catalog of its database is not loaded (see the tap's log); retry"))
        if decision.verdict is not Verdict.HOLD:
            return decision
        if (request.path == "parse" and request.params is None
                and decision.analysis.get("params_used")):
            # Held only because the Bind values are not known yet: the session
            # prepares it and asks again with the values at each Bind.
            return decision
        if self.approvals is None:
            return replace(decision, verdict=Verdict.DENY, reasons=(
                *decision.reasons, "this statement needs a human approval, and no approval "
                "service is configured for this gateway"))
        self.holding.add(request.session.session_id)
        metrics.APPROVALS_PENDING.inc()
        outcome = "cancelled"  # the client went away or cancelled while it waited
        try:
            held: Decision = await self.approvals.hold(request, decision)
            outcome = _hold_outcome(held)
            return held
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail closed
            outcome = "unavailable"
            self.log.error("approval_service_failed", session_id=request.session.session_id,
                           error=exc.__class__.__name__)
            return replace(decision, verdict=Verdict.DENY,
                           reasons=(*decision.reasons, "the approval service is unavailable"))
        finally:
            self.holding.discard(request.session.session_id)
            metrics.APPROVALS_PENDING.dec()
            metrics.APPROVALS_RESOLVED.labels(outcome=outcome).inc()

    def needs_catalog(self, decision: Decision, database: str) -> bool:
        """Column rules apply by the identity the catalog gives a result
        column (table OID, attribute number); without the catalog of the
        database, only content detection would look, which misses a stored
        value that fails the Luhn check and every style but last4. Such a
        decision waits for the catalog (a cached one goes the slow path)."""
        return (self.catalog is not None and decision.verdict is not Verdict.DENY
                and bool(decision.mask.rules) and not decision.mask.unmasked
                and not self.catalog.loaded(database))

    async def _catalog_ready(self, decision: Decision, database: str) -> bool:
        if not self.needs_catalog(decision, database):
            return True
        loaded: bool = await self.catalog.wait_loaded(database, self.catalog_wait)
        return loaded

    async def _name_function(self, request: StatementRequest) -> StatementRequest:
        """A FunctionCall the session could not name because the catalog of
        its database was not loaded yet: wait for the load (bounded), then
        ask the policy about the named call. Still unknown: left opaque, and
        the policy refuses it."""
        assert request.function is not None
        oid, nargs = request.function
        if self.catalog is None or request.sql != pg.function_call_sql(oid, nargs, None):
            return request  # no catalog, or the session named it already
        database = request.session.database
        if not await self.catalog.wait_loaded(database, self.catalog_wait):
            return request
        name = self.catalog.function_name(database, oid)
        if name is None:
            return request
        return replace(request, sql=pg.function_call_sql(oid, nargs, name))

    async def authenticate(self, need: NeedAuth) -> AuthResult:
        try:
            return await self.authenticator(need)
        except Exception as exc:  # fail closed: an identity outage refuses logins
            self.log.error("identity_service_failed", error=exc.__class__.__name__)
            return AuthResult(ok=False, reason=f"identity service failed: {exc.__class__.__name__}",
                              sqlstate="28000")

    def record(self, records: list[dict[str, Any]]) -> bool:
        """Make events durable; False means they are not (fail closed)."""
        _count(records, self.driver)
        if self.audit is None:
            for r in records:
                self.emit(r)
            return True
        ok = bool(self.audit.submit(records))
        if ok != self.audit_ok:
            self.audit_ok = ok
            self.log.error("audit_unavailable") if not ok else self.log.info("audit_recovered")
        return ok

    def emit(self, record: dict[str, Any]) -> None:
        if self.audit is not None:
            self.record([record])
            return
        if self.sink is not None:
            self.sink(record)
            return
        kind = record.get("type")
        if kind in _NOT_LOGGED:
            return  # per-statement records belong in the audit store, not the log
        self.log.info(str(kind), **{k: v for k, v in record.items() if k != "type"})

    def emit_all(self, actions: list[Any]) -> None:
        """Record the events among actions that can no longer be delivered."""
        from tap.actions import Event

        for a in actions:
            if isinstance(a, Event):
                self.emit(a.record)

    def session_opened(self, session: Session) -> None:
        self.sessions_open += 1
        metrics.SESSIONS.labels(driver=self.driver).inc()
        metrics.SESSIONS_OPENED.labels(driver=self.driver).inc()

    def session_closed(self, session: Session) -> None:
        self.sessions_open -= 1
        metrics.SESSIONS.labels(driver=self.driver).dec()

    @property
    def ready(self) -> bool:
        """Readiness: not draining, and statements can be recorded."""
        return not self.draining and self.audit_ok

    async def aclose(self) -> None:
        return None


# Statement-level records (SQL text, errors that may quote values) go to the
# audit store only: never to the application log, and never per statement on
# the hot path.
_NOT_LOGGED = frozenset({"statement", "statement_end", "statement_error", "statement_refused",
                         "auth", "cancel_request"})


# How a held statement ended, by the SQLSTATE of its final decision
# (SYSTEM_ERROR: the approval service did not answer).
_HOLD_OUTCOMES = {pg.APPROVAL_DENIED: "rejected", pg.APPROVAL_EXPIRED: "expired",
                  pg.APPROVAL_CANCELLED: "cancelled", pg.SYSTEM_ERROR: "unavailable"}


def _hold_outcome(decision: Decision) -> str:
    if decision.verdict is Verdict.ALLOW:
        return "approved"
    return _HOLD_OUTCOMES.get(decision.sqlstate, "rejected")


_STATEMENT_SERIES: dict[Any, Any] = {}
_MASKED_SERIES: dict[Any, Any] = {}


def _count(records: list[dict[str, Any]], driver: str) -> None:
    """Prometheus series from the session's events (the core has no metrics)."""
    for r in records:
        kind = r.get("type")
        if kind == "statement":
            verdict = r.get("verdict", "deny")
            child = _STATEMENT_SERIES.get(verdict)
            if child is None:  # labels() costs a lock and a tuple key per call
                child = _STATEMENT_SERIES[verdict] = metrics.STATEMENTS.labels(verdict=verdict)
            child.inc()
        elif kind == "statement_end":
            masked = r.get("masked")
            if masked:
                for rule, n in masked.get("by_rule", {}).items():
                    series = _MASKED_SERIES.get(rule)
                    if series is None:
                        series = _MASKED_SERIES[rule] = metrics.MASKED_VALUES.labels(rule=rule)
                    series.inc(n)
        elif kind == "protocol_error":
            metrics.PROTOCOL_ERRORS.labels(direction="frontend").inc()
        elif kind == "fatal" and str(r.get("reason", "")).startswith("upstream"):
            metrics.PROTOCOL_ERRORS.labels(direction="backend").inc()
        elif kind == "fatal" and r.get("reason") == "result_limit":
            metrics.RESULTS_CUT.inc()
