"""The local spool: an append-only JSONL file every event goes to first.

``append`` returns once the lines are in the kernel (one ``write()``), so a
``kill -9`` of the process afterwards loses nothing. ``fsync`` runs in groups
(every ``fsync_interval`` seconds, from the writer's flusher thread), which
bounds what a machine crash or power loss can lose to the events appended in
the last interval. The writer reads the spool back in order and stores it;
once everything is stored the file is compacted (rewritten to a one-line
header that keeps the numbering) so it does not grow without bound.

Line format: ``{"n": <spool number>, "e": <event JSON>}``; a compacted file
starts with ``{"base": <last number stored>}``. A torn last line (the process
died inside ``write()``) is cut off on open: its ``append`` never returned.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SpoolError(Exception):
    """The spool cannot take the events (disk full, I/O error, over its bound)."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    n: int
    event: dict[str, Any]
    end: int  # file offset just after this line


class Spool:
    def __init__(self, path: Path, *, max_bytes: int = 1 << 30) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # Held around fsync and compaction only, so appends never wait for a
        # disk flush while compaction never closes a descriptor being synced.
        self._sync_lock = threading.Lock()
        self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        # One writer per spool: two would number events twice. The lock lives
        # in a side file because compaction replaces the spool file itself;
        # the kernel drops it when the process dies, even by kill -9.
        self._lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise SpoolError(f"spool {path} is in use by another process") from exc
        self.base_n, self.last_n, self.size = self._recover()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._read_off = 0
        self._read_n = 0

    def _recover(self) -> tuple[int, int, int]:
        """Scan the file: base number, last number, size after cutting a torn tail."""
        if not self.path.exists():
            return 0, 0, 0
        base = last = 0
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                obj = json.loads(line)
                if "base" in obj:
                    base = last = int(obj["base"])
                else:
                    last = int(obj["n"])
                good += len(line)
        if good != self.path.stat().st_size:
            os.truncate(self.path, good)
        return base, last, good

    def append(self, events_json: list[str]) -> tuple[int, int]:
        """Append events (already JSON text); return their first and last number."""
        with self._lock:
            first = self.last_n + 1
            parts = [f'{{"n":{first + i},"e":{text}}}\n' for i, text in enumerate(events_json)]
            data = "".join(parts).encode()
            if self.size + len(data) > self.max_bytes:
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
            return first, self.last_n

    def sync(self) -> None:
        """fsync if anything was appended since the last call."""
        with self._sync_lock:
            with self._lock:
                if not self._dirty:
                    return
                self._dirty = False
                fd = self._fd
            os.fsync(fd)

    def read(self, after_n: int, limit: int) -> list[SpoolEntry]:
        """Up to ``limit`` complete entries numbered above ``after_n``, in order."""
        with self._lock:
            size = self.size
            if after_n < self._read_n:
                self._read_off, self._read_n = 0, 0
        out: list[SpoolEntry] = []
        with open(self.path, "rb") as f:
            f.seek(self._read_off)
            off = self._read_off
            while len(out) < limit and off < size:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                off += len(line)
                obj = json.loads(line)
                if "base" in obj:
                    continue
                n = int(obj["n"])
                if n <= after_n:
                    self._read_off, self._read_n = off, n
                    continue
                out.append(SpoolEntry(n, obj["e"], off))
        return out

    def advance(self, entry: SpoolEntry) -> None:
        """Remember that everything up to ``entry`` is stored (read cursor)."""
        self._read_off, self._read_n = entry.end, entry.n

    def compact(self, stored_n: int, min_bytes: int) -> bool:
        """Rewrite the spool to a header line once every entry is stored."""
        with self._sync_lock, self._lock:
            if stored_n != self.last_n or self.size < min_bytes:
                return False
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            header = f'{{"base":{stored_n}}}\n'.encode()
            try:
                os.write(fd, header)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o600)
            self.size = len(header)
            self.base_n = stored_n
            self._read_off, self._read_n = 0, 0
            self._dirty = False
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                os.close(self._lock_fd)
                self._fd = -1
