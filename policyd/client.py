"""What the tap calls to get decisions: a cache in the tap process first,
policyd over gRPC otherwise.

A warm decision never leaves the tap (one Python gRPC round trip alone would
cap a tap near 4.5k statements/s). The cache is keyed so that it is only
ever right:

* every field of the policy input except ``session.id`` and
  ``identity.expires_at`` (policy revision, identity, groups as a set,
  database, roles, client, search_path, transaction status, path, statement
  name, parameter count, exact SQL text), plus
* the values of exactly the Bind parameters the policy saw (``params_read``
  of the decision: policyd only places a value in the input where the
  analysis compares a column with ``$n``).

It is dropped whenever the policy revision changes: learnt from every
decision and pushed by policyd's ``WatchRevision`` stream. While that stream
is down the cache serves nothing (policyd may have missed a policy change),
so a policyd outage refuses statements instead of replaying old answers.
HOLD decisions and decisions taken without OPA are never cached. A policy
edit therefore reaches a warm cache within policyd's revision poll interval
(1 s by default) plus one stream message; a policyd outage within the time
the stream takes to break.

Failure: an RPC error or a deadline gives a DENY with SQLSTATE 58000
(system_error: external to PostgreSQL, worth retrying later), reason
"policy service unavailable".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from pgwarden._proto import policy_pb2 as pb
from pgwarden._proto import policy_pb2_grpc as pb_grpc
from policyd import decision as dec
from policyd.convert import decision_from_pb, identity_to_pb, request_to_pb, session_to_pb
from tap.hooks import Decision, Identity, SessionInfo, StatementRequest, Verdict

log = structlog.get_logger("policyd.client")

UNAVAILABLE_REASON = "policy service unavailable"
_UNKNOWN = object()  # a parameter the policy saw as "unknown" (not bound yet)


def _base_key(request: StatementRequest) -> tuple[Any, ...]:
    i = request.identity
    s = request.session
    return (
        i.subject, i.issuer, i.kind, i.actor, frozenset(i.groups),
        s.database, s.user, s.upstream_role, s.client_addr, s.application_name, s.tls,
        s.search_path, s.transaction_status,
        request.path, request.statement_name,
        None if request.params is None else len(request.params),
        request.sql,
    )


def _param_values(request: StatementRequest, read: tuple[int, ...]) -> tuple[Any, ...]:
    params = request.params
    return tuple(params[n - 1] if params is not None and 0 < n <= len(params) else _UNKNOWN
                 for n in read)


class DecisionCache:
    """Bounded LRU of decisions, valid for one policy revision at a time."""

    def __init__(self, maxsize: int = 10_000, max_sql_length: int = 16_384) -> None:
        self.maxsize = maxsize
        self.max_sql_length = max_sql_length  # bulk statements are not worth the memory
        self.revision = ""
        self.enabled = True
        self.hits = 0
        self.misses = 0
        # base key -> params_read of that statement (the same for every value)
        self._shape: dict[tuple[Any, ...], tuple[int, ...]] = {}
        self._items: OrderedDict[tuple[Any, ...], Decision] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, request: StatementRequest) -> Decision | None:
        if not self.enabled:
            return None
        base = _base_key(request)
        read = self._shape.get(base)
        if read is None:
            self.misses += 1
            return None
        key = (base, _param_values(request, read))
        found = self._items.get(key)
        if found is None or found.policy_revision != self.revision:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found

    def put(self, request: StatementRequest, decision: Decision, *,
            params_read: tuple[int, ...], cacheable: bool = True) -> None:
        """Remember a decision (if it may be) and learn its revision."""
        if decision.policy_revision:
            self.observe_revision(decision.policy_revision)
        if (not cacheable or not self.enabled or decision.verdict is Verdict.HOLD
                or not decision.policy_revision or decision.approval.required
                or len(request.sql) > self.max_sql_length):
            return
        base = _base_key(request)
        self._shape[base] = params_read
        key = (base, _param_values(request, params_read))
        self._items[key] = decision
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        if len(self._shape) > 2 * self.maxsize:  # forget shapes of evicted statements
            self._shape = {k[0]: self._shape[k[0]] for k in self._items if k[0] in self._shape}

    def observe_revision(self, revision: str) -> None:
        if revision != self.revision:
            self.invalidate()
            self.revision = revision

    def invalidate(self) -> None:
        self._items.clear()
        self._shape.clear()


@dataclass(frozen=True, slots=True)
class ConnectDecision:
    allowed: bool
    upstream_role: str = ""
    reasons: tuple[str, ...] = ()
    decision_id: str = ""
    policy_revision: str = ""


class PolicyClient:
    """Async client of policyd for the tap (one per tap process).

    ``target``: ``unix:/path/policyd.sock`` or ``host:port``.
    ``deadline``: seconds per RPC; past it the statement is refused.
    """

    def __init__(self, target: str, *, deadline: float = 1.0,
                 cache: DecisionCache | None = None, watch_revision: bool = True) -> None:
        self.target = target
        self.deadline = deadline
        self.cache = cache if cache is not None else DecisionCache()
        self._watch = watch_revision
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.PolicyServiceStub | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        if self._watch:
            self.cache.enabled = False  # until policyd tells us the revision
            self._watcher = asyncio.create_task(self._watch_revision(), name="policy-revision")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> PolicyClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def decide(self, request: StatementRequest) -> Decision:
        """The decision for one message's SQL. Never raises; fails closed."""
        cached = self.cache.get(request)
        if cached is not None:
            return cached
        return await self.decide_uncached(request)

    async def decide_uncached(self, request: StatementRequest) -> Decision:
        assert self._stub is not None, "start() the PolicyClient first"
        try:
            message = request_to_pb(request)
        except (ValueError, TypeError):  # e.g. text protobuf cannot encode (lone surrogates)
            return dec.deny("statement text could not be sent to the policy service; refused")
        try:
            reply = await self._stub.Decide(message, timeout=self.deadline)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "DEADLINE"
            log.warning("policy_rpc_failed", session_id=request.session.session_id, code=code)
            return dec.deny(f"{UNAVAILABLE_REASON} ({code.lower()}); statement refused",
                            sqlstate=dec.UNAVAILABLE_SQLSTATE)
        decision = decision_from_pb(reply)
        self.cache.put(request, decision, params_read=tuple(reply.params_read),
                       cacheable=reply.cacheable)
        return decision

    async def decide_connect(self, identity: Identity, database: str,
                             session: SessionInfo | None = None) -> ConnectDecision:
        """May this identity connect to ``database``, as which upstream role."""
        assert self._stub is not None, "start() the PolicyClient first"
        msg = pb.DecideConnectRequest(identity=identity_to_pb(identity), database=database)
        if session is not None:
            msg.session.CopyFrom(session_to_pb(session))
        try:
            reply = await self._stub.DecideConnect(msg, timeout=self.deadline)
        except (TimeoutError, grpc.aio.AioRpcError):
            return ConnectDecision(allowed=False, reasons=(UNAVAILABLE_REASON,))
        return ConnectDecision(
            allowed=reply.allowed and bool(reply.upstream_role),
            upstream_role=reply.upstream_role, reasons=tuple(reply.reasons),
            decision_id=reply.decision_id, policy_revision=reply.policy_revision)

    async def _watch_revision(self) -> None:
        """Follow policyd's revision; no cache while we cannot follow it."""
        backoff = 0.05
        assert self._stub is not None
        while True:
            try:
                stream = self._stub.WatchRevision(pb.WatchRevisionRequest())
                async for update in stream:
                    backoff = 0.05
                    self.cache.observe_revision(update.policy_revision)
                    self.cache.enabled = update.opa_ready
                    if not update.opa_ready:
                        self.cache.invalidate()
            except grpc.aio.AioRpcError as exc:
                log.info("policy_watch_lost", code=exc.code().name)
            self.cache.enabled = False
            self.cache.invalidate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
