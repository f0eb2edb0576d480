"""policyd's gRPC service: analyse the SQL, ask OPA, answer the tap.

Listens on a unix socket (``unix:/run/pgwarden/policyd.sock``) or loopback
(``127.0.0.1:50061``). The standard gRPC health service reports SERVING only
while OPA answers, so an orchestrator (and ``pgwarden doctor``) sees a
policy outage; the tap refuses statements meanwhile (fail closed).

Logs carry the decision id, verdict, revision, session id and the SQL
fingerprint, never the SQL text or parameter values (either may hold a PAN).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram

from pgwarden._proto import policy_pb2 as pb
from pgwarden._proto import policy_pb2_grpc as pb_grpc
from policyd import decision as dec
from policyd.analysis import Analysis, analyse
from policyd.convert import decision_to_pb, identity_from_pb, request_from_pb, session_from_pb
from policyd.lookups import LookupLedger
from policyd.opa import CONNECT_PACKAGE, STATEMENT_PACKAGE, OpaEngine, OpaUnavailable
from tap.hooks import Verdict

log = structlog.get_logger("policyd")

DECISIONS = Counter("policyd_decisions", "Statement decisions taken by policyd, by verdict.",
                    ["verdict"], namespace="pgwarden")
OPA_SECONDS = Histogram("policyd_opa_seconds", "OPA REST query time for one decision.",
                        namespace="pgwarden",
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
OPA_UNAVAILABLE = Counter("policyd_opa_unavailable",
                          "Decisions refused because OPA did not answer (fail closed).",
                          namespace="pgwarden")

SERVICE_NAME = "pgwarden.policy.v1.PolicyService"


class AnalysisCache:
    """Analyses by (sql, search_path, role): pure, so always reusable.

    A prepared statement's text is analysed once, each Execute only binds
    its parameter values; many identities sending the same statements share
    the pglast work, which the tap's DecisionCache cannot (it is keyed on
    groups and revision too).
    """

    def __init__(self, maxsize: int = 4096) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[Any, ...], Analysis] = OrderedDict()

    def get(self, sql: str, search_path: str, user: str,
            params: tuple[str | None, ...] | None) -> Analysis:
        key = (sql, search_path, user)
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        else:
            found = analyse(sql, search_path=search_path, user=user)
            self._items[key] = found
            if len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return found if params is None else found.bind(params)


class PolicyService(pb_grpc.PolicyServiceServicer):
    """The decision point. Every error path ends in a DENY, never an ALLOW."""

    def __init__(self, engine: OpaEngine, *, analysis_cache_size: int = 4096,
                 lookups: LookupLedger | None = None) -> None:
        self.engine = engine
        self.analyses = AnalysisCache(analysis_cache_size)
        self.lookups = lookups or LookupLedger()

    async def decide(self, request: pb.DecideRequest) -> pb.DecideResponse:
        req = request_from_pb(request)
        role = req.session.upstream_role or req.session.user
        analysis = self.analyses.get(req.sql, req.session.search_path, role, req.params)
        params_read = dec.params_read(analysis)
        revision = self.engine.revision
        who = (req.identity.issuer, req.identity.subject)
        policy_input = dec.statement_input(req, analysis, history=self.lookups.history(who))
        started = time.perf_counter()
        try:
            doc = await self.engine.query(STATEMENT_PACKAGE, policy_input)
        except OpaUnavailable as exc:
            OPA_UNAVAILABLE.inc()
            DECISIONS.labels(verdict="deny").inc()
            decision = dec.deny(f"policy engine unavailable ({exc}); statement refused",
                                sqlstate=dec.UNAVAILABLE_SQLSTATE, revision=revision,
                                analysis=analysis.summary())
            self._log(req.session.session_id, decision.decision_id, decision.verdict,
                      revision, analysis, opa="unavailable")
            return decision_to_pb(decision, params_read=params_read, cacheable=False)
        OPA_SECONDS.observe(time.perf_counter() - started)
        decision = dec.from_document(doc, revision=revision, analysis=analysis)
        looked_up = doc.get("card_lookups") if isinstance(doc, dict) else None
        if (decision.verdict is not Verdict.DENY and isinstance(looked_up, int)
                and not isinstance(looked_up, bool) and looked_up > 0):
            # Lookups the policy counts against the identity (input.history
            # of its next decisions).
            self.lookups.add(who, looked_up)
        DECISIONS.labels(verdict=decision.verdict.value).inc()
        self._log(req.session.session_id, decision.decision_id, decision.verdict, revision,
                  analysis)
        cacheable = decision.verdict is not Verdict.HOLD and not (
            isinstance(doc, dict) and doc.get("cacheable") is False)
        return decision_to_pb(decision, params_read=params_read, cacheable=cacheable)

    async def Decide(self, request: pb.DecideRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.DecideResponse:
        try:
            return await self.decide(request)
        except Exception:  # a bug here must still answer DENY, not crash the stream
            log.exception("decide_failed", session_id=request.session.session_id)
            return decision_to_pb(
                dec.deny("policy service error; statement refused",
                         sqlstate=dec.UNAVAILABLE_SQLSTATE, revision=self.engine.revision),
                cacheable=False)

    async def DecideConnect(self, request: pb.DecideConnectRequest,
                            context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.DecideConnectResponse:
        identity = identity_from_pb(request.identity)
        session = session_from_pb(request.session)
        input_doc = {
            "identity": dec.identity_input(identity),
            "database": request.database,
            "session": dec.session_input(session),
        }
        decision_id = dec.new_decision_id()
        revision = self.engine.revision
        try:
            doc = await self.engine.query(CONNECT_PACKAGE, input_doc)
        except OpaUnavailable as exc:
            return pb.DecideConnectResponse(
                allowed=False, reasons=[f"policy engine unavailable ({exc}); connection refused"],
                decision_id=decision_id, policy_revision=revision)
        if not isinstance(doc, dict) or doc.get("allowed") is not True or not isinstance(
                doc.get("upstream_role"), str) or not doc.get("upstream_role"):
            reasons = doc.get("reasons", []) if isinstance(doc, dict) else []
            log.info("connect_denied", decision_id=decision_id, subject=identity.subject,
                     database=request.database, policy_revision=revision)
            return pb.DecideConnectResponse(
                allowed=False,
                reasons=[str(r) for r in reasons] or ["no connect decision (undefined is a deny)"],
                decision_id=decision_id, policy_revision=revision)
        log.info("connect_allowed", decision_id=decision_id, subject=identity.subject,
                 database=request.database, upstream_role=doc["upstream_role"],
                 policy_revision=revision)
        return pb.DecideConnectResponse(
            allowed=True, upstream_role=doc["upstream_role"],
            reasons=[str(r) for r in doc.get("reasons", [])],
            decision_id=decision_id, policy_revision=revision)

    async def WatchRevision(self, request: pb.WatchRevisionRequest,
                            context: grpc.aio.ServicerContext[Any, Any],
                            ) -> AsyncIterator[pb.RevisionUpdate]:
        async for revision, ready in self.engine.watch():
            yield pb.RevisionUpdate(policy_revision=revision, opa_ready=ready)

    @staticmethod
    def _log(session_id: str, decision_id: str, verdict: Verdict, revision: str,
             analysis: Analysis, **extra: str) -> None:
        # Allows are the bulk and are in the audit trail anyway: debug only.
        emit = log.debug if verdict is Verdict.ALLOW and not extra else log.info
        emit("decision", session_id=session_id, decision_id=decision_id,
             verdict=verdict.value, policy_revision=revision,
             fingerprint=analysis.fingerprint, parseable=analysis.parseable, **extra)


async def _track_health(engine: OpaEngine, servicer: health.aio.HealthServicer) -> None:
    async for _, ready in engine.watch():
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await servicer.set(name, status)


class PolicyServer:
    """policyd as an object tests and the CLI start and stop."""

    def __init__(self, listen: str, opa_url: str, *, opa_deadline: float = 0.5,
                 revision_interval: float = 1.0, policy_dir: Path | None = None,
                 extra_services: list[Callable[[grpc.aio.Server], None]] | None = None) -> None:
        self.listen = listen
        # Other services policyd hosts on the same server (approvals, ...).
        self.extra_services = list(extra_services or [])
        self.engine = OpaEngine(opa_url, deadline=opa_deadline,
                                revision_interval=revision_interval, policy_dir=policy_dir)
        self.service = PolicyService(self.engine)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._health_task: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        """The address a client dials."""
        if self.listen.startswith("unix:"):
            return self.listen
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.engine.start()
        self.server = grpc.aio.server()
        pb_grpc.add_PolicyServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.service, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        for add in self.extra_services:
            add(self.server)
        self.port = self.server.add_insecure_port(self.listen)
        if not self.listen.startswith("unix:") and self.port == 0:
            raise OSError(f"policyd could not listen on {self.listen}")
        await self.server.start()
        if self.listen.startswith("unix:"):
            # Only the owner and its group (the taps) may ask for decisions.
            path = self.listen[len("unix:"):]
            os.chmod(path[2:] if path.startswith("//") else path, 0o660)
        self._health_task = asyncio.create_task(_track_health(self.engine, health_servicer))
        log.info("policyd_started", listen=self.target, opa=self.engine.url,
                 policy_revision=self.engine.revision, opa_ready=self.engine.ready)

    async def stop(self, grace: float = 1.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.server is not None:
            await self.server.stop(grace)
        await self.engine.close()
        log.info("policyd_stopped")

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Serve until the server terminates or ``stop`` is set (SIGTERM)."""
        await self.start()
        try:
            assert self.server is not None
            if stop is None:
                await self.server.wait_for_termination()
            else:
                await stop.wait()
        finally:
            await self.stop()
