"""Where an :class:`~policyd.audit.writer.AuditWriter` ships its spool.

- :class:`StoreSink`: straight into the audit store (policyd, the CLI, tests).
- :class:`GrpcSink`: to policyd's ``AuditSink`` service (the tap), which
  stores with the same exactly-once rule.

Both raise on failure; the writer keeps the events spooled and retries.
:class:`GrpcSink` raises :class:`SinkUnavailable`, which says whether policyd
or the store behind it failed, for the writer's ``sink_outage`` record.
:class:`Checkpointer` signs the chain head every N records or T seconds on
whichever side writes the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from policyd.audit.chain import CheckpointLog
from policyd.audit.models import spooled_to_content
from policyd.audit.spool import SpoolEntry
from policyd.audit.store import AuditStore

log = structlog.get_logger("pgwarden.audit.sink")

# The AuditSink service's answer when its store fails (UNAVAILABLE): a fixed
# text, so a producer can tell "policyd is up, its store is not" from
# "policyd does not answer" without carrying any message of the store's.
STORE_UNREACHABLE = "audit store unreachable; keep spooling"


class SinkUnavailable(Exception):
    """A sink failure, described without the underlying message (which can
    echo connection parameters): ``failed`` names the part that failed
    (``store`` or ``policyd``), ``error`` the gRPC status or error class."""

    def __init__(self, failed: str, error: str) -> None:
        super().__init__(f"{failed}: {error}")
        self.failed = failed
        self.error = error


class SinkRejected(Exception):
    """The sink refused the batch's content (policyd: an event does not match
    the audit schema). Retrying the same batch cannot help: the shipper
    narrows it down to the event and quarantines that one."""


class Sink(Protocol):
    def position(self, writer_id: str) -> int:
        """Last spool number of ``writer_id`` already stored."""
        ...

    def append(self, writer_id: str, entries: Sequence[SpoolEntry]) -> int:
        """Store ``entries`` (in order, exactly once); return the new position."""
        ...

    def close(self) -> None: ...


class Checkpointer:
    """Signs the chain head every ``every`` records or ``seconds`` seconds."""

    def __init__(self, log_: CheckpointLog, *, every: int = 10_000, seconds: float = 300.0,
                 writer_id: str = "") -> None:
        self.log = log_
        self.every = every
        self.seconds = seconds
        self.writer_id = writer_id
        self.pending = 0
        self.count = 0
        self._last = time.monotonic()

    def note(self, stored: int, head: Callable[[], tuple[int, str]], *, force: bool = False) -> None:
        self.pending += stored
        due = self.pending >= self.every or time.monotonic() - self._last >= self.seconds
        if not (due or (force and self.pending)):
            return
        try:
            seq, head_hash = head()
            if seq:
                self.log.append("periodic", seq, head_hash, writer_id=self.writer_id)
                self.count += 1
            self.pending = 0
            self._last = time.monotonic()
        except Exception as exc:
            # A missed checkpoint widens the unsigned window; it never loses records.
            log.error("audit_checkpoint_failed", error=type(exc).__name__)


class StoreSink:
    """Writes into an :class:`AuditStore`, opened (and migrated) lazily so a
    store that is down at start-up is just an outage."""

    def __init__(self, url: str, checkpointer: Checkpointer | None = None) -> None:
        self.url = url
        self.checkpointer = checkpointer
        self._store: AuditStore | None = None

    def _open(self) -> AuditStore:
        if self._store is None:
            self._store = AuditStore(self.url, migrate=True)
        return self._store

    def position(self, writer_id: str) -> int:
        try:
            return self._open().writer_position(writer_id)
        except Exception:
            self._reset()
            raise

    def append(self, writer_id: str, entries: Sequence[SpoolEntry]) -> int:
        store = self._open()
        try:
            items = [(e.n, spooled_to_content(e.event)) for e in entries]
        except (KeyError, TypeError, ValueError) as exc:  # not an event this store knows
            raise SinkRejected(f"event cannot be stored ({type(exc).__name__})") from exc
        try:
            stored_n, _dups = store.append_spooled(writer_id, items)
        except Exception:
            self._reset()
            raise
        if self.checkpointer is not None:
            self.checkpointer.note(len(items), store.head)
        return stored_n

    def _reset(self) -> None:
        if self._store is not None:
            self._store.engine.dispose()

    def close(self) -> None:
        if self._store is not None:
            if self.checkpointer is not None:
                self.checkpointer.note(0, self._store.head, force=True)
            self._store.close()


class GrpcSink:
    """Ships spooled events to policyd's ``pgwarden.audit.v1.AuditSink``."""

    def __init__(self, target: str, *, timeout: float = 10.0, channel: Any = None) -> None:
        import grpc

        from pgwarden._proto import audit_pb2, audit_pb2_grpc

        self._pb = audit_pb2
        self._rpc_error = grpc.RpcError
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = audit_pb2_grpc.AuditSinkStub(self._channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def position(self, writer_id: str) -> int:
        try:
            reply = self._stub.Position(
                self._pb.PositionRequest(writer_id=writer_id), timeout=self.timeout
            )
        except self._rpc_error as exc:
            raise _unavailable(exc) from exc
        return int(reply.stored_n)

    def append(self, writer_id: str, entries: Sequence[SpoolEntry]) -> int:
        req = self._pb.AppendRequest(
            writer_id=writer_id,
            events=[
                self._pb.SpooledEvent(
                    n=e.n, event_json=e.raw if e.raw is not None
                    else json.dumps(e.event, ensure_ascii=False).encode()
                )
                for e in entries
            ],
        )
        try:
            reply = self._stub.Append(req, timeout=self.timeout)
        except self._rpc_error as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if getattr(code, "name", "") == "INVALID_ARGUMENT":
                raise SinkRejected(str(exc.details() or "rejected")) from exc
            raise _unavailable(exc) from exc
        return int(reply.stored_n)

    def close(self) -> None:
        self._channel.close()


def _unavailable(exc: Any) -> SinkUnavailable:
    """Which side a failed AuditSink call points at (policyd's own fixed
    answer for its store; anything else is policyd or the way to it)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = getattr(code, "name", None) or type(exc).__name__
    if name == "UNAVAILABLE" and details == STORE_UNREACHABLE:
        return SinkUnavailable("store", name)
    return SinkUnavailable("policyd", str(name))
