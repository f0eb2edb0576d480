"""The sans-IO PostgreSQL session filter.

A :class:`Session` is fed the bytes of one client connection in both
directions, the way an Envoy network filter is: ``on_read`` for client →
server bytes, ``on_write`` for server → client bytes. It answers with a list
of :mod:`actions <tap.actions>` for the driver to carry out in order: bytes to
send upstream or downstream, a decision to fetch, an audit event, a close.
It never touches a socket, a clock or an event loop; both drivers (Envoy
ext_proc over gRPC, inline asyncio) run this same object.

How a refused statement is delivered
------------------------------------
A refused statement is never sent to PostgreSQL. In its place the tap sends a
*marker*: a statement that PostgreSQL rejects with a syntax error naming a
random nonce (``pgwarden_refused_<nonce>``). The server therefore fails at
exactly the position the refused statement had, with its own rules: a
transaction block becomes failed, pipelined extended-protocol messages are
skipped up to Sync, ReadyForQuery carries the right status. When the server's
ErrorResponse naming the nonce comes back, the tap replaces it with its own
42501 error carrying the reason and the decision id. Client and server state
can never drift apart, in either driver, however the client pipelines.
"""

from __future__ import annotations

import functools
import re
import secrets
import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tap import protocol as pg
from tap.actions import (
    Action,
    Close,
    Event,
    NeedAuth,
    NeedDecision,
    SendDownstream,
    SendUpstream,
)
from tap.cancel import CancelRegistry
from tap.hooks import (
    ALLOW_ALL,
    AuthResult,
    Decision,
    Identity,
    SessionInfo,
    StatementRequest,
    Verdict,
)
from tap.results import ResultMasker, ResultMaskerFactory
from tap.tls import TLSEndpoint, TLSError, UpstreamTLS
from tap.upstream_auth import UpstreamAuthenticator, UpstreamAuthError

_SSL_ANSWER_YES = b"S"
_SSL_ANSWER_NO = b"N"

# Phases of a session.
_STARTUP = "startup"  # waiting for the startup packet (maybe after TLS)
_CLIENT_AUTH = "client_auth"  # token mode: waiting for the token (password message)
_CHECKING = "checking"  # token mode: the identity service is validating the token
_UPSTREAM_TLS = "upstream_tls"  # waiting for the server's answer to our SSLRequest
_AUTH = "auth"  # authentication exchange in progress
_READY = "ready"  # query phase
_CANCEL = "cancel"  # a CancelRequest was forwarded; wait for the server to close
_CLOSED = "closed"


def _allow_all(_: StatementRequest) -> Decision | None:
    return ALLOW_ALL


@dataclass(slots=True)
class SessionConfig:
    """Everything a session needs to know that does not come from the wire."""

    session_id: str
    client_addr: str = ""
    driver: str = "inline"
    tls_context: Any = None  # ssl.SSLContext accepting client TLS, or None
    require_client_tls: bool = False
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    max_message_size: int = pg.DEFAULT_MAX_MESSAGE
    identity: Identity = field(default_factory=Identity)
    # "passthrough": the client authenticates to PostgreSQL itself (development).
    # "token": the client presents an OIDC token as its password; the gateway
    # logs in upstream with credentials only it holds.
    auth_mode: str = "passthrough"
    # Tokens travel in a cleartext password message: only over TLS, unless a
    # development setting allows it (loopback only, enforced by the driver).
    allow_plaintext_tokens: bool = False
    idle_timeout: float | None = 900.0  # seconds; PCI DSS 8.2.8
    # Largest result one execution may return (DataRow and CopyData bytes);
    # past it the session ends with 54000. None: no limit.
    max_result_bytes: int | None = None



# Startup parameters a client may pass on in token mode. Everything else
# (notably ``options``, which can set any GUC, role included) is dropped.
SAFE_STARTUP_PARAMS = frozenset({
    "application_name", "client_encoding", "DateStyle", "TimeZone", "IntervalStyle",
    "extra_float_digits", "lc_monetary", "lc_numeric", "lc_time", "datestyle", "timezone",
})


@dataclass(slots=True)
class Hooks:
    """The points later layers fill in. Defaults: allow everything, mask
    nothing; events are still emitted for the driver to log or record."""

    # Fast, in-process decision (cache). None means "ask the policy service":
    # the session emits NeedDecision and waits for on_decision.
    decide_cached: Callable[[StatementRequest], Decision | None] = _allow_all
    masker_factory: ResultMaskerFactory | None = None
    # (database, function OID) -> quoted "schema"."name" for a FunctionCall,
    # None when unknown (then the call is decided as opaque, and refused).
    # Called once with OID 0 when a session is ready, so that the catalog
    # behind it starts loading before the session's first FunctionCall.
    function_name: Callable[[str, int], str | None] | None = None
    # (database, function OID) -> its result type OID: a FunctionCall's
    # result is masked by that type.
    function_result_type: Callable[[str, int], int | None] | None = None


@dataclass(slots=True)
class _Statement:
    """One statement the client sent, from decision to completion."""

    seq: int
    sql: str
    path: str
    decision: Decision
    rows: int = 0
    tags: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    masked: int = 0
    # Held at Parse only because its parameters were unknown: prepared, and
    # each Bind is decided with the actual values.
    decide_at_bind: bool = False


@dataclass(slots=True)
class _Portal:
    statement: str
    # Bind's result-format codes; None for a cursor from DECLARE, whose
    # formats are those of the server's description of it.
    result_formats: tuple[int, ...] | None
    fields: tuple[pg.Field, ...] | None = None
    stmt: _Statement | None = None  # the Bind-time decision, when there was one
    described: bool = False  # the client sent Describe for this binding


# A Bind's portal name, the binding it replaced (None: none) and its own.
_Rebound = tuple[str, "_Portal | None", "_Portal"]


@dataclass(slots=True)
class _Expect:
    """A response the server owes for a client message, in wire order."""

    kind: str  # Q P B D C S F E
    stmt: _Statement | None = None
    portal: str = ""
    describe_target: tuple[str, str] | None = None  # ('S'|'P', name) for Describe
    # The binding a Describe P or an Execute refers to, taken when the client
    # message is passed on (a later Bind of the same name is another binding).
    binding: _Portal | None = None
    rows: int = 0
    size: int = 0  # bytes of DataRow and CopyData messages so far
    limit: int = sys.maxsize  # past it the session ends (see Session._limit_of)
    tags: list[str] | None = None
    error: tuple[str, str] | None = None
    maskers: list[ResultMasker] | None = None
    internal: bool = False  # the tap's own request: its answer is not passed on
    # A Parse's statement name and decision, forgotten if the server refuses it.
    parsed: tuple[str, _Statement] | None = None
    rebound: _Rebound | None = None  # a Bind's portal, put back if the server refuses it
    function: tuple[int, int] | None = None  # a FunctionCall's function OID and result format


class Session:
    """One client connection's protocol state, both directions."""

    def __init__(
        self,
        config: SessionConfig,
        hooks: Hooks | None = None,
        cancel_registry: CancelRegistry | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.cancels = cancel_registry if cancel_registry is not None else CancelRegistry()
        self.phase = _STARTUP
        self.client_tls: TLSEndpoint | None = None
        self.upstream_tls: TLSEndpoint | None = None
        self._startup_reader = pg.StartupReader()
        self._client_reader = pg.MessageReader(config.max_message_size)
        self._server_reader = pg.MessageReader(config.max_message_size)
        self._startup_packet: bytes = b""
        self.params: dict[str, str] = {}
        self.protocol_version = pg.PROTOCOL_3_0
        self.transaction_status = "I"
        self.server_params: dict[str, str] = {}
        self.end_reason = ""
        self._cancel_key: tuple[int, bytes] | None = None
        self.identity = config.identity
        self.upstream_role = ""
        self._upstream_auth: UpstreamAuthenticator | None = None
        # Query-phase state.
        self._seq = 0
        self._ticket = 0
        self._waiting: tuple[int, pg.Message, StatementRequest] | None = None
        self._held: deque[pg.Message] = deque()
        # Client messages passed on while handling one chunk, sent upstream
        # as one write (and one TLS record) when the chunk is done.
        self._fwd: list[bytes] = []
        self._expect: deque[_Expect] = deque()
        self._markers: dict[str, _Statement] = {}
        self._statements: dict[str, tuple[str, _Statement, tuple[pg.Field, ...] | None]] = {}
        self._param_types: dict[str, tuple[int, ...]] = {}
        self._portals: dict[str, _Portal] = {}
        self._simple_fields: tuple[pg.Field, ...] | None = None
        self._masker: ResultMasker | None = None
        self._copy_out = False
        self._inspect_server = False  # slow path needed for server messages
        self._close_after = False  # the server sent a FATAL: close once it is passed on
        self.last_activity = 0.0  # driver's clock, set by touch()
        # PostgreSQL 15 does not report search_path changes, yet the analysis
        # resolves unqualified names with it: follow successful SETs (a change
        # inside a transaction block counts once the block commits).
        self.search_path = '"$user", public'
        self._txn_search_path: str | None = None
        # Set by the driver: abandon a pending decision (a hold) on client cancel.
        self.on_cancel_requested: Callable[[], None] | None = None
        self._late_events: list[Action] = []  # completion events found while framing
        self._result_limit = config.max_result_bytes or sys.maxsize
        self._over_limit: _Expect | None = None  # the execution whose result passed it
        self._cut = 0  # where in a pass-through block the message past the limit starts

    # ------------------------------------------------------------------
    # Public API used by the drivers

    def on_read(self, data: bytes) -> list[Action]:
        """Bytes from the client."""
        out: list[Action] = []
        if self.phase in (_CLOSED, _CANCEL) or not data:
            return out
        try:
            if self.client_tls is not None:
                data = self.client_tls.receive(data)
                self._flush_client_tls(out)
                if not data:
                    return out
            if self.phase == _STARTUP:
                self._startup_bytes(data, out)
            elif self.phase == _UPSTREAM_TLS:
                raise pg.ProtocolError("unexpected data before authentication")
            elif self.phase in (_AUTH, _READY, _CLIENT_AUTH, _CHECKING):
                for msg in self._client_reader.feed(data):
                    self._client_message(msg, out)
                    if self.phase == _CLOSED:
                        break
                self._flush_forward(out)
        except (pg.ProtocolError, TLSError) as exc:
            self._fatal(out, pg.PROTOCOL_VIOLATION, str(exc), reason="protocol_error")
        return out

    def on_write(self, data: bytes) -> list[Action]:
        """Bytes from the server."""
        out: list[Action] = []
        if self.phase in (_CLOSED, _CANCEL) or not data:
            return out
        try:
            if self.phase == _UPSTREAM_TLS and self.upstream_tls is None:
                self._upstream_ssl_answer(data, out)
                return out
            if self.upstream_tls is not None:
                was_done = self.upstream_tls.handshake_done
                data = self.upstream_tls.receive(data)
                self._flush_upstream_tls(out)
                if not was_done and self.upstream_tls.handshake_done:
                    self._send_upstream(out, self._startup_packet)
                if not data:
                    return out
            self._server_bytes(data, out)
        except TLSError as exc:
            self._fatal(out, pg.CONNECTION_FAILURE,
                        f"could not talk to the database securely: {exc}",
                        reason="upstream_tls_error")
        except pg.ProtocolError as exc:
            self._fatal(out, pg.PROTOCOL_VIOLATION,
                        f"the database sent an invalid message: {exc}",
                        reason="upstream_protocol_error")
        return out

    def on_decision(self, ticket: int, decision: Decision) -> list[Action]:
        """The answer to a NeedDecision. Releases messages held behind it."""
        out: list[Action] = []
        if self._waiting is None or self._waiting[0] != ticket or self.phase == _CLOSED:
            return out
        _, msg, request = self._waiting
        self._waiting = None
        sql = request.sql
        if msg.type == b"F":
            # The runtime may have named the function meanwhile (it waits for
            # the catalog): record the call as the policy saw it.
            sql = self._function_call_sql(pg.decode_function_call(msg.body))
        self._apply(msg, sql, request.path, decision, out)
        while self._held and self._waiting is None and self.phase != _CLOSED:
            self._client_message(self._held.popleft(), out)
        self._flush_forward(out)
        return out

    def on_auth(self, ticket: int, result: AuthResult) -> list[Action]:
        """The identity service's answer to NeedAuth."""
        out: list[Action] = []
        if self.phase != _CHECKING or ticket != self._ticket:
            return out
        user = self.params.get("user", "")
        if not result.ok or result.login is None:
            self._event(out, "auth", outcome="failure", method="token", user=user,
                        database=self.params.get("database", ""), reason=result.reason,
                        sqlstate=result.sqlstate, decision_id=result.decision_id)
            message = ("authentication failed" if result.sqlstate == pg.INVALID_PASSWORD
                       else "this identity may not connect to this database")
            self._fatal(out, result.sqlstate, f"pgwarden: {message} for user \"{user}\"",
                        reason="auth_failed")
            return out
        self.identity = result.identity
        login = result.login
        self.upstream_role = login.role
        self._upstream_auth = UpstreamAuthenticator(login)
        self._event(out, "auth", outcome="success", method="token", user=user,
                    database=self.params.get("database", ""), upstream_role=login.role,
                    subject=result.identity.subject, groups=list(result.identity.groups),
                    issuer=result.identity.issuer, kind=result.identity.kind,
                    actor=result.identity.actor, decision_id=result.decision_id)
        params = {"user": login.role, "database": self.params.get("database", login.role)}
        params.update({k: v for k, v in self.params.items() if k in SAFE_STARTUP_PARAMS})
        self._startup_packet = pg.encode_startup(params, self.protocol_version)
        self.phase = _AUTH
        upstream = self.config.upstream_tls
        if login.cert_file:
            upstream = replace(upstream, cert_file=login.cert_file, key_file=login.key_file)
            self.config.upstream_tls = upstream
        if upstream.context() is not None:
            self.phase = _UPSTREAM_TLS
            out.append(SendUpstream(pg.StartupPacket(pg.SSL_REQUEST, b"").encode()))
        else:
            self._send_upstream(out, self._startup_packet)
        return out

    def on_upstream_closed(self) -> list[Action]:
        out: list[Action] = []
        if self.phase == _CANCEL:
            self.phase = _CLOSED
            self._close_tls(out)
            out.append(Close("cancel_request"))
        elif self.phase != _CLOSED:
            self.end_reason = self.end_reason or "server_closed"
            self._finish(out)
        return out

    def on_client_closed(self) -> list[Action]:
        out: list[Action] = []
        if self.phase != _CLOSED:
            self.end_reason = self.end_reason or "client_disconnect"
            self._finish(out)
        return out

    def terminate(self, sqlstate: str, message: str, reason: str) -> list[Action]:
        """End the session from outside (idle timeout, token expiry, shutdown)."""
        out: list[Action] = []
        if self.phase != _CLOSED:
            self._fatal(out, sqlstate, message, reason=reason)
        return out

    def touch(self, now: float) -> None:
        """The client did something (the driver calls this with its clock)."""
        self.last_activity = now

    def tick(self, wall: float, monotonic: float) -> list[Action]:
        """End the session when its token expired or it sat idle too long.

        The core has no clock: drivers call this periodically (inline) or
        before handling each chunk (ext_proc). ``wall`` (epoch seconds) is
        compared with the token's ``exp``; ``monotonic`` with the last activity.
        """
        now = monotonic
        if self.phase in (_CLOSED, _CANCEL):
            return []
        exp = self.identity.expires_at
        if exp is not None and wall >= exp and self.phase == _READY:
            return self.terminate(pg.INVALID_AUTHORIZATION,
                                  "pgwarden: the session's token expired; reconnect with a fresh token",
                                  reason="token_expired")
        idle = self.config.idle_timeout
        if (idle is not None and self.last_activity and now - self.last_activity >= idle
                and self._waiting is None and self.transaction_status != "A"):
            return self.terminate(pg.IDLE_SESSION_TIMEOUT,
                                  f"pgwarden: session ended after {idle:.0f} s without activity "
                                  "(PCI DSS 8.2.8); reconnect to continue", reason="idle_timeout")
        return []

    @property
    def busy(self) -> bool:
        """A statement is in flight (sent and not answered, or being decided)."""
        return bool(self._expect) or self._waiting is not None

    @property
    def waiting_for_decision(self) -> bool:
        return self._waiting is not None

    @property
    def _database(self) -> str:
        return self.params.get("database") or self.params.get("user", "")

    def info(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.config.session_id,
            database=self.params.get("database", self.params.get("user", "")),
            user=self.params.get("user", ""),
            upstream_role=self.upstream_role or self.params.get("user", ""),
            client_addr=self.config.client_addr,
            application_name=self.server_params.get(
                "application_name", self.params.get("application_name", "")),
            tls=self.client_tls is not None,
            search_path=self._txn_search_path or self.search_path,
            transaction_status=self.transaction_status,
        )

    # ------------------------------------------------------------------
    # Output helpers

    def _send_upstream(self, out: list[Action], data: bytes) -> None:
        if self._fwd:  # keep the order of what was passed on before
            self._fwd.append(data)
            data = b"".join(self._fwd)
            self._fwd.clear()
        if self.upstream_tls is not None:
            self.upstream_tls.send(data)
            self._flush_upstream_tls(out)
        else:
            out.append(SendUpstream(data))

    def _send_downstream(self, out: list[Action], data: bytes) -> None:
        if self.client_tls is not None:
            self.client_tls.send(data)
            self._flush_client_tls(out)
        else:
            out.append(SendDownstream(data))

    def _flush_client_tls(self, out: list[Action]) -> None:
        assert self.client_tls is not None
        cipher = self.client_tls.outgoing()
        if cipher:
            out.append(SendDownstream(cipher))

    def _flush_upstream_tls(self, out: list[Action]) -> None:
        assert self.upstream_tls is not None
        cipher = self.upstream_tls.outgoing()
        if cipher:
            out.append(SendUpstream(cipher))

    def _event(self, out: list[Action], event_type: str, /, **fields: Any) -> None:
        fields["type"] = event_type
        fields["session_id"] = self.config.session_id
        out.append(Event(fields))

    def _fatal(self, out: list[Action], sqlstate: str, message: str, *, reason: str) -> None:
        """Tell the client why (FATAL), record it, close both sides."""
        self.end_reason = reason
        try:
            self._send_downstream(out, pg.error_response(sqlstate, message, severity="FATAL"))
        except TLSError:
            pass
        self._event(out, "protocol_error" if sqlstate == pg.PROTOCOL_VIOLATION else "fatal",
                    sqlstate=sqlstate, message=message, reason=reason)
        self._finish(out)

    def _finish(self, out: list[Action]) -> None:
        if self.phase == _CLOSED:
            return
        self._flush_forward(out)  # what was passed on before the end still goes
        started = self.phase == _READY
        self.phase = _CLOSED
        if self._cancel_key is not None:
            self.cancels.unregister(*self._cancel_key)
            self._cancel_key = None
        if started:
            self._event(out, "session_end", reason=self.end_reason or "closed")
        self._close_tls(out)
        out.append(Close(self.end_reason or "closed"))

    def _close_tls(self, out: list[Action]) -> None:
        if self.client_tls is not None:
            notify = self.client_tls.close()
            if notify:
                out.append(SendDownstream(notify))

    # ------------------------------------------------------------------
    # Startup phase

    def _startup_bytes(self, data: bytes, out: list[Action]) -> None:
        if (self.client_tls is None and not self._startup_reader_has_data()
                and data[:1] == b"\x16"):
            # Direct TLS (PostgreSQL 17 sslnegotiation=direct): a ClientHello
            # instead of an SSLRequest.
            if self.config.tls_context is None:
                raise pg.ProtocolError("direct TLS is not enabled on this gateway")
            self.client_tls = TLSEndpoint(self.config.tls_context, server_side=True)
            plain = self.client_tls.receive(data)
            self._flush_client_tls(out)
            if plain:
                self._startup_bytes(plain, out)
            return
        packet = self._startup_reader.feed(data)
        if packet is None:
            return
        code = packet.code
        if code == pg.SSL_REQUEST:
            self._ssl_request(packet, out)
        elif code == pg.GSSENC_REQUEST:
            if self._startup_reader_has_data():
                raise pg.ProtocolError("unexpected data after GSSENCRequest")
            self._send_downstream(out, _SSL_ANSWER_NO)
        elif code == pg.CANCEL_REQUEST:
            self._cancel_request(packet, out)
        elif code >> 16 == 3:
            self._startup_message(packet, out)
        else:
            raise pg.ProtocolError(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                "the gateway speaks protocol 3")

    def _startup_reader_has_data(self) -> bool:
        return bool(self._startup_reader._buf)

    def _ssl_request(self, packet: pg.StartupPacket, out: list[Action]) -> None:
        if self._startup_reader_has_data():
            # Bytes sent after SSLRequest but before the answer would be read
            # as if they had been encrypted (the CVE-2021-23214 class of bug).
            raise pg.ProtocolError("unexpected data after SSLRequest")
        if self.client_tls is not None:
            raise pg.ProtocolError("SSLRequest received twice")
        if self.config.tls_context is None:
            self._send_downstream(out, _SSL_ANSWER_NO)
            return
        out.append(SendDownstream(_SSL_ANSWER_YES))
        self.client_tls = TLSEndpoint(self.config.tls_context, server_side=True)

    def _cancel_request(self, packet: pg.StartupPacket, out: list[Action]) -> None:
        pid, key = pg.decode_cancel(packet.body)
        target = self.cancels.cancel(pid, key)
        self.end_reason = "cancel_request"
        if target is not None:
            self._send_upstream(out, pg.encode_cancel(*target))
        self._event(out, "cancel_request", matched=target is not None)
        if target is None:
            self.phase = _CLOSED
            self._close_tls(out)
            out.append(Close("cancel_request"))
        else:
            # PostgreSQL closes a cancel connection once it has read the
            # request; closing first could drop the request in flight.
            self.phase = _CANCEL

    def _startup_message(self, packet: pg.StartupPacket, out: list[Action]) -> None:
        if self._startup_reader_has_data():
            raise pg.ProtocolError("unexpected data after the startup message")
        if self.config.require_client_tls and self.client_tls is None:
            self._fatal(out, pg.INVALID_AUTHORIZATION,
                        "this gateway only accepts TLS connections: connect with sslmode=require",
                        reason="tls_required")
            return
        self.params = pg.startup_params(packet.body)
        if "user" not in self.params:
            self._fatal(out, pg.INVALID_AUTHORIZATION, "no PostgreSQL user name specified",
                        reason="no_user")
            return
        self.protocol_version = packet.code
        if self.params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            self._fatal(out, pg.INSUFFICIENT_PRIVILEGE,
                        "replication connections are not allowed through the gateway",
                        reason="replication_refused")
            return
        if self.config.auth_mode == "token":
            if self.client_tls is None and not self.config.allow_plaintext_tokens:
                self._fatal(out, pg.INVALID_AUTHORIZATION,
                            "pgwarden accepts tokens only over TLS: connect with sslmode=require",
                            reason="tls_required")
                return
            self.phase = _CLIENT_AUTH
            self._send_downstream(out, pg.AUTH_CLEARTEXT)
            return
        self._startup_packet = packet.encode()
        self.phase = _AUTH
        ctx = self.config.upstream_tls.context()
        if ctx is not None:
            self.phase = _UPSTREAM_TLS
            out.append(SendUpstream(pg.StartupPacket(pg.SSL_REQUEST, b"").encode()))
            return
        self._send_upstream(out, self._startup_packet)

    def _upstream_ssl_answer(self, data: bytes, out: list[Action]) -> None:
        answer, rest = data[:1], data[1:]
        if rest:
            raise pg.ProtocolError("the database sent data after its SSL answer")
        if answer == b"S":
            ctx = self.config.upstream_tls.context()
            assert ctx is not None
            host = self.config.upstream_tls.server_hostname
            self.upstream_tls = TLSEndpoint(ctx, server_side=False, server_hostname=host)
            self.phase = _AUTH
            hello = self.upstream_tls.start()
            out.append(SendUpstream(hello))
            return
        if answer == b"N":
            self._fatal(out, pg.CONNECTION_FAILURE,
                        "the database refused TLS, and the gateway requires it upstream",
                        reason="upstream_tls_refused")
            return
        raise pg.ProtocolError("unexpected answer to SSLRequest")

    # ------------------------------------------------------------------
    # Client messages after startup

    def _client_message(self, msg: pg.Message, out: list[Action]) -> None:
        if self._waiting is not None:
            self._held.append(msg)
            return
        t = msg.type
        if self.phase == _CLIENT_AUTH:
            if t != b"p":
                raise pg.ProtocolError("expected a password message carrying the token")
            token = msg.body[:-1].decode("utf-8", "replace") if msg.body.endswith(b"\0") else ""
            self._ticket += 1
            self.phase = _CHECKING
            out.append(NeedAuth(self._ticket, token, self.params.get("user", ""),
                                self.params.get("database", ""), self.config.client_addr,
                                self.client_tls is not None))
            return
        if self.phase == _CHECKING:
            raise pg.ProtocolError("unexpected message while the token is being checked")
        if self.phase == _AUTH:
            if self._upstream_auth is not None:
                raise pg.ProtocolError("unexpected message during the gateway's login")
            if t != b"p":
                raise pg.ProtocolError("expected a password or SASL message during authentication")
            self._send_upstream(out, msg.encode())
            return
        if t == b"Q":
            self._decide(msg, pg.query_text(msg.body), "simple", out)
        elif t == b"P":
            parse = pg.decode_parse(msg.body)
            self._decide(msg, parse.query, "parse", out, parse.name)
        elif t == b"B":
            bind = pg.decode_bind(msg.body)
            known = self._statements.get(bind.statement)
            if known is not None and known[1].decide_at_bind:
                self._decide(msg, known[0], "parse", out, bind.statement,
                             _param_texts(bind, self._param_types.get(bind.statement, ())))
                return
            if known is None and bind.statement and self.hooks.decide_cached is not _allow_all:
                # A named statement this session never Parsed: SQL-level
                # PREPARE shares the namespace, so this may run a text
                # prepared in an earlier message with values the policy never
                # saw. It is decided as the SQL EXECUTE it amounts to. (The
                # unnamed statement only ever comes from Parse, and a refused
                # Parse drops it in the server too, so an unknown unnamed one
                # does not exist there: the server refuses that Bind itself.)
                self._decide(msg, pg.execute_sql(bind.statement, len(bind.params)), "parse",
                             out, bind.statement, _param_texts(bind))
                return
            self._forward(msg, _Expect("B", rebound=self._bind(bind)), out)
        elif t == b"E":
            portal, _ = pg.cstring(msg.body, 0)
            p = self._portals.get(portal)
            if p is None and portal and self.hooks.decide_cached is not _allow_all:
                # A named portal this session never Bound: a cursor from SQL
                # DECLARE (the same namespace). Decided as the FETCH it is.
                # (The unnamed portal only ever comes from Bind.)
                self._decide(msg, pg.fetch_sql(portal, pg.execute_max_rows(msg.body)), "parse",
                             out, portal)
                return
            known = self._statements.get(p.statement) if p is not None else None
            stmt = p.stmt if p is not None and p.stmt is not None else (
                known[1] if known is not None else None)
            self._execute(msg, portal, p, stmt, out)
        elif t == b"D":
            kind = msg.body[:1].decode("latin-1")
            name, _ = pg.cstring(msg.body, 1)
            binding = self._portals.get(name) if kind == "P" else None
            if binding is not None:
                binding.described = True
            self._forward(msg, _Expect("D", describe_target=(kind, name), binding=binding), out)
        elif t == b"C":
            target = msg.body[:1]
            name, _ = pg.cstring(msg.body, 1)
            if target == b"S":
                self._statements.pop(name, None)
            elif target == b"P":
                self._portals.pop(name, None)
            self._forward(msg, _Expect("C"), out)
        elif t == b"S":
            self._forward(msg, _Expect("S"), out)
        elif t in (b"H", b"d", b"c", b"f"):
            self._fwd.append(msg.encode())
        elif t == b"F":
            call = pg.decode_function_call(msg.body)
            self._decide(msg, self._function_call_sql(call), "function_call", out,
                         function=(call.oid, len(call.args)))
        elif t == b"X":
            self.end_reason = "client_terminate"
            self._send_upstream(out, msg.encode())
            self._finish(out)
        else:
            raise pg.ProtocolError(f"invalid frontend message type {t!r}")

    def _execute(self, msg: pg.Message, portal: str, p: _Portal | None,
                 stmt: _Statement | None, out: list[Action]) -> None:
        if self.hooks.masker_factory is not None:
            if p is None:
                # A portal the tap never saw bound (a cursor from DECLARE):
                # this execution's own binding, to hold the shape the
                # Describe below brings (the server's format codes: a
                # BINARY cursor).
                p = _Portal("", None, None, stmt)
            if p.fields is None and not p.described:
                # Rows of a portal whose shape the tap never saw (a statement
                # executed without Describe, a cursor from DECLARE): ask the
                # server first, so binary values are masked by type, never
                # passed unread. (When the client described this binding
                # itself, as libpq does before every Execute, that answer
                # arrives before the rows.)
                describe = pg.Message(b"D", b"P" + portal.encode() + b"\0").encode()
                self._expect.append(_Expect("D", describe_target=("P", portal), internal=True,
                                            binding=p))
                self._fwd.append(describe)
        self._forward(msg, _Expect("E", stmt=stmt, portal=portal, binding=p,
                                   limit=self._limit_of(stmt)), out)

    def _function_call_sql(self, call: pg.FunctionCall) -> str:
        """What a FunctionCall does, as SQL the policy can analyse: the
        function named by its OID with one parameter per argument. A
        function the catalog does not know (yet) stays opaque: the runtime
        then waits for the catalog before asking the policy."""
        namer = self.hooks.function_name
        name = namer(self._database, call.oid) if namer is not None else None
        return pg.function_call_sql(call.oid, len(call.args), name)

    def _request(self, sql: str, path: str, name: str = "",
                 params: tuple[str | None, ...] | None = None,
                 function: tuple[int, int] | None = None) -> StatementRequest:
        return StatementRequest(
            identity=self.identity,
            session=self.info(),
            sql=sql,
            path=path,
            statement_name=name,
            params=params,
            function=function,
        )

    def _decide(self, msg: pg.Message, sql: str, path: str, out: list[Action], name: str = "",
                params: tuple[str | None, ...] | None = None,
                function: tuple[int, int] | None = None) -> None:
        decide = self.hooks.decide_cached
        if decide is _allow_all:
            # The built-in allow-all hook reads no request: none is built.
            self._apply(msg, sql, path, ALLOW_ALL, out)
            return
        request = self._request(sql, path, name, params, function)
        decision = decide(request)
        if decision is None:
            self._flush_forward(out)  # the server works on those while policyd decides
            self._ticket += 1
            self._waiting = (self._ticket, msg, request)
            out.append(NeedDecision(self._ticket, request))
            return
        self._apply(msg, sql, path, decision, out)

    def _apply(self, msg: pg.Message, sql: str, path: str, decision: Decision,
               out: list[Action]) -> None:
        self._seq += 1
        stmt = _Statement(self._seq, sql, path, decision)
        deferred = (msg.type == b"P" and decision.verdict is Verdict.HOLD
                    and bool(decision.analysis.get("params_used")))
        if not deferred:  # a deferred Parse is recorded with each Bind's decision
            self._event(out, "statement", seq=stmt.seq, sql=sql, path=path,
                        verdict=decision.verdict.value, reasons=list(decision.reasons),
                        decision_id=decision.decision_id,
                        policy_revision=decision.policy_revision,
                        approval_id=decision.approval_id)
        t = msg.type
        if deferred:
            stmt.decide_at_bind = True
            parse = pg.decode_parse(msg.body)
            parsed = self._parsed(parse, stmt)
            if parsed is not None:
                self._param_types[parse.name] = parse.param_types
            self._forward(msg, _Expect("P", parsed=parsed), out)
            return
        if decision.verdict is not Verdict.ALLOW:
            self._refuse(msg, stmt, out)
            return
        names = decision.analysis.get("sql_names")
        if names:
            self._forget_names(names)
        if t == b"B":
            bind = pg.decode_bind(msg.body)
            self._forward(msg, _Expect("B", rebound=self._bind(bind, stmt)), out)
            return
        if t == b"Q":
            self._forward(msg, _Expect("Q", stmt=stmt, limit=self._limit_of(stmt)), out)
        elif t == b"P":
            parse = pg.decode_parse(msg.body)
            self._forward(msg, _Expect("P", stmt=stmt, parsed=self._parsed(parse, stmt)), out)
        elif t == b"F":
            call = pg.decode_function_call(msg.body)
            self._forward(msg, _Expect("F", stmt=stmt, limit=self._limit_of(stmt),
                                       function=(call.oid, call.result_format)), out)
        elif t == b"E":
            portal, _ = pg.cstring(msg.body, 0)
            self._execute(msg, portal, None, stmt, out)

    def _parsed(self, parse: pg.Parse, stmt: _Statement) -> tuple[str, _Statement] | None:
        """Record what a Parse the tap passes on prepares, as the client
        sees it (a Bind in the same batch refers to it); returns the name to
        forget again if the server refuses the Parse. A named statement the
        tap already knows is not replaced: the server refuses a second Parse
        of a name in use (42P05) and keeps the first, so the first's
        decision is the one that must stay."""
        if parse.name and parse.name in self._statements:
            return None
        self._statements[parse.name] = (parse.query, stmt, None)
        return parse.name, stmt

    def _forget_names(self, names: dict[str, list[str]]) -> None:
        """An allowed statement creates or drops SQL-level prepared statements
        or cursors (PREPARE, DEALLOCATE, DECLARE, CLOSE, DISCARD ALL; "*" for
        all). The protocol shares those names, so what the tap knew under
        them no longer holds: a later Bind or Execute of such a name is
        decided afresh. The unnamed statement and portal are protocol-only."""
        for key, table in (("statements", self._statements), ("portals", self._portals)):
            for name in names.get(key, ()):
                gone = [n for n in table if n] if name == "*" else [name]
                for n in gone:
                    table.pop(n, None)
                    if key == "statements":
                        self._param_types.pop(n, None)

    def _refuse(self, msg: pg.Message, stmt: _Statement, out: list[Action]) -> None:
        nonce = secrets.token_hex(8)
        marker = f"pgwarden_refused_{nonce}"
        self._markers[marker] = stmt
        self._inspect_server = True
        if msg.type == b"P":
            parse = pg.decode_parse(msg.body)
            # The server drops the unnamed statement when a Parse of it
            # starts, even one that fails; a named one it keeps.
            if not parse.name:
                self._statements.pop("", None)
            self._send_upstream(out, pg.parse_message(parse.name, marker))
            self._expect.append(_Expect("P", stmt=stmt))
        elif msg.type in (b"B", b"E"):
            # A Bind refused with its values, or an Execute of a cursor: a
            # Parse of the marker under a name of its own takes its place (it
            # fails, so nothing is created), and the server skips the rest of
            # the batch to Sync.
            self._send_upstream(out, pg.parse_message(marker, marker))
            self._expect.append(_Expect("P", stmt=stmt))
            if msg.type == b"B":
                # The client believes in this portal: an Execute of it is
                # known to belong to the refused statement (the server has
                # no such portal and answers that itself).
                bind = pg.decode_bind(msg.body)
                self._portals[bind.portal] = _Portal(bind.statement, bind.result_formats, None,
                                                     stmt)
        else:
            # Query and FunctionCall: one complete cycle ending in ReadyForQuery.
            self._send_upstream(out, pg.simple_query(marker))
            self._expect.append(_Expect("Q", stmt=stmt))

    def _bind(self, bind: pg.Bind, stmt: _Statement | None = None) -> _Rebound:
        """Record the portal a Bind creates, as the client sees it; returns
        what to put back if the server refuses the Bind (a named portal
        still open keeps its first binding there)."""
        known = self._statements.get(bind.statement)
        fields = known[2] if known else None
        portal = _Portal(bind.statement, bind.result_formats,
                         _with_formats(fields, bind.result_formats), stmt)
        previous = self._portals.get(bind.portal)
        self._portals[bind.portal] = portal
        return bind.portal, previous, portal

    def _forward(self, msg: pg.Message, expect: _Expect, out: list[Action]) -> None:
        self._expect.append(expect)
        self._fwd.append(msg.encode())

    def _flush_forward(self, out: list[Action]) -> None:
        if self._fwd:
            data = self._fwd[0] if len(self._fwd) == 1 else b"".join(self._fwd)
            self._fwd.clear()
            self._send_upstream(out, data)

    # ------------------------------------------------------------------
    # Server messages

    def _server_bytes(self, data: bytes, out: list[Action]) -> None:
        pending: list[bytes] = []
        if self.phase == _READY and not self._inspect_server:
            frames, block = self._server_reader.split(data)
            if not frames:
                return
            if self.hooks.masker_factory is None and self._fast_ok(frames, block):
                if self._over_limit is not None:
                    if self._cut:  # the messages before the one past the limit
                        self._send_downstream(out, block[:self._cut])
                    self._result_too_large(out)
                    return
                self._send_downstream(out, block)
                if self._late_events:
                    out.extend(self._late_events)
                    self._late_events.clear()
                return
            self._server_frames(frames, block, pending, out)
        else:
            for m in self._server_reader.feed(data):
                rewritten = self._server_message(m, out)
                if rewritten is not None:
                    pending.append(rewritten)
                if self.phase == _CLOSED or self._close_after or self._over_limit is not None:
                    break
        if self._over_limit is not None:
            if pending:  # what came before the message past the limit
                self._send_downstream(out, b"".join(pending))
            self._result_too_large(out)
            return
        if pending and self.phase != _CLOSED:
            self._send_downstream(out, b"".join(pending))
        if self._late_events:
            out.extend(self._late_events)
            self._late_events.clear()
        if self._close_after and self.phase != _CLOSED:
            # A FATAL from the server ends the session once the client has it.
            self._finish(out)

    def _server_frames(self, frames: list[tuple[int, int, int]], block: bytes,
                       pending: list[bytes], out: list[Action]) -> None:
        """The slow path over framed messages: a run of DataRows of a result
        being masked goes to the masker in one call; every other message is
        handled one by one."""
        i = 0
        n = len(frames)
        while i < n:
            t, s, e = frames[i]
            masker = self._masker
            if t == 0x44 and masker is not None and self._expect:
                j = pg.run_end(frames, i + 1, 0x44)
                head = self._expect[0]
                # the run is contiguous in block; past the limit it all stays behind
                if self._past_limit(head, frames[j - 1][2] - s):
                    return
                head.rows += j - i
                pending.append(masker.data_rows(block, frames, i, j))
                i = j
                continue
            if t in _PASSED_AS_IS:
                # No message is built and re-encoded for these.
                self._passed_on(t, block, s, e)
                pending.append(block[s:e])
            else:
                rewritten = self._server_message(pg.Message(block[s:s + 1], block[s + 5:e]), out)
                if rewritten is not None:
                    pending.append(rewritten)
            if self.phase == _CLOSED or self._close_after or self._over_limit is not None:
                break
            i += 1

    def _fast_ok(self, frames: list[tuple[int, int, int]], block: bytes) -> bool:
        """Pass a block through untouched when it only holds messages the tap
        need not change, and do the bookkeeping those messages imply.

        Checked in two passes so that a block sent to the slow path has not
        been counted already.
        """
        slow = _SLOW_TYPES
        for t, _, _ in frames:
            if t in slow:
                return False
        expect = self._expect
        for t, s, e in frames:
            if t == 0x44 or t == 0x64:  # D DataRow, d CopyData
                if expect:
                    head = expect[0]
                    head.size += e - s
                    if head.size > head.limit:
                        self._over_limit = head
                        self._cut = s
                        return True  # nothing from here on is passed on or counted
                    if t == 0x44:
                        head.rows += 1
            elif t in _PASSED_AS_IS:
                self._passed_on(t, block, s, e)
            elif t == 0x6E or t == 0x54:  # n T (nothing to mask on this path)
                if expect and expect[0].kind in ("PBCD" if t == 0x6E else "D"):
                    expect.popleft()
        return True

    def _passed_on(self, t: int, data: bytes, s: int, e: int) -> None:
        """The bookkeeping of a server message passed on unchanged:
        ``data[s:e]`` is the whole message, of type ``t`` in _PASSED_AS_IS
        (or NoData outside a Describe, which ends its step as 1, 2, 3 do)."""
        expect = self._expect
        if t == 0x43:  # C CommandComplete
            self._complete_command(data[s + 5:e - 1].decode("utf-8", "replace"))
        elif t == 0x5A:  # Z ReadyForQuery
            self._ready(chr(data[s + 5]) if e > s + 5 else "")
        elif t == 0x73 or t == 0x49:  # s PortalSuspended, I EmptyQueryResponse end an Execute
            if expect and expect[0].kind == "E":
                self._end_execute()
        elif expect and expect[0].kind in "PBCD":  # 1 2 3 (n): a step of the batch done
            expect.popleft()

    def _server_message(self, m: pg.Message, out: list[Action]) -> bytes | None:
        """Handle one server message; return the bytes to pass on (or None)."""
        t = m.type
        if self.phase == _AUTH:
            return self._auth_message(m, out)
        if t == b"D":
            head = self._expect[0] if self._expect else None
            if head is not None:
                if self._past_limit(head, len(m.body) + 5):
                    return None
                head.rows += 1
                if self._masker is None and head.kind == "E":
                    portal = (head.binding if head.binding is not None
                              else self._portals.get(head.portal))
                    self._start_masking(head.stmt, portal.fields if portal else None)
            if self._masker is not None:
                return self._masker.data_row(m.body)
            return m.encode()
        if t == b"T":
            fields = pg.decode_row_description(m.body)
            internal = bool(self._expect) and self._expect[0].internal
            self._row_description(fields)
            return None if internal else m.encode()
        if t in _PASSED_AS_IS_BYTES:
            frame = m.encode()
            self._passed_on(frame[0], frame, 0, len(frame))
            return frame
        if t == b"E":
            return self._server_error(m, out)
        if t == b"d":
            if self._expect and self._past_limit(self._expect[0], len(m.body) + 5):
                return None
            if self._masker is not None:
                return self._masker.copy_data(m.body)
        if t in (b"N", b"A", b"d"):
            if self._masker is not None or self.hooks.masker_factory is not None:
                masked = self._mask_async_message(m)
                if masked is not None:
                    return masked
            return m.encode()
        if t == b"n":
            if self._expect and self._expect[0].kind == "D":
                internal = self._expect[0].internal
                self._describe_done(None)
                return None if internal else m.encode()
            frame = m.encode()
            self._passed_on(frame[0], frame, 0, len(frame))
            return frame
        if t == b"K":
            return self._backend_key(m)
        if t == b"S":
            return self._parameter_status(m, out)
        if t == b"H":
            self._copy_out = True
            if self.hooks.masker_factory is not None:
                if self._masker is None:
                    head = self._expect[0] if self._expect else None
                    self._start_masking(head.stmt if head is not None else None, None)
                if self._masker is not None:
                    self._masker.copy_out_started(m.body)
            return m.encode()
        if t == b"c":
            self._copy_out = False
            if self._masker is not None:
                return self._masker.copy_done() + m.encode()
            return m.encode()
        if t == b"V":
            return self._function_result(m)
        return m.encode()

    def _function_result(self, m: pg.Message) -> bytes:
        """A FunctionCallResponse, masked as a one-column row of the
        function's result type (from the catalog) in the format the call
        asked for: a computed value, so the strict rules of derived columns
        apply to it too."""
        factory = self.hooks.masker_factory
        if factory is None:
            return m.encode()
        head = self._expect[0] if self._expect and self._expect[0].kind == "F" else None
        oid, fmt = head.function if head is not None and head.function else (0, 0)
        typer = self.hooks.function_result_type
        result_type = (typer(self._database, oid) if typer is not None and oid else None) or 0
        decision = head.stmt.decision if head is not None and head.stmt is not None else ALLOW_ALL
        field = pg.Field("?column?", 0, 0, result_type, -1, -1, fmt)
        masker = factory(decision, (field,), self._database)
        if masker is None:
            return m.encode()
        if head is not None:
            head.maskers = [*(head.maskers or ()), masker]
        row = masker.data_row(b"\x00\x01" + m.body)
        if row[:1] != b"D":
            return row  # could not be masked: withheld, with an error in its place
        value = row[7:]  # past the DataRow header and its column count
        return b"V" + struct.pack("!i", len(value) + 4) + value

    # -- authentication (passthrough) -------------------------------------

    def _auth_message(self, m: pg.Message, out: list[Action]) -> bytes | None:
        t = m.type
        if self._upstream_auth is not None and t in (b"R", b"E"):
            return self._gateway_login(m, out)
        if t == b"R":
            (code,) = _u32(m.body, 0)
            if code == 10:
                # SCRAM channel binding cannot work through a TLS-terminating
                # gateway: the client would bind to the gateway's certificate.
                mechs = [x for x in pg.sasl_mechanisms(m.body) if not x.endswith("-PLUS")]
                if not mechs:
                    self._fatal(out, pg.INVALID_AUTHORIZATION,
                                "the database offers only channel-bound SCRAM, "
                                "which cannot pass through the gateway", reason="auth_unsupported")
                    return None
                return pg.encode_sasl_mechanisms(mechs)
            if code == 0:
                self._event(out, "auth", outcome="success", method="passthrough",
                            user=self.params.get("user", ""),
                            database=self.params.get("database", ""))
            return m.encode()
        if t == b"K":
            return self._backend_key(m)
        if t == b"v":
            # NegotiateProtocolVersion: the server speaks an older minor
            # version than the client asked for (PostgreSQL < 18 and a 3.2
            # client). Cancel keys must then have the 3.0 length.
            (minor,) = _u32(m.body, 0)
            self.protocol_version = (3 << 16) | minor
            return m.encode()
        if t == b"Z":
            self.phase = _READY
            self._ready(m.body[:1].decode("latin-1"))
            if self.hooks.function_name is not None:
                # Start loading this database's catalog now, not at the
                # session's first FunctionCall (which it would then refuse).
                self.hooks.function_name(self._database, 0)
            info = self.info()
            ident = self.identity
            self._event(out, "session_start", database=info.database, user=info.user,
                        upstream_role=info.upstream_role, subject=ident.subject,
                        groups=list(ident.groups), issuer=ident.issuer, kind=ident.kind,
                        actor=ident.actor, client_addr=info.client_addr, tls=info.tls,
                        application_name=info.application_name, driver=self.config.driver,
                        protocol=f"3.{self.protocol_version & 0xFFFF}")
            return m.encode()
        if t == b"E":
            fields = pg.decode_fields(m.body)
            self._event(out, "auth", outcome="failure", sqlstate=fields.get("C", ""),
                        message=fields.get("M", ""), user=self.params.get("user", ""))
            self.end_reason = "auth_failed"
            self._close_after = True
            return m.encode()
        if t == b"S":
            return self._parameter_status(m, out)
        return m.encode()

    def _gateway_login(self, m: pg.Message, out: list[Action]) -> bytes | None:
        """Token mode: answer the server's authentication with the gateway's
        credentials; the client only ever sees AuthenticationOk."""
        assert self._upstream_auth is not None
        if m.type == b"E":
            fields = pg.decode_fields(m.body)
            self._event(out, "upstream_login_failed", role=self.upstream_role,
                        sqlstate=fields.get("C", ""), message=fields.get("M", ""))
            self._fatal(out, pg.INVALID_AUTHORIZATION,
                        f"pgwarden could not log in to the database as role \"{self.upstream_role}\"; "
                        "the gateway's credentials need attention (reported to the operators)",
                        reason="upstream_login_failed")
            return None
        try:
            answer = self._upstream_auth.answer(m.body)
        except UpstreamAuthError as exc:
            self._event(out, "upstream_login_failed", role=self.upstream_role, message=str(exc))
            self._fatal(out, pg.INVALID_AUTHORIZATION,
                        f"pgwarden could not log in to the database as role \"{self.upstream_role}\"",
                        reason="upstream_login_failed")
            return None
        if answer is not None:
            self._send_upstream(out, answer)
            return None
        if int.from_bytes(m.body[:4], "big") == 0:
            return pg.AUTH_OK
        return None

    def _cancel_requested(self) -> None:
        if self._waiting is not None and self.on_cancel_requested is not None:
            self.on_cancel_requested()

    def _parameter_status(self, m: pg.Message, out: list[Action]) -> bytes | None:
        """Track reported settings; end the session if one would make the
        gateway read SQL differently from PostgreSQL.

        The analysis reads statements as UTF-8 with standard-conforming
        strings. With another client encoding (GBK's 0x5c trail byte) or
        backslash escapes in plain literals, a quote the analysis sees as
        closing a string is not one for PostgreSQL, and what follows it
        would run undecided. Both settings are reported by the server
        whenever they change, however they were changed (SET, set_config,
        a startup parameter, ALTER ROLE ... SET), so this check cannot be
        walked around.
        """
        name, pos = pg.cstring(m.body, 0)
        value, _ = pg.cstring(m.body, pos)
        self.server_params[name] = value
        unsafe = ((name == "client_encoding" and value.upper().replace("-", "") != "UTF8")
                  or (name == "standard_conforming_strings" and value.lower() != "on"))
        if unsafe:
            self._event(out, "unsafe_setting", setting=name, value=value)
            self._fatal(out, "0A000",
                        f"pgwarden: {name} = {value} is not supported through the gateway "
                        "(statements must be read exactly as PostgreSQL reads them); use "
                        f"{'UTF8' if name == 'client_encoding' else 'on'}",
                        reason="protocol_error")
            return None
        return m.encode()

    def _backend_key(self, m: pg.Message) -> bytes:
        """Hand the client a gateway-issued cancel key, never the server's."""
        pid, key = pg.decode_backend_key(m.body)
        if self._cancel_key is not None:
            self.cancels.unregister(*self._cancel_key)
        length = 4 if self.protocol_version == pg.PROTOCOL_3_0 else 32
        gw_pid, gw_key = self.cancels.register(pid, key, key_length=length,
                                               on_cancel=self._cancel_requested)
        self._cancel_key = (gw_pid, gw_key)
        return pg.encode_backend_key(gw_pid, gw_key)

    # -- query bookkeeping ------------------------------------------------

    def _ready(self, status: str) -> None:
        self.transaction_status = status
        expect = self._expect
        # ReadyForQuery ends a simple Query, a FunctionCall or a Sync cycle.
        while expect:
            e = expect.popleft()
            if e.kind in "QSF":
                if e.stmt is not None:
                    self._statement_end(e)
                break
        self._masker = None
        self._simple_fields = None
        self._copy_out = False

    def _complete_command(self, tag: str) -> None:
        expect = self._expect
        if not expect:
            return
        head = expect[0]
        if tag in ("SET", "RESET", "COMMIT", "ROLLBACK") or tag.startswith("DISCARD"):
            self._follow_search_path(tag, head.stmt)
        if head.tags is None:
            head.tags = [tag]
        else:
            head.tags.append(tag)
        if head.kind == "E":
            self._end_execute()
        else:
            self._masker = None

    def _follow_search_path(self, tag: str, stmt: _Statement | None) -> None:
        if tag == "COMMIT":
            if self._txn_search_path is not None:
                self.search_path = self._txn_search_path
            self._txn_search_path = None
            return
        if tag == "ROLLBACK":
            self._txn_search_path = None
            return
        if tag.startswith("DISCARD"):
            self.search_path, self._txn_search_path = '"$user", public', None
            return
        if stmt is None:
            return
        path = stmt.decision.analysis.get("search_path_set")
        if path is None:
            return
        value = ", ".join(f'"{p}"' for p in path) if path else '"$user", public'
        if self.transaction_status == "T":
            self._txn_search_path = value
        else:
            self.search_path = value

    def _limit_of(self, stmt: _Statement | None) -> int:
        """The result limit of one execution: the smaller of the gateway's
        (``tap.max_result_bytes``) and the statement's decision's."""
        policy = stmt.decision.max_result_bytes if stmt is not None else None
        return self._result_limit if policy is None else min(policy, self._result_limit)

    def _past_limit(self, head: _Expect, size: int) -> bool:
        """Count ``size`` bytes of result for the execution at ``head``; True
        once it passed its limit (the pass-through path counts inline, per
        row)."""
        head.size += size
        if head.size > head.limit:
            self._over_limit = head
            return True
        return False

    def _result_too_large(self, out: list[Action]) -> None:
        """An execution's result passed ``max_result_bytes``: the rest is not
        passed on, the statement is recorded as failed with what the client
        got, and the session ends (closing the server connection stops the
        query; there is no way to drop the rest of a result and carry on
        without reading all of it)."""
        e = self._over_limit
        assert e is not None
        if e.limit < self._result_limit:  # the statement's decision set it
            message = (f"pgwarden: the result of this statement passed the limit of {e.limit} "
                       "bytes its policy decision sets (max_result_bytes); the session is ended")
        else:
            message = (f"pgwarden: the result of this statement passed the gateway's limit of "
                       f"{e.limit} bytes (tap.max_result_bytes); the session is ended")
        if e.stmt is not None:
            e.error = (pg.PROGRAM_LIMIT_EXCEEDED, message)
            self._statement_end(e)
        out.extend(self._late_events)
        self._late_events.clear()
        self._fatal(out, pg.PROGRAM_LIMIT_EXCEEDED, message, reason="result_limit")

    def _end_execute(self) -> None:
        e = self._expect.popleft()
        if e.stmt is not None:
            self._statement_end(e)
        self._masker = None

    def _statement_end(self, e: _Expect) -> None:
        """One execution finished: what came back, for the audit record."""
        stmt = e.stmt
        assert stmt is not None
        masked: dict[str, Any] | None = None
        if e.maskers:
            total: dict[str, Any] = {"values": 0, "by_column": {}, "by_rule": {}}
            for m in e.maskers:
                st = m.stats_dict()
                total["values"] += st.get("values", 0)
                for k in ("by_column", "by_rule"):
                    for name, n in st.get(k, {}).items():
                        total[k][name] = total[k].get(name, 0) + n
            masked = total
        fields: dict[str, Any] = {"type": "statement_end", "session_id": self.config.session_id,
                                  "seq": stmt.seq, "rows": e.rows, "tags": e.tags or [],
                                  "path": stmt.path}
        if e.error is not None:
            fields["sqlstate"], fields["error"] = e.error
        if masked is not None:
            fields["masked"] = masked
        self._late_events.append(Event(fields))

    def _row_description(self, fields: tuple[pg.Field, ...]) -> None:
        head = self._expect[0] if self._expect else None
        if head is not None and head.kind == "D":
            self._describe_done(fields)
            return
        # Inside a simple Query: the rows that follow use these fields.
        self._simple_fields = fields
        stmt = head.stmt if head is not None else None
        self._start_masking(stmt, fields)

    def _describe_done(self, fields: tuple[pg.Field, ...] | None) -> None:
        head = self._expect[0]
        target = head.describe_target
        if target is not None:
            kind, name = target
            if kind == "S":
                # Statement describe answers ParameterDescription ('t') first;
                # it is passed through the fast path, then T or n ends it.
                known = self._statements.get(name)
                if known is not None:
                    self._statements[name] = (known[0], known[1], fields)
            elif kind == "P":
                portal = head.binding if head.binding is not None else self._portals.get(name)
                if portal is not None:
                    portal.fields = _with_formats(fields, portal.result_formats)
        self._expect.popleft()

    def _start_masking(self, stmt: _Statement | None,
                       fields: tuple[pg.Field, ...] | None) -> None:
        factory = self.hooks.masker_factory
        # Rows of no statement the tap decided are never passed unread: they
        # get the ambient plan (content detection) at least.
        decision = stmt.decision if stmt is not None else ALLOW_ALL
        if factory is None:
            self._masker = None
            return
        self._masker = factory(decision, fields, self._database)
        head = self._expect[0] if self._expect else None
        if self._masker is not None and head is not None:
            if head.maskers is None:
                head.maskers = [self._masker]
            else:
                head.maskers.append(self._masker)

    def _mask_async_message(self, m: pg.Message) -> bytes | None:
        factory = self.hooks.masker_factory
        if factory is None:
            return None
        masker = self._masker or factory(ALLOW_ALL, (), self._database)
        if masker is None:
            return None
        return masker.other_message(m.type, m.body)

    def _server_error(self, m: pg.Message, out: list[Action]) -> bytes | None:
        fields = pg.decode_fields(m.body)
        text = fields.get("M", "")
        stmt: _Statement | None = None
        if self._markers and "pgwarden_refused_" in text:
            for marker in list(self._markers):
                if marker in text:
                    stmt = self._markers.pop(marker)
                    break
        if not self._markers:
            self._inspect_server = False
        head = self._expect[0] if self._expect else None
        withheld: bytes | None = None
        if (stmt is None and head is not None and head.stmt is not None and head.kind != "P"
                and head.stmt.decision.mask.withhold_errors
                and fields.get("C", "")[:2] not in _TEXT_KEPT_CLASSES):
            # Parse only analyses (no row is read); everything after may
            # fail on a value read from a cardholder column and quote it.
            fields = _withhold_text(fields)
            text = fields["M"]
            withheld = pg.encode_fields(b"E", fields)
        if head is not None and stmt is None:
            head.error = (fields.get("C", ""), text)
        if head is not None and head.kind in "PBDCE":
            # The server skips everything up to Sync after an error in the
            # extended protocol: so do the expectations.
            first = True
            while self._expect and self._expect[0].kind not in "SQF":
                e = self._expect.popleft()
                if first and e.kind == "E" and e.stmt is not None:
                    self._statement_end(e)
                if e.rebound is not None:
                    # That Bind failed or was skipped: the portal is as before.
                    name, previous, bound = e.rebound
                    if self._portals.get(name) is bound:
                        if previous is None:
                            del self._portals[name]
                        else:
                            self._portals[name] = previous
                if e.parsed is not None:
                    # That Parse failed or was skipped: nothing was prepared.
                    name, parsed = e.parsed
                    known = self._statements.get(name)
                    if known is not None and known[1] is parsed:
                        del self._statements[name]
                first = False
        self._masker = None
        if stmt is not None:
            d = stmt.decision
            stmt.error = {"C": d.sqlstate}
            reason = "; ".join(d.reasons) or "no policy allows it"
            self._event(out, "statement_refused", seq=stmt.seq, decision_id=d.decision_id,
                        verdict=d.verdict.value)
            return pg.error_response(
                d.sqlstate,
                f"pgwarden: statement refused by policy: {reason}",
                detail=f"decision {d.decision_id or 'local'}; policy revision "
                       f"{d.policy_revision or 'n/a'}",
                hint=_hint_for(d),
            )
        if head is not None and head.stmt is not None:
            self._event(out, "statement_error", seq=head.stmt.seq, sqlstate=fields.get("C", ""),
                        message=text)
        if fields.get("S") in ("FATAL", "PANIC"):
            self.end_reason = "server_fatal"
            self._close_after = True
        if withheld is not None:
            return withheld
        factory = self.hooks.masker_factory
        if factory is not None:
            masker = factory(ALLOW_ALL, (), self._database)
            if masker is not None:
                masked = masker.other_message(m.type, m.body)
                if masked is not None:
                    return masked
        return m.encode()


# Server message types the fast path never passes blindly: errors (markers,
# expectations), notices and notifications (masking), BackendKeyData (cancel
# keys), NegotiateProtocolVersion, authentication and ParameterStatus
# (settings that change how SQL is read).
_SLOW_TYPES = frozenset(b"ENAKvRS")
# Server messages passed on unchanged after their bookkeeping (_passed_on).
_PASSED_AS_IS = frozenset(b"CZsI123")
_PASSED_AS_IS_BYTES = frozenset(bytes([t]) for t in _PASSED_AS_IS)


# SQLSTATE classes whose server text never quotes a value the statement
# read: connection exception, invalid transaction state, transaction
# rollback, insufficient resources, operator intervention. Their text is
# passed on (content-masked) even when the plan withholds error text.
_TEXT_KEPT_CLASSES = frozenset({"08", "25", "40", "53", "57"})
# Fields of a withheld error that are not server text: severity, SQLSTATE,
# the position in the client's own statement, and catalog names.
_KEPT_FIELDS = frozenset("SVCPstcdn")


def _withhold_text(fields: dict[str, str]) -> dict[str, str]:
    """The error without the server's text (message, detail, hint, context,
    internal query, source location): they may quote a value read from a
    cardholder column, reshaped past any detector (``translate(card_number,
    '0123456789', 'abcdefghij')::int``). The condition name stays."""
    code = fields.get("C", "")
    kept = {k: v for k, v in fields.items() if k in _KEPT_FIELDS}
    kept["M"] = (f"pgwarden: the server's error text was withheld ({_condition(code)}): "
                 "the statement reads cardholder data")
    kept["H"] = ("SQLSTATE and position are the server's; its text can quote values read "
                 "from cardholder columns, so it stays out (the policy's mask.withhold_errors)")
    return kept


@functools.lru_cache(maxsize=256)
def _condition(code: str) -> str:
    """``22P02 invalid_text_representation`` from psycopg's table of
    PostgreSQL's condition names; the bare code if it has none."""
    from psycopg import errors

    try:
        name = errors.lookup(code).__name__
    except KeyError:
        return code or "no SQLSTATE"
    return f"{code} " + re.sub(r"(?<!^)(?=[A-Z])", "_", name.rstrip("_")).lower()


def _hint_for(d: Decision) -> str:
    if d.approval_id or d.sqlstate.startswith("PW"):
        # The approval service's reasons already say how to get it approved
        # or retried; the hint points at them.
        return (f"approval {d.approval_id}: see the reason above for how to have it approved "
                "or to retry" if d.approval_id else "see the reason above")
    if d.verdict is Verdict.HOLD:
        return "this statement needs a human approval"
    return "ask your security team if you need this access; the refusal is recorded"


def _param_texts(bind: pg.Bind, types: tuple[int, ...] = ()) -> tuple[str | None, ...]:
    """Bind values as the policy sees them, in PostgreSQL's text form.

    Binary values of the common scalar types (declared in Parse) are decoded;
    any other binary value is given as hex, which the policy cannot compare
    and this pack treats as unknown (conservatively)."""
    formats = bind.param_formats
    out: list[str | None] = []
    for i, value in enumerate(bind.params):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        if value is None:
            out.append(None)
        elif fmt == 0:
            out.append(value.decode("utf-8", "replace"))
        else:
            out.append(_binary_text(value, types[i] if i < len(types) else 0))
    return tuple(out)


def _binary_text(value: bytes, oid: int) -> str:
    import struct as _struct

    try:
        if oid in (20, 21, 23) and len(value) in (2, 4, 8):
            return str(int.from_bytes(value, "big", signed=True))
        if oid == 700 and len(value) == 4:
            return repr(_struct.unpack("!f", value)[0])
        if oid == 701 and len(value) == 8:
            return repr(_struct.unpack("!d", value)[0])
        if oid == 16 and len(value) == 1:
            return "true" if value[0] else "false"
        if oid in (25, 1043, 1042, 19):
            return value.decode("utf-8", "replace")
        if oid == 1700:
            from maskd.styles import decode_numeric

            decoded = decode_numeric(value)
            # Only whole numbers: dropping a fraction could understate a value
            # the policy compares (a fraction stays "unknown", conservatively).
            if decoded is not None and decoded[2] == 0:
                whole, negative, _scale = decoded
                return f"{'-' if negative else ''}{whole}"
    except (ValueError, UnicodeDecodeError):
        pass
    return "\\x" + value.hex()


def _u32(body: bytes, pos: int) -> tuple[int]:
    if len(body) < pos + 4:
        raise pg.ProtocolError("message truncated")
    return (int.from_bytes(body[pos:pos + 4], "big"),)


def _with_formats(fields: tuple[pg.Field, ...] | None,
                  formats: tuple[int, ...] | None) -> tuple[pg.Field, ...] | None:
    """Apply Bind's result-format codes to a statement's RowDescription."""
    if fields is None or formats is None:
        return fields
    if len(formats) <= 1:
        fmt = formats[0] if formats else 0
        if all(f.format == fmt for f in fields):
            return fields  # the common case (a re-executed statement): nothing to copy
        return tuple(replace(f, format=fmt) for f in fields)
    return tuple(replace(f, format=formats[i] if i < len(formats) else 0)
                 for i, f in enumerate(fields))
