"""Inline driver: an asyncio (uvloop) TCP listener that Envoy's tcp_proxy
forwards to. It owns both sockets of a session and only moves bytes between
them and the sans-IO :class:`~tap.session.Session`.

Back-pressure is end to end: when the client reads slowly, the client
transport's write buffer fills, asyncio calls ``pause_writing`` and the
driver stops reading from PostgreSQL, so a large result never accumulates in
the tap (and the other way round for COPY FROM).

When the gateway ends a session (FATAL: protocol violation, shutdown, token
expiry, ...) the client may already have more bytes on the way. Closing a
socket with unread bytes makes the kernel send a reset, and a reset can
overtake the FATAL: Envoy, seeing its upstream reset, drops what it has not
yet written to the client. So the client socket is closed in order: the
FATAL is flushed, the write side shut down (FIN), what the client still
sends is read and dropped, and the socket closes when the client closes its
side, or after ``LINGER_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import cast

from pgwarden import metrics
from tap.actions import Action, Close, Event, NeedAuth, NeedDecision, SendDownstream, SendUpstream
from tap.cancel import CancelRegistry
from tap.drivers import SHUTDOWN
from tap.protocol import SYSTEM_ERROR as AUDIT_UNAVAILABLE
from tap.runtime import Runtime, cancelled_decision
from tap.session import Session, SessionConfig

LINGER_SECONDS = 2.0  # how long a closed session's client socket waits for the client's FIN


@dataclass(slots=True)
class InlineSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 6543
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 5432
    connect_timeout: float = 10.0
    drain_seconds: float = 10.0
    sessions: set[ClientSide] = field(default_factory=set)
    lingering: set[ClientSide] = field(default_factory=set)  # ended, client socket closing


class UpstreamSide(asyncio.Protocol):
    __slots__ = ("client", "transport")

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.run(self.client.session.on_write(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client.waiting:
            self.client.transport.resume_reading()


class ClientSide(asyncio.Protocol):
    """One client connection and the upstream connection it drives."""

    def __init__(self, settings: InlineSettings, runtime: Runtime,
                 cancels: CancelRegistry) -> None:
        self.settings = settings
        self.runtime = runtime
        self.cancels = cancels
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.session: Session = None  # type: ignore[assignment]
        self._early: list[bytes] = []  # client bytes before the upstream is up
        self._upstream_ready = False
        self._closed = False
        self.waiting = False
        self._decision: asyncio.Task[None] | None = None
        self._cancel_reason = False
        self._held = False
        self._linger: asyncio.TimerHandle | None = None

    # -- client socket ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without
        # inheriting from asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        config = SessionConfig(session_id=str(uuid.uuid4()), client_addr=addr, driver="inline",
                               **self.runtime.session_options())
        self.session = Session(config, self.runtime.hooks(), self.cancels)
        self.session.touch(time.monotonic())
        self.session.on_cancel_requested = self.cancel_hold
        self.settings.sessions.add(self)
        self.runtime.session_opened(self.session)
        asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamSide(self), self.settings.upstream_host,
                                       self.settings.upstream_port),
                self.settings.connect_timeout)
        except (OSError, TimeoutError) as exc:
            metrics.UPSTREAM_CONNECT_ERRORS.labels(
                reason="timeout" if isinstance(exc, TimeoutError) else "refused").inc()
            self.runtime.log.warning("upstream_connect_failed", session_id=self.session.config.session_id,
                                     error=exc.__class__.__name__)
            self.run(self.session.terminate(
                "08006", "the gateway could not reach the database; try again later",
                reason="upstream_unreachable"))
            return
        if self._closed:
            if proto.transport is not None:
                proto.transport.close()
            return
        self.upstream = proto
        self._upstream_ready = True
        early, self._early = self._early, []
        for chunk in early:
            self.run(self.session.on_read(chunk))

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # the session has ended: what the client still sends is dropped
        self.session.touch(time.monotonic())
        if not self._upstream_ready:
            self._early.append(data)
            return
        self.run(self.session.on_read(data))

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self.run(self.session.on_client_closed())
        self._close_all()
        self.transport = None
        self.settings.lingering.discard(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def upstream_lost(self) -> None:
        if not self._closed:
            self.run(self.session.on_upstream_closed())
        self._close_all()

    # -- actions --------------------------------------------------------------

    def run(self, actions: list[Action]) -> None:
        events: list[dict[str, object]] = []
        for action in actions:
            if isinstance(action, Event):
                events.append(action.record)
            elif isinstance(action, SendUpstream):
                if events:
                    if not self.runtime.record(events):
                        # The statement cannot be recorded: it is not sent.
                        self.run(self.session.terminate(
                            AUDIT_UNAVAILABLE, "pgwarden: the audit trail cannot record "
                            "statements right now; nothing was sent", reason="audit_unavailable"))
                        return
                    events = []
                if self.upstream is not None and self.upstream.transport is not None:
                    self.upstream.transport.write(action.data)
            elif isinstance(action, SendDownstream):
                if self.transport is not None:
                    self.transport.write(action.data)
            elif isinstance(action, NeedAuth):
                asyncio.get_running_loop().create_task(self._authenticate(action))
            elif isinstance(action, NeedDecision):
                self.waiting = True
                if self.transport is not None:
                    self.transport.pause_reading()
                self._decision = asyncio.get_running_loop().create_task(self._decide(action))
            elif isinstance(action, Close):
                if events:
                    self.runtime.record(events)
                    events = []
                self._close_all()
        if events:
            self.runtime.record(events)
        if self.runtime.draining:
            # Draining: a session ends as soon as no statement of it is in
            # flight, so nothing new reaches PostgreSQL and nothing that did
            # loses its result record.
            self.drain()

    def drain(self) -> None:
        """End the session now unless a statement is in flight (then it ends
        when that statement's response has gone to the client)."""
        if not self._closed and not self.session.busy:
            ending = self.session.terminate(*SHUTDOWN)
            if ending:
                self.run(ending)

    def cancel_hold(self) -> None:
        """A client CancelRequest while a statement waits for a decision or
        an approval: drop the statement (PostgreSQL never saw it)."""
        if self._decision is not None and not self._decision.done():
            self._cancel_reason = True
            self._held = self.session.config.session_id in self.runtime.holding
            self._decision.cancel()

    async def _decide(self, need: NeedDecision) -> None:
        try:
            decision = await self.runtime.decide(need.request)
        except asyncio.CancelledError:
            if not self._cancel_reason:
                raise
            decision = cancelled_decision(self._held)
        finally:
            self._decision = None
            self._cancel_reason = False
        self.waiting = False
        if self._closed:
            return
        self.run(self.session.on_decision(need.ticket, decision))
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    async def _authenticate(self, need: NeedAuth) -> None:
        result = await self.runtime.authenticate(need)
        if not self._closed:
            self.run(self.session.on_auth(need.ticket, result))

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.settings.sessions.discard(self)
        self.runtime.session_closed(self.session)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()  # flushes what is buffered first
            return
        # Close in order (see the module docstring): FIN after the buffered
        # bytes, keep reading (and dropping) until the client's FIN.
        transport.write_eof()
        transport.resume_reading()
        self.settings.lingering.add(self)
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)


async def _tick(settings: InlineSettings) -> None:
    """Deadlines (idle timeout, token expiry) of every session, once a second.
    Wall-clock time for token ``exp``, monotonic time for idleness."""
    while True:
        await asyncio.sleep(1.0)
        for client in list(settings.sessions):
            client.run(client.session.tick(time.time(), time.monotonic()))


async def serve(settings: InlineSettings, runtime: Runtime,
                ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Listen until ``stop`` is set (or forever)."""
    loop = asyncio.get_running_loop()
    cancels = CancelRegistry()
    server = await loop.create_server(lambda: ClientSide(settings, runtime, cancels),
                                      settings.listen_host, settings.listen_port,
                                      reuse_address=True, backlog=1024)
    runtime.log.info("tap_listening", driver="inline", host=settings.listen_host,
                     port=settings.listen_port)
    runtime.emit({"type": "gateway", "action": "start", "component": "tap",
                  "detail": {"driver": "inline"}})
    ticker = loop.create_task(_tick(settings))
    if ready is not None:
        ready.set()
    try:
        if stop is None:
            await asyncio.Future()
        else:
            await stop.wait()
    finally:
        # Drain (SIGTERM): no new sessions, not ready for Envoy's checks.
        # Idle sessions end now with 57P01; a session with a statement in
        # flight ends when its response has gone out (ClientSide.run), so no
        # new statement starts. Past the bound the rest are ended as they are.
        runtime.draining = True
        ticker.cancel()
        server.close()
        for c in list(settings.sessions):
            c.drain()
        deadline = time.monotonic() + settings.drain_seconds
        while time.monotonic() < deadline and settings.sessions:
            await asyncio.sleep(0.05)
        for s in list(settings.sessions):
            s.run(s.session.terminate(*SHUTDOWN))
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline and settings.lingering:
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        runtime.emit({"type": "gateway", "action": "stop", "component": "tap",
                  "detail": {"driver": "inline"}})
        await runtime.aclose()
