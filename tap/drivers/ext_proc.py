"""Envoy network ext_proc driver: a grpc.aio server of
``envoy.service.network_ext_proc.v3.NetworkExternalProcessor/Process``.

One gRPC stream is one client connection. Envoy sends each chunk it reads
from the client as ``read_data`` and each chunk from PostgreSQL as
``write_data``, and applies every response by the field it carries:
``read_data`` is injected towards the upstream (tcp_proxy), ``write_data``
towards the client. So the session's SendUpstream/SendDownstream map one to
one onto response fields, whichever request they answer.

Envoy counts outstanding requests per direction and keeps the connection from
closing until each got a response; the driver therefore answers every request
with at least one response of its own direction (empty if the session had
nothing to send that way yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from pgwarden._proto import network_ext_proc_pb2 as pb
from pgwarden._proto import network_ext_proc_pb2_grpc as pb_grpc
from tap.actions import Action, Close, Event, NeedAuth, NeedDecision, SendDownstream, SendUpstream
from tap.cancel import CancelRegistry
from tap.drivers import SHUTDOWN
from tap.hooks import Decision
from tap.protocol import SYSTEM_ERROR as AUDIT_UNAVAILABLE
from tap.runtime import Runtime, cancelled_decision
from tap.session import Session, SessionConfig

# How often a stream checks its session's deadlines (token expiry, idleness).
TICK_SECONDS = 1.0

# Bytes one stream may have in flight from Envoy to the tap (see SERVER_OPTIONS).
RECEIVE_WINDOW = 1024 * 1024

# The gRPC server's options (bench/echo_tap.py serves its floor with the same).
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    # A fixed HTTP/2 receive window per stream. Envoy's network ext_proc
    # filter sends every chunk it reads from PostgreSQL without waiting
    # for the tap, so what the tap holds for one session is its receive
    # window: with gRPC's BDP probing that window grows with the load
    # (a 1,000,000-row result parked 20-56 MB in the tap); fixed at
    # RECEIVE_WINDOW it stays there, at no cost in throughput measured
    # (bench/slow_client_memory.py, bench/RESULTS.md).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW),
    # Envoy keeps the HTTP/2 connection alive with pings while a stream
    # waits (a statement held for approval can wait minutes): accept them,
    # or gRPC answers "too many pings" and drops every session on it.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]

_MODIFIED = pb.ProcessingResponse.MODIFIED
_CLOSE = pb.ProcessingResponse.CLOSE


class NetworkExtProc(pb_grpc.NetworkExternalProcessorServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cancels = CancelRegistry()
        self.active: set[Session] = set()

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        peer = context.peer() or ""
        config = SessionConfig(session_id=str(uuid.uuid4()), client_addr=peer, driver="extproc",
                               **self.runtime.session_options())
        session = Session(config, self.runtime.hooks(), self.cancels)
        session.touch(time.monotonic())
        self.active.add(session)
        self.runtime.session_opened(session)
        closed = False
        runtime = self.runtime
        monotonic = time.monotonic
        checked = -TICK_SECONDS  # when the deadlines were last checked
        try:
            async for req in request_iterator:
                if closed:
                    # Envoy may still have chunks in flight; acknowledge them.
                    yield _ack(req)
                    continue
                is_read = req.HasField("read_data")
                # No timer can push into this stream: deadlines are checked as
                # chunks arrive (at most once a second, the inline driver's
                # rhythm); Envoy's tcp_proxy idle_timeout ends silent ones.
                now = monotonic()
                expired: list[Action] = []
                if now - checked >= TICK_SECONDS:
                    checked = now
                    expired = session.tick(time.time(), now)
                if not expired and runtime.draining and not session.busy:
                    # Draining: nothing new starts (a new client's first chunk,
                    # an idle session's next statement); the session ends.
                    expired = session.terminate(*SHUTDOWN)
                if expired:
                    actions = expired
                elif is_read:
                    chunk = req.read_data
                    session.touch(now)
                    actions = session.on_read(chunk.data)
                    if chunk.end_of_stream:
                        actions += session.on_client_closed()
                else:
                    chunk = req.write_data
                    actions = session.on_write(chunk.data)
                    if chunk.end_of_stream:
                        actions += session.on_upstream_closed()
                if self.runtime.draining and not session.busy:
                    # The response to the last statement in flight: the
                    # session ends right behind it.
                    actions += session.terminate(*SHUTDOWN)
                answered = False
                while actions:
                    pending = actions
                    actions = []
                    for resp, direction_read, close in self._responses(pending, session):
                        if isinstance(resp, NeedDecision):
                            decision = await self._decide(session, resp)
                            actions += session.on_decision(resp.ticket, decision)
                            continue
                        if isinstance(resp, NeedAuth):
                            actions += session.on_auth(resp.ticket,
                                                       await self.runtime.authenticate(resp))
                            continue
                        if close:
                            closed = True
                        elif direction_read == is_read:
                            answered = True
                        yield resp
                if not answered and not closed:
                    yield _ack(req)
        finally:
            if not closed:
                self.runtime.emit_all(session.on_client_closed())
            self.active.discard(session)
            self.runtime.session_closed(session)

    async def _decide(self, session: Session, need: NeedDecision) -> Decision:
        """Wait for the decision; a client CancelRequest (arriving on another
        stream) abandons it and the statement is refused, never run."""
        task = asyncio.ensure_future(self.runtime.decide(need.request))
        cancelled: list[bool] = []

        def on_cancel() -> None:
            cancelled.append(session.config.session_id in self.runtime.holding)
            task.cancel()

        session.on_cancel_requested = on_cancel
        try:
            return await task
        except asyncio.CancelledError:
            if not cancelled or not task.cancelled():
                raise
            return cancelled_decision(cancelled[0])
        finally:
            session.on_cancel_requested = None

    def _responses(self, actions: list[Action], session: Session
                   ) -> list[tuple[pb.ProcessingResponse | NeedDecision | NeedAuth, bool, bool]]:
        """Coalesce consecutive same-direction sends into single responses;
        record events before the bytes that follow them go upstream."""
        out: list[tuple[pb.ProcessingResponse | NeedDecision | NeedAuth, bool, bool]] = []
        sends: list[bytes] = []
        upward = False  # direction of what ``sends`` holds
        events: list[dict[str, object]] = []
        for a in actions:
            if isinstance(a, (SendUpstream, SendDownstream)):  # a tuple: `X | Y` builds a union per call
                to_server = type(a) is SendUpstream
                if to_server and events:
                    if not self.runtime.record(events):
                        return self._responses(session.terminate(
                            AUDIT_UNAVAILABLE, "pgwarden: the audit trail cannot record "
                            "statements right now; nothing was sent", reason="audit_unavailable"),
                            session)
                    events = []
                if sends and upward is not to_server:
                    out.append(_data_response(sends, upward))
                    sends = []
                upward = to_server
                sends.append(a.data)
            elif isinstance(a, Event):
                events.append(a.record)
            elif isinstance(a, (NeedDecision, NeedAuth)):
                if sends:
                    out.append(_data_response(sends, upward))
                    sends = []
                out.append((a, False, False))
            elif isinstance(a, Close):
                if sends:
                    out.append(_data_response(sends, upward))
                    sends = []
                out.append((pb.ProcessingResponse(connection_status=_CLOSE), False, True))
        if events:
            self.runtime.record(events)
        if sends:
            out.append(_data_response(sends, upward))
        return out


def _data_response(sends: list[bytes], upward: bool
                   ) -> tuple[pb.ProcessingResponse, bool, bool]:
    # Setting the nested field in place costs half of building a Data message
    # and copying it into the response (upb), on every chunk.
    resp = pb.ProcessingResponse(data_processing_status=_MODIFIED)
    (resp.read_data if upward else resp.write_data).data = (
        sends[0] if len(sends) == 1 else b"".join(sends))
    return resp, upward, False


def _ack(req: pb.ProcessingRequest) -> pb.ProcessingResponse:
    if req.HasField("read_data"):
        return pb.ProcessingResponse(read_data=pb.Data(), data_processing_status=_MODIFIED)
    return pb.ProcessingResponse(write_data=pb.Data(), data_processing_status=_MODIFIED)


async def serve(host: str, port: int, runtime: Runtime,
                ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None,
                drain_seconds: float = 10.0) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = NetworkExtProc(runtime)
    pb_grpc.add_NetworkExternalProcessorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("envoy.service.network_ext_proc.v3.NetworkExternalProcessor",
                              health_pb2.HealthCheckResponse.SERVING)
    runtime.log.info("tap_listening", driver="extproc", host=host, port=port)
    runtime.emit({"type": "gateway", "action": "start", "component": "tap",
                  "detail": {"driver": "extproc"}})
    if ready is not None:
        ready.set()
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        # Drain (SIGTERM): health NOT_SERVING so Envoy stops opening streams.
        # A session ends with 57P01 at its next chunk once no statement of
        # it is in flight (Process): right behind the response to its last
        # statement, or when an idle client sends again. A stream can only
        # answer a chunk, so a client that stays silent is cut (Envoy closes
        # the connection: failure_mode_allow is false) when the bound ends.
        runtime.draining = True
        await health_servicer.enter_graceful_shutdown()
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and servicer.active:
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await server.stop(grace=1)
        runtime.emit({"type": "gateway", "action": "stop", "component": "tap",
                  "detail": {"driver": "extproc"}})
        await runtime.aclose()
