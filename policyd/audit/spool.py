"""The local spool: append-only JSONL segment files every event goes to first.

``Spool.append`` returns once the lines are in the kernel (one ``write()``),
so a ``kill -9`` of the process afterwards loses nothing. ``fsync`` runs in
groups (every ``fsync_interval`` seconds, from the writer's flusher thread),
which bounds what a machine crash or power loss can lose to the events
appended in the last interval.

The spool is a series of segment files ``<path>.00000001``, ``...2``, ...
The appender writes only to the newest one and starts a new one past
``segment_bytes``; a :class:`SpoolReader` (in the same process, or in a
separate shipper process) reads them in order and deletes a segment once it
has been stored *and* a newer one exists. The appender therefore never writes
to a file that may be deleted, the reader never deletes a file still being
written, and the newest segment always survives to carry the numbering.

Line format: ``{"n": <spool number>, "e": <event JSON>}``; every segment
starts with ``{"base": <last number before it>}``. A torn last line (the
process died inside ``write()``) is cut off when the appender reopens: its
``append`` never returned. A plain file at ``<path>`` (the layout before
segments) is read first as segment 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any


class SpoolError(Exception):
    """The spool cannot take the events (disk full, I/O error, over its bound,
    or in use by another process)."""


class SpoolEntry:
    """One spooled event: its number, where its line ends, and the event,
    kept as the JSON text read from the spool (``raw``) and parsed only when
    a consumer asks for ``event``: shipping to policyd sends the text as
    it is, so the tap's shipper no longer parses and re-serialises it."""

    __slots__ = ("_event", "end", "n", "raw", "segment")

    def __init__(self, n: int, event: dict[str, Any] | None = None, segment: int = 0,
                 end: int = 0, raw: bytes | None = None) -> None:
        if event is None and raw is None:
            raise ValueError("a spool entry needs its event or its JSON text")
        self.n = n
        self._event = event
        self.segment = segment
        self.end = end  # offset just after this line in its segment
        self.raw = raw

    @property
    def event(self) -> dict[str, Any]:
        if self._event is None:
            assert self.raw is not None
            self._event = json.loads(self.raw)
        return self._event

    def __repr__(self) -> str:
        return f"SpoolEntry(n={self.n}, segment={self.segment}, end={self.end})"


_ENTRY_HEAD = b'{"n":'
_ENTRY_EVENT = b',"e":'


def _parse_line(line: bytes) -> tuple[int, bytes | None, dict[str, Any] | None]:
    """(number, event text, parsed object) of one spool line. Lines are
    written as ``{"n":N,"e":EVENT}`` by :meth:`Spool.append`: the event text
    is cut out without parsing it; anything else (the segment header) is
    parsed as JSON. Number -1 marks a line that is not an entry."""
    if line.startswith(_ENTRY_HEAD) and line.endswith(b"}\n"):
        cut = line.find(_ENTRY_EVENT, len(_ENTRY_HEAD))
        if cut > len(_ENTRY_HEAD) and line[len(_ENTRY_HEAD):cut].isdigit():
            return int(line[len(_ENTRY_HEAD):cut]), line[cut + len(_ENTRY_EVENT):-2], None
    obj = json.loads(line)
    if "base" in obj:
        return -1, None, None
    return int(obj["n"]), None, obj["e"]


def _segment_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index:08d}") if index else path


def list_segments(path: Path) -> list[int]:
    """Segment indexes present, oldest first (0 = a legacy single file)."""
    out = [0] if path.is_file() else []
    prefix = path.name + "."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            out.append(int(name[len(prefix) :]))
    return sorted(out)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise SpoolError(f"{path} is held by another process") from exc
    return fd


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Spool:
    """The appending side. One per spool path (an exclusive lock file)."""

    def __init__(
        self, path: Path, *, max_bytes: int = 1 << 30, segment_bytes: int = 16 << 20
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        # Held around fsync and segment roll only, so appends never wait for
        # a disk flush while a roll never closes a descriptor being synced.
        self._sync_lock = threading.Lock()
        self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        # One appender per spool: two would number events twice. The kernel
        # drops the lock when the process dies, even by kill -9.
        try:
            self._lock_fd = _lock(Path(str(path) + ".lock"))
        except SpoolError as exc:
            raise SpoolError(f"spool {path} is in use by another process") from exc
        segments = list_segments(path)
        if segments and segments[-1] != 0:
            self.segment = segments[-1]
            self.last_n, self.size = self._recover(_segment_path(path, self.segment))
            self._fd = os.open(
                _segment_path(path, self.segment), os.O_WRONLY | os.O_APPEND, 0o600
            )
        else:
            base = self._recover(path)[0] if segments else 0
            self.segment = 0
            self.last_n = base
            self._fd = -1
            self._new_segment()
        self._older = self._older_bytes()

    @staticmethod
    def _recover(seg: Path) -> tuple[int, int]:
        """Last number in a segment and its size after cutting a torn tail."""
        last = 0
        good = 0
        with open(seg, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                obj = json.loads(line)
                last = int(obj["base"]) if "base" in obj else int(obj["n"])
                good += len(line)
        if good != seg.stat().st_size:
            os.truncate(seg, good)
        return last, good

    def _older_bytes(self) -> int:
        total = 0
        for idx in list_segments(self.path):
            if idx != self.segment:
                try:
                    total += _segment_path(self.path, idx).stat().st_size
                except FileNotFoundError:
                    pass  # the reader removed it meanwhile
        return total

    def _new_segment(self) -> None:
        """Start the next segment with a header carrying the numbering."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
        self.segment += 1
        seg = _segment_path(self.path, self.segment)
        fd = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        header = f'{{"base":{self.last_n}}}\n'.encode()
        os.write(fd, header)
        os.fsync(fd)
        _fsync_dir(self.path.parent)
        self._fd = fd
        self.size = len(header)

    def append(self, events_json: list[str]) -> tuple[int, int]:
        """Append events (already JSON text); return their first and last number."""
        with self._lock:
            if self._fd < 0:
                raise SpoolError(f"spool {self.path} is closed")
            first = self.last_n + 1
            data = "".join(
                f'{{"n":{first + i},"e":{text}}}\n' for i, text in enumerate(events_json)
            ).encode()
            if self._older + self.size + len(data) > self.max_bytes:
                self._older = self._older_bytes()  # the reader may have freed some
                if self._older + self.size + len(data) > self.max_bytes:
                    raise SpoolError(
                        f"spool {self.path} would exceed its bound of {self.max_bytes} bytes"
                    )
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:
                raise SpoolError(f"cannot write spool {self.path}: {exc.strerror}") from exc
            self.size += len(data)
            self.last_n = first + len(events_json) - 1
            self._dirty = True
        if self.size >= self.segment_bytes:
            self._roll()
        return first, first + len(events_json) - 1

    def _roll(self) -> None:
        with self._sync_lock, self._lock:
            if self.size < self.segment_bytes:
                return
            old = self.size
            try:
                self._new_segment()
            except OSError:
                # The events are already written; keep appending to the
                # current segment and try again on the next append.
                return
            self._older += old
            self._dirty = False

    def first_base(self) -> int:
        """The number just before the oldest event still in the spool
        (the oldest segment's header; 0 for a legacy file)."""
        for idx in list_segments(self.path):
            if idx == 0:
                return 0
            try:
                with open(_segment_path(self.path, idx), "rb") as fh:
                    head = json.loads(fh.readline())
            except (FileNotFoundError, ValueError):
                continue  # removed by the reader meanwhile, or torn
            return int(head.get("base", 0))
        return self.last_n

    def sync(self) -> None:
        """fsync if anything was appended since the last call."""
        with self._sync_lock:
            with self._lock:
                if not self._dirty or self._fd < 0:
                    return
                self._dirty = False
                fd = self._fd
            os.fsync(fd)

    def close(self) -> None:
        with self._sync_lock, self._lock:
            if self._fd < 0:
                return
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                os.close(self._lock_fd)
                self._fd = -1


class SpoolReader:
    """The reading side: entries in order, segments deleted once stored.

    One per spool (its own lock file), in the writer's process or in a
    separate ``pgwarden audit ship`` process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd = _lock(Path(str(path) + ".reader.lock"))
        except SpoolError as exc:
            raise SpoolError(f"spool {path} already has a reader") from exc
        self._seg: int | None = None  # committed cursor: segment and offset
        self._off = 0

    def read(self, after_n: int, limit: int) -> list[SpoolEntry]:
        """Up to ``limit`` complete entries numbered above ``after_n``, in
        order, from the committed cursor on."""
        out: list[SpoolEntry] = []
        segments = list_segments(self.path)
        if not segments:
            return out
        seg = self._seg if self._seg in segments else None
        off = self._off if seg is not None else 0
        if seg is None:
            older = [s for s in segments if self._seg is None or s > self._seg]
            if not older:
                return out
            seg = older[0]
        while len(out) < limit:
            # A newer segment existing means this one is complete: the
            # appender only starts a segment after its last write to the
            # previous one. So check first, then read to the end.
            newer = [s for s in list_segments(self.path) if s > seg]
            try:
                f = open(_segment_path(self.path, seg), "rb")
            except FileNotFoundError:
                if not newer:
                    break
                seg, off = newer[0], 0
                continue
            with f:
                f.seek(off)
                while len(out) < limit:
                    line = f.readline()
                    if not line.endswith(b"\n"):
                        break
                    off += len(line)
                    n, raw, event = _parse_line(line)
                    if n <= after_n:  # also the segment header (-1)
                        continue
                    out.append(SpoolEntry(n, event, seg, off, raw))
                at_end = len(out) < limit
            if at_end and newer:
                seg, off = newer[0], 0
                continue
            break
        return out

    def advance(self, entry: SpoolEntry) -> None:
        """Everything up to ``entry`` is stored: move the cursor and delete
        segments that are now fully stored."""
        self._seg, self._off = entry.segment, entry.end
        for idx in list_segments(self.path):
            if idx < entry.segment:
                try:
                    _segment_path(self.path, idx).unlink()
                except FileNotFoundError:
                    pass

    def pending_bytes(self) -> int:
        """Bytes of the spool after the committed cursor: what is not yet
        stored (segment headers included). From the files, for a gauge."""
        total = 0
        for idx in list_segments(self.path):
            if self._seg is not None and idx < self._seg:
                continue
            try:
                size = _segment_path(self.path, idx).stat().st_size
            except FileNotFoundError:
                continue  # deleted meanwhile: stored
            total += size - self._off if idx == self._seg else size
        return max(total, 0)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
