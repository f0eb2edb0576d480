"""The audit writer: events in from the tap and policyd, records out to the store.

``submit`` is what the data path calls. It scrubs the events, appends them to
the local spool (one ``write()``), wakes the writer thread and returns: no
database round trip on the data path. The writer thread reads the spool in
order and stores up to ``batch_size`` events per transaction. When the store
is unreachable the events simply wait in the spool; the writer retries with
back-off, records a ``sink_outage`` gateway event when the outage starts and
``sink_recovered`` when the backlog starts flowing again (PCI DSS 10.2.1.6),
and stores the backlog in its original order, each event exactly once (the
spool position is committed with the records).

If the spool itself cannot be written (disk full, I/O error, over its
``max_spool_bytes`` bound), ``submit`` returns False: with ``fail_closed``
(the default) the caller must refuse the statement. With ``fail_closed=False``
the events are held in a bounded memory queue instead (lost on a crash) and
``submit`` returns True until that queue is full too.
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from policyd.audit.chain import CheckpointLog, checkpoints_path, key_path, load_or_create_key
from policyd.audit.events import Event, GatewayEvent, event_to_json
from policyd.audit.scrub import scrub_event
from policyd.audit.sinks import Checkpointer, Sink, StoreSink
from policyd.audit.spool import Spool, SpoolEntry, SpoolError
from policyd.audit.store import store_url

log = structlog.get_logger("pgwarden.audit.writer")

DEFAULT_SPOOL = ".run/audit-spool.jsonl"


@dataclass
class WriterStats:
    submitted: int = 0
    stored: int = 0
    refused: int = 0
    batches: int = 0
    outages: int = 0
    memory_dropped: int = 0


class AuditWriter:
    """Spool-first, batched writer of audit events into an :class:`AuditStore`.

    Thread-safe; ``submit`` may be called from any thread (an asyncio loop
    included: it never blocks on the network).
    """

    def __init__(
        self,
        store: str | None = None,
        spool_path: str | os.PathLike[str] = DEFAULT_SPOOL,
        *,
        writer_id: str | None = None,
        batch_size: int = 1000,
        fsync_interval: float = 0.05,
        fail_closed: bool = True,
        max_spool_bytes: int = 1 << 30,
        max_memory_events: int = 100_000,
        compact_bytes: int = 64 << 20,
        checkpoint_every: int = 10_000,
        checkpoint_seconds: float = 300.0,
        signing_key: str | os.PathLike[str] | None = None,
        checkpoint_file: str | os.PathLike[str] | None = None,
        create_key: bool = True,
        component: str = "policyd",
        retry_max_seconds: float = 5.0,
        sink: Sink | None = None,
    ) -> None:
        self.url = store_url(store)
        self.spool = Spool(Path(spool_path), max_bytes=max_spool_bytes)
        self.writer_id = writer_id or (
            f"{socket.gethostname()}:"
            + hashlib.sha256(str(Path(spool_path).resolve()).encode()).hexdigest()[:12]
        )
        self.batch_size = batch_size
        self.fsync_interval = fsync_interval
        self.fail_closed = fail_closed
        self.compact_bytes = compact_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.component = component
        self.retry_max_seconds = retry_max_seconds
        self.stats = WriterStats()
        self._signing_key = key_path(signing_key)
        self._checkpoint_file = checkpoints_path(checkpoint_file)
        self._create_key = create_key
        self._sink = sink
        self._stored_n: int | None = None  # spool number stored, once known
        self._memory: collections.deque[Event] = collections.deque()
        self._max_memory = max_memory_events
        self._submit_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._outage_since: float | None = None
        self._outage_error = ""
        self._threads: list[threading.Thread] = []
        self._idle = threading.Event()

    # -- data path ---------------------------------------------------------------

    def submit(self, events: Sequence[Event]) -> bool:
        """Accept ``events`` (in order). False means they were not accepted and,
        when failing closed, the caller must refuse the statement."""
        if not events:
            return True
        clean = [scrub_event(e) for e in events]
        with self._submit_lock:
            if not self._memory:
                try:
                    self.spool.append([event_to_json(e) for e in clean])
                except SpoolError as exc:
                    log.error("audit_spool_failed", error=str(exc), events=len(clean))
                    if self.fail_closed:
                        self.stats.refused += len(clean)
                        return False
                else:
                    self.stats.submitted += len(clean)
                    self._idle.clear()
                    self._notify()
                    return True
            # fail open: keep order behind earlier memory-held events
            if len(self._memory) + len(clean) > self._max_memory:
                self.stats.memory_dropped += len(clean)
                self.stats.refused += len(clean)
                return False
            self._memory.extend(clean)
            self.stats.submitted += len(clean)
            self._idle.clear()
        self._notify()
        return True

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> AuditWriter:
        """Start the writer and flusher threads; records a gateway ``start``.

        Without an explicit ``sink`` the writer stores directly and signs
        checkpoints itself with the key at ``signing_key`` (created if absent
        and ``create_key``; without a key it runs unsigned and says so).
        """
        if self._sink is None:
            checkpointer = None
            try:
                key = load_or_create_key(self._signing_key, create=self._create_key)
                checkpointer = Checkpointer(
                    CheckpointLog(self._checkpoint_file, key),
                    every=self.checkpoint_every,
                    seconds=self.checkpoint_seconds,
                    writer_id=self.writer_id,
                )
            except Exception as exc:
                log.error("audit_signing_key_unavailable", error=str(exc))
            self._sink = StoreSink(self.url, checkpointer)
        self.submit([self._gateway("start", writer_id=self.writer_id)])
        for target, name in ((self._run, "audit-writer"), (self._flush_loop, "audit-fsync")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @property
    def checkpoints(self) -> int:
        sink = self._sink
        if isinstance(sink, StoreSink) and sink.checkpointer is not None:
            return sink.checkpointer.count
        return 0

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is stored; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._submit_lock:
                target = self.spool.last_n
                memory = len(self._memory)
            if (self._stored_n or 0) >= target and memory == 0 and not self.in_outage:
                return True
            self._notify()
            self._idle.wait(0.05)
        return False

    def close(self, timeout: float = 30.0) -> bool:
        """Record a gateway ``stop``, store what is pending (up to ``timeout``),
        sign a final checkpoint and stop. True if nothing was left pending."""
        self.submit([self._gateway("stop", writer_id=self.writer_id)])
        drained = self.flush(timeout)
        self._stopping.set()
        self._notify()
        for t in self._threads:
            t.join(timeout=5)
        self.spool.close()
        if self._sink is not None:
            try:
                self._sink.close()  # signs a final checkpoint when it stores directly
            except Exception as exc:
                log.error("audit_sink_close_failed", error=type(exc).__name__)
        return drained

    def __enter__(self) -> AuditWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _gateway(self, action: str, **detail: object) -> GatewayEvent:
        return GatewayEvent(
            action=action,
            component=self.component,
            instance=socket.gethostname(),
            detail=dict(detail),
        )

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _flush_loop(self) -> None:
        while not self._stopping.wait(self.fsync_interval):
            try:
                self.spool.sync()
            except OSError as exc:
                log.error("audit_spool_fsync_failed", error=exc.strerror)

    def _next_batch(self) -> list[SpoolEntry]:
        assert self._stored_n is not None
        entries = self.spool.read(self._stored_n, self.batch_size)
        if entries:
            return entries
        with self._submit_lock:
            mem = [self._memory[i] for i in range(min(self.batch_size, len(self._memory)))]
        # n = 0: not spooled, stored without deduplication (fail-open path)
        return [SpoolEntry(0, e.model_dump(mode="json"), 0) for e in mem]

    def _run(self) -> None:
        backoff = 0.1
        assert self._sink is not None
        sink = self._sink
        while True:
            try:
                if self._stored_n is None:
                    self._stored_n = sink.position(self.writer_id)
                entries = self._next_batch()
                if not entries:
                    self._recovered()
                    self._idle.set()
                    if self._stopping.is_set():
                        return
                    with self._wake:
                        self._wake.wait(0.5)
                    continue
                stored_n = sink.append(self.writer_id, entries)
                if entries[0].n:
                    self._stored_n = max(stored_n, entries[-1].n)
                    self.spool.advance(entries[-1])
                else:
                    with self._submit_lock:
                        for _ in entries:
                            self._memory.popleft()
                self.stats.stored += len(entries)
                self.stats.batches += 1
                backoff = 0.1
                self._recovered()
                if entries[0].n:
                    self.spool.compact(entries[-1].n, self.compact_bytes)
            except Exception as exc:
                self._outage(exc)
                if self._stopping.is_set():
                    # close() gave up waiting; what is left stays in the spool
                    return
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_seconds)

    def _outage(self, exc: Exception) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        self._outage_error = type(exc).__name__
        self.stats.outages += 1
        # The message can echo connection parameters; log the class only.
        log.error("audit_store_unreachable", error=self._outage_error, writer=self.writer_id)
        self.submit([self._gateway("sink_outage", error=self._outage_error)])

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        seconds = round(time.monotonic() - self._outage_since, 3)
        self._outage_since = None
        log.info("audit_store_recovered", outage_seconds=seconds, writer=self.writer_id)
        self.submit(
            [self._gateway("sink_recovered", outage_seconds=seconds, error=self._outage_error)]
        )
