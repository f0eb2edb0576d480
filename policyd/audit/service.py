"""policyd's ``pgwarden.audit.v1.AuditSink`` gRPC service.

The tap runs an :class:`~policyd.audit.writer.AuditWriter` with a
:class:`~policyd.audit.sinks.GrpcSink`: its events are spooled on the tap's
host first, then shipped here in batches. This service validates every event
against the schema, scrubs it again (policyd does not trust producers for
PCI DSS 3.5.1), and stores the batch in one transaction with the producer's
spool position, so retries are stored once. A store failure answers
``UNAVAILABLE``: the producer keeps the events spooled and retries.

Wire it into policyd's gRPC server with :func:`add_to_server`.
"""

from __future__ import annotations

from typing import Any

import grpc
import structlog
from pydantic import ValidationError

from pgwarden._proto import audit_pb2, audit_pb2_grpc
from policyd.audit.events import Event, parse_event
from policyd.audit.models import event_to_content
from policyd.audit.scrub import line_needs_scrub, scrub_event
from policyd.audit.sinks import STORE_UNREACHABLE, Checkpointer
from policyd.audit.store import AuditStore

log = structlog.get_logger("pgwarden.audit.service")


def _scrubbed(line: str | bytes) -> Event:
    """The event of a spool line, scrubbed again unless its text shows that
    scrubbing cannot change it (most statement records: re-scrubbing every
    field was a third of the store's cost per event)."""
    event = parse_event(line)
    if line_needs_scrub(line) or getattr(event, "recorded_rows", None) is not None:
        return scrub_event(event)
    return event


class AuditSinkService(audit_pb2_grpc.AuditSinkServicer):
    def __init__(self, store: AuditStore, checkpointer: Checkpointer | None = None) -> None:
        self.store = store
        self.checkpointer = checkpointer

    def Append(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            items = [(int(e.n), event_to_content(_scrubbed(e.event_json)))
                     for e in request.events]
        except ValidationError as exc:
            # Name the position, not the content: the content may hold a secret.
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"event does not match the audit schema ({exc.error_count()} errors)",
            )
        try:
            stored_n, dups = self.store.append_spooled(request.writer_id, items)
            head_seq = self.store.head()[0]
        except Exception as exc:
            log.error("audit_store_unreachable", error=type(exc).__name__,
                      writer=request.writer_id)
            self.store.engine.dispose()
            context.abort(grpc.StatusCode.UNAVAILABLE, STORE_UNREACHABLE)
        if self.checkpointer is not None:
            self.checkpointer.note(len(items) - dups, self.store.head)
        return audit_pb2.AppendReply(stored_n=stored_n, head_seq=head_seq, duplicates=dups)

    def Position(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            pos = self.store.writer_position(request.writer_id)
        except Exception as exc:
            log.error("audit_store_unreachable", error=type(exc).__name__)
            self.store.engine.dispose()
            context.abort(grpc.StatusCode.UNAVAILABLE, STORE_UNREACHABLE)
        return audit_pb2.PositionReply(stored_n=pos)


def add_to_server(
    server: grpc.Server, store: AuditStore, checkpointer: Checkpointer | None = None
) -> AuditSinkService:
    service = AuditSinkService(store, checkpointer)
    audit_pb2_grpc.add_AuditSinkServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    return service
