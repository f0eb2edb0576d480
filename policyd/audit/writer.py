"""The audit writer: events in from the tap and policyd, records out to the store.

``submit`` is what the data path calls. It scrubs the events, appends them to
the local spool (one ``write()``) and returns: no database round trip on the
data path. A :class:`SpoolShipper` reads the spool in order and stores up to
``batch_size`` events per transaction — in a thread of the same process
(default), or in a separate ``pgwarden audit ship`` process
(``AuditWriter(ship=False)``), which keeps the hashing and database work off
a busy process's core (the tap's, say).

When the store is unreachable the events simply wait in the spool; the
shipper retries with back-off, records a ``sink_outage`` gateway event when
the outage starts and ``sink_recovered`` when the backlog flows again (PCI DSS
10.2.1.6; ``detail.failed`` says whether the store or policyd, through which
a tap ships, was unreachable), and stores the backlog in its original order,
each event exactly once (the spool position is committed with the records).

If the spool itself cannot be written (disk full, I/O error, over its
``max_spool_bytes`` bound), ``submit`` returns False: with ``fail_closed``
(the default) the caller must refuse the statement. With ``fail_closed=False``
the events are held in a bounded memory queue instead (lost on a crash) and
``submit`` returns True until that queue is full too (in-process shipping only).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from pgwarden import metrics
from policyd.audit.chain import CheckpointLog, checkpoints_path, key_path, load_or_create_key
from policyd.audit.events import Event, GatewayEvent, event_to_json, parse_event
from policyd.audit.scrub import scrub_event
from policyd.audit.sinks import Checkpointer, Sink, SinkRejected, SinkUnavailable, StoreSink
from policyd.audit.spool import Spool, SpoolEntry, SpoolError, SpoolReader
from policyd.audit.store import store_url

log = structlog.get_logger("pgwarden.audit.writer")

DEFAULT_SPOOL = ".run/audit-spool.jsonl"


def default_writer_id(spool_path: str | os.PathLike[str]) -> str:
    """The spool's producer id, kept in ``<spool>.id`` beside it.

    It must stay the same for as long as the spool exists — the store
    deduplicates on ``(writer_id, n)`` — even when the host is renamed (a
    rescheduled pod on the same volume), and the appender and a separate
    shipper must agree on it: so it is created once and read back after.
    """
    path = Path(str(spool_path) + ".id")
    for _ in range(50):
        try:
            wid = path.read_text().strip()
        except FileNotFoundError:
            break
        if wid:
            return wid
        time.sleep(0.01)  # the other side created it and is writing it
    else:
        path.unlink()  # left empty by a crash between create and write: start over
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(Path(spool_path).resolve()).encode()).hexdigest()[:8]
    wid = f"{socket.gethostname()}:{digest}:{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return default_writer_id(spool_path)  # created meanwhile by the other side
    try:
        os.write(fd, wid.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return wid


def store_sink(
    url: str | None,
    *,
    signing_key: str | os.PathLike[str] | None = None,
    checkpoint_file: str | os.PathLike[str] | None = None,
    create_key: bool = True,
    checkpoint_every: int = 10_000,
    checkpoint_seconds: float = 300.0,
    writer_id: str = "",
) -> StoreSink:
    """A sink into the store that signs checkpoints with the key at
    ``signing_key`` (created if absent and ``create_key``; without a usable
    key it stores unsigned and logs why)."""
    checkpointer = None
    try:
        key = load_or_create_key(key_path(signing_key), create=create_key)
        checkpointer = Checkpointer(
            CheckpointLog(checkpoints_path(checkpoint_file), key),
            every=checkpoint_every,
            seconds=checkpoint_seconds,
            writer_id=writer_id,
        )
    except Exception as exc:
        log.error("audit_signing_key_unavailable", error=str(exc))
    return StoreSink(store_url(url), checkpointer)


@dataclass
class WriterStats:
    submitted: int = 0
    stored: int = 0
    refused: int = 0
    batches: int = 0
    outages: int = 0
    memory_dropped: int = 0


class SpoolShipper:
    """Reads a spool in order and stores it through a :class:`Sink`.

    ``record`` is how it reports its own gateway events (outage, recovery):
    the writer's ``submit`` in-process; ``None`` for a standalone shipper,
    which stores them directly (unspooled) once the sink is back.
    """

    def __init__(
        self,
        spool_path: str | os.PathLike[str],
        sink: Sink,
        *,
        writer_id: str | None = None,
        batch_size: int = 1000,
        retry_max_seconds: float = 5.0,
        record: Callable[[list[Event]], bool] | None = None,
        memory: Callable[[int], list[Event]] | None = None,
        memory_done: Callable[[int], None] | None = None,
        component: str = "audit-shipper",
        interval: float = 0.5,
    ) -> None:
        self.reader = SpoolReader(Path(spool_path))
        self.interval = interval
        # Events the sink refuses (not an outage: they can never be stored)
        # are set aside here, one JSON line each, and replaced in the store
        # by an ``event_quarantined`` record so the gap is on the record.
        self.quarantine_path = Path(str(spool_path) + ".quarantine")
        self._limit = batch_size
        self._quarantined_n = 0
        self.sink = sink
        self.writer_id = writer_id or default_writer_id(spool_path)
        self.batch_size = batch_size
        self.retry_max_seconds = retry_max_seconds
        self.component = component
        self.stats = WriterStats()
        self.stored_n: int | None = None
        self._record = record
        self._memory = memory
        self._memory_done = memory_done
        self._pending_gateway: list[Event] = []
        self._outage_since: float | None = None
        self._outage_error = ""
        self._outage_failed = ""
        self.stopping = threading.Event()
        self.wake = threading.Condition()
        self.idle = threading.Event()

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def notify(self) -> None:
        with self.wake:
            self.wake.notify_all()

    def gateway(self, action: str, **detail: object) -> GatewayEvent:
        return GatewayEvent(
            action=action,
            component=self.component,
            instance=socket.gethostname(),
            detail={"writer_id": self.writer_id, **detail},
        )

    def _next_batch(self) -> list[SpoolEntry]:
        assert self.stored_n is not None
        if self._pending_gateway:
            events, self._pending_gateway = self._pending_gateway, []
            return [SpoolEntry(0, e.model_dump(mode="json")) for e in events]
        entries = self.reader.read(self.stored_n, self._limit)
        if entries or self._memory is None:
            return entries
        # n = 0: not spooled, stored without deduplication (fail-open path)
        return [SpoolEntry(0, e.model_dump(mode="json")) for e in self._memory(self.batch_size)]

    def run(self) -> None:
        """Ship until ``stopping`` is set and nothing more can be shipped."""
        backoff = 0.1
        while True:
            entries: list[SpoolEntry] = []
            try:
                if self.stored_n is None:
                    self.stored_n = self.sink.position(self.writer_id)
                entries = self._next_batch()
                if not entries:
                    if self._recovered():
                        continue  # ship the recovery record right away
                    if not self._pending_gateway:
                        self.idle.set()
                        if self.stopping.is_set():
                            return
                        with self.wake:
                            self.wake.wait(self.interval)
                    continue
                try:
                    stored_n = self.sink.append(self.writer_id, entries)
                except SinkRejected as exc:
                    if not entries[0].n:
                        raise  # not spooled: nothing to set aside (an outage, below)
                    if len(entries) > 1:
                        # Narrow the batch down to the refused event.
                        self._limit = max(1, len(entries) // 2)
                        continue
                    # A failure storing its placeholder is an outage (below); the
                    # retry finds the same event refused and sets it aside again.
                    self._quarantine(entries[0], str(exc))
                    self._limit = self.batch_size
                    backoff = 0.1
                    self._recovered()
                    continue
                self._limit = self.batch_size
                if entries[0].n:
                    self.stored_n = max(stored_n, entries[-1].n)
                    self.reader.advance(entries[-1])
                elif self._memory_done is not None and not self._is_gateway_batch(entries):
                    self._memory_done(len(entries))
                self.stats.stored += len(entries)
                self.stats.batches += 1
                backoff = 0.1
                if self._recovered():
                    continue
                if entries[0].n and len(entries) < self.batch_size:
                    # A partial batch: let the next one fill for up to an
                    # interval (a full batch or flush() wakes it sooner).
                    # Shipping again at once made batches as small as one
                    # store round trip, and the store's cost per batch
                    # (head lock, session heads, commit) the bulk of its work.
                    with self.wake:
                        if not self.stopping.is_set():
                            self.wake.wait(self.interval)
            except Exception as exc:
                if entries and not entries[0].n and self._is_gateway_batch(entries):
                    # our own outage/recovery records: keep them for the retry
                    self._pending_gateway = [
                        GatewayEvent.model_validate(e.event) for e in entries
                    ] + self._pending_gateway
                self._outage(exc)
                if self.stopping.is_set():
                    return  # close() gave up waiting; what is left stays spooled
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_seconds)

    def _quarantine(self, entry: SpoolEntry, error: str) -> None:
        """Set aside one spooled event the sink refuses: its text goes to
        the quarantine file (fsync'd, mode 0600: it may hold what the spool
        holds), and an ``event_quarantined`` record with its spool number
        and SHA-256 takes its place in the store, moving the position on."""
        raw = entry.raw if entry.raw is not None else json.dumps(entry.event).encode()
        digest = hashlib.sha256(raw).hexdigest()
        if self._quarantined_n != entry.n:
            line = json.dumps({"writer_id": self.writer_id, "n": entry.n, "sha256": digest,
                               "error": error, "quarantined_at": time.time(),
                               "event": raw.decode("utf-8", "replace")}) + "\n"
            fd = os.open(self.quarantine_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._quarantined_n = entry.n
            log.error("audit_event_quarantined", writer=self.writer_id, spool_n=entry.n,
                      sha256=digest, file=str(self.quarantine_path))
        record = self.gateway("event_quarantined", spool_n=entry.n, sha256=digest, error=error,
                              file=self.quarantine_path.name)
        stored_n = self.sink.append(self.writer_id,
                                    [SpoolEntry(entry.n, record.model_dump(mode="json"))])
        self.stored_n = max(stored_n, entry.n)
        self.reader.advance(entry)
        self.stats.stored += 1
        self.stats.batches += 1

    @staticmethod
    def _is_gateway_batch(entries: list[SpoolEntry]) -> bool:
        return all(
            e.event.get("type") == "gateway"
            and e.event.get("action") in ("sink_outage", "sink_recovered")
            for e in entries
        )

    def _report(self, event: GatewayEvent) -> None:
        if self._record is not None and self._record([event]):
            return
        self._pending_gateway.append(event)

    def _outage(self, exc: Exception) -> None:
        metrics.AUDIT_WRITE_ERRORS.labels(component=self.component).inc()
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        # The message can echo connection parameters; record the class only
        # and which part failed: the store (directly, or as policyd's
        # AuditSink reports it) or policyd itself.
        if isinstance(exc, SinkUnavailable):
            self._outage_error, self._outage_failed = exc.error, exc.failed
        else:
            self._outage_error, self._outage_failed = type(exc).__name__, "store"
        self.stats.outages += 1
        log.error("audit_store_unreachable", error=self._outage_error,
                  failed=self._outage_failed, writer=self.writer_id)
        self._report(self.gateway("sink_outage", error=self._outage_error,
                                  failed=self._outage_failed))

    def _recovered(self) -> bool:
        if self._outage_since is None:
            return False
        seconds = round(time.monotonic() - self._outage_since, 3)
        self._outage_since = None
        log.info("audit_store_recovered", outage_seconds=seconds, writer=self.writer_id)
        self._report(
            self.gateway("sink_recovered", outage_seconds=seconds, error=self._outage_error,
                         failed=self._outage_failed)
        )
        return True

    def close(self) -> None:
        self.reader.close()
        self.sink.close()


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
        segment_bytes: int = 16 << 20,
        max_memory_events: int = 100_000,
        checkpoint_every: int = 10_000,
        checkpoint_seconds: float = 300.0,
        signing_key: str | os.PathLike[str] | None = None,
        checkpoint_file: str | os.PathLike[str] | None = None,
        create_key: bool = True,
        component: str = "policyd",
        retry_max_seconds: float = 5.0,
        sink: Sink | None = None,
        ship: bool = True,
        ship_interval: float = 0.2,
    ) -> None:
        self.url = store_url(store)
        self.spool_path = Path(spool_path)
        self.spool = Spool(self.spool_path, max_bytes=max_spool_bytes,
                           segment_bytes=segment_bytes)
        self.writer_id = writer_id or default_writer_id(spool_path)
        self.batch_size = batch_size
        self.fsync_interval = fsync_interval
        self.fail_closed = fail_closed
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.component = component
        self.retry_max_seconds = retry_max_seconds
        self.ship = ship
        self.ship_interval = ship_interval
        self._sink_args = {
            "signing_key": signing_key,
            "checkpoint_file": checkpoint_file,
            "create_key": create_key,
        }
        self._sink = sink
        self.shipper: SpoolShipper | None = None
        self._memory: collections.deque[Event] = collections.deque()
        self._max_memory = max_memory_events
        self._submitted = 0
        self._refused = 0
        self._memory_dropped = 0
        self._submit_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

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
                    if self.fail_closed or self.shipper is None:
                        self._refused += len(clean)
                        return False
                else:
                    self._submitted += len(clean)
                    self._wake_shipper()
                    return True
            # fail open: keep order behind earlier memory-held events
            if len(self._memory) + len(clean) > self._max_memory:
                self._memory_dropped += len(clean)
                self._refused += len(clean)
                return False
            self._memory.extend(clean)
            self._submitted += len(clean)
        self._wake_shipper()
        return True

    def submit_json(self, lines: Sequence[str]) -> bool:
        """Accept events already serialised and scrubbed by the caller (the
        tap's hot path, which builds statement records without a model
        round trip; tap/audit_sink.py keeps them equal to ``event_to_json``
        of the scrubbed event, and a test checks it). Same durability and
        fail-closed contract as :meth:`submit`."""
        if not lines:
            return True
        with self._submit_lock:
            if not self._memory:
                try:
                    self.spool.append(list(lines))
                except SpoolError as exc:
                    log.error("audit_spool_failed", error=str(exc), events=len(lines))
                    self._refused += len(lines)
                    return False
                self._submitted += len(lines)
                self._wake_shipper()
                return True
        # Events are held in memory behind a spool outage: keep order.
        return self.submit([parse_event(line) for line in lines])

    def _wake_shipper(self) -> None:
        # The shipper polls every ``ship_interval``; it is woken early only
        # for a full batch. Waking it per submit made a thread switch (and a
        # tiny batch) of every statement on the data path.
        shipper = self.shipper
        if shipper is not None:
            shipper.idle.clear()
            if self.spool.last_n - (shipper.stored_n or 0) >= self.batch_size:
                shipper.notify()

    @property
    def stats(self) -> WriterStats:
        s = self.shipper.stats if self.shipper is not None else WriterStats()
        return WriterStats(
            submitted=self._submitted,
            stored=s.stored,
            refused=self._refused,
            batches=s.batches,
            outages=s.outages,
            memory_dropped=self._memory_dropped,
        )

    @property
    def in_outage(self) -> bool:
        return self.shipper is not None and self.shipper.in_outage

    def pending_events(self) -> int:
        """Events accepted but not known to be stored: spooled past the
        store's position, plus any held in memory behind a spool failure.
        Before the store has answered once, the whole spool counts."""
        shipper = self.shipper
        if shipper is None:
            return 0
        stored = shipper.stored_n
        base = self.spool.first_base() if stored is None else stored
        return max(self.spool.last_n - base, 0) + len(self._memory)

    def pending_bytes(self) -> int:
        """Bytes of the spool not yet stored (0 when no event is pending)."""
        shipper = self.shipper
        if shipper is None or self.pending_events() == 0:
            return 0
        return shipper.reader.pending_bytes()

    def _expose(self, live: bool) -> None:
        """The backlog gauges of this component follow this writer (read
        when scraped, nothing on the data path); zero once it is closed."""
        depth = metrics.AUDIT_QUEUE_DEPTH.labels(component=self.component)
        size = metrics.AUDIT_SPOOL_BYTES.labels(component=self.component)
        if live:
            depth.set_function(self.pending_events)
            size.set_function(self.pending_bytes)
        else:
            depth.set_function(lambda: 0)
            size.set_function(lambda: 0)

    @property
    def checkpoints(self) -> int:
        sink = self._sink
        if isinstance(sink, StoreSink) and sink.checkpointer is not None:
            return sink.checkpointer.count
        return 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> AuditWriter:
        """Start the fsync thread and, unless ``ship=False``, the shipper
        thread; records a gateway ``start``."""
        if self.ship:
            if self._sink is None:
                self._sink = store_sink(
                    self.url,
                    checkpoint_every=self.checkpoint_every,
                    checkpoint_seconds=self.checkpoint_seconds,
                    writer_id=self.writer_id,
                    **self._sink_args,  # type: ignore[arg-type]
                )
            self.shipper = SpoolShipper(
                self.spool_path,
                self._sink,
                writer_id=self.writer_id,
                batch_size=self.batch_size,
                retry_max_seconds=self.retry_max_seconds,
                record=self.submit,
                memory=self._memory_batch,
                memory_done=self._memory_stored,
                component=self.component,
                interval=self.ship_interval,
            )
        self.submit([GatewayEvent(action="start", component=self.component,
                                  instance=socket.gethostname(),
                                  detail={"writer_id": self.writer_id})])
        targets: list[tuple[Callable[[], None], str]] = [(self._flush_loop, "audit-fsync")]
        if self.shipper is not None:
            targets.append((self.shipper.run, "audit-shipper"))
        for target, name in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.shipper is not None:
            self._expose(True)
        return self

    def _memory_batch(self, limit: int) -> list[Event]:
        with self._submit_lock:
            return [self._memory[i] for i in range(min(limit, len(self._memory)))]

    def _memory_stored(self, count: int) -> None:
        with self._submit_lock:
            for _ in range(count):
                self._memory.popleft()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is stored; False on timeout.
        Without an in-process shipper: fsync the spool and return True."""
        if self.shipper is None:
            self.spool.sync()
            return True
        shipper = self.shipper
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._submit_lock:
                target = self.spool.last_n
                memory = len(self._memory)
            if (
                (shipper.stored_n or 0) >= target
                and memory == 0
                and not shipper.in_outage
                and not shipper._pending_gateway
            ):
                return True
            shipper.notify()
            shipper.idle.wait(0.05)
        return False

    def close(self, timeout: float = 30.0) -> bool:
        """Record a gateway ``stop``, store what is pending (up to ``timeout``),
        sign a final checkpoint and stop. True if nothing was left pending."""
        self.submit([GatewayEvent(action="stop", component=self.component,
                                  instance=socket.gethostname(),
                                  detail={"writer_id": self.writer_id})])
        drained = self.flush(timeout)
        self._stopping.set()
        if self.shipper is not None:
            self.shipper.stopping.set()
            self.shipper.notify()
        for t in self._threads:
            t.join(timeout=5)
        if self.shipper is not None:
            self._expose(False)
        self.spool.close()
        if self.shipper is not None:
            try:
                self.shipper.close()  # signs a final checkpoint when it stores directly
            except Exception as exc:
                log.error("audit_sink_close_failed", error=type(exc).__name__)
        return drained

    def __enter__(self) -> AuditWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stopping.wait(self.fsync_interval):
            try:
                self.spool.sync()
            except OSError as exc:
                log.error("audit_spool_fsync_failed", error=exc.strerror)
