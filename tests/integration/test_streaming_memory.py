"""A 1,000,000-row result streams through the tap without the tap's memory
growing with the result.

The result (``SELECT g, repeat('x', 50) FROM generate_series(1, 1000000) g``)
is about 70 MB on the wire in text format (1M DataRow messages of ~70 bytes),
more as Python objects. The server sends it as one Execute; the client reads it
incrementally. While it flows, a thread samples the resident set size of the
tap process (pid from the stack). A tap that collects the result, or reads
from PostgreSQL faster than the client drains it without limit, grows by at
least the size of the result; one that forwards as it goes stays flat.

Bound: peak RSS growth < 50 MB, i.e. under ~70% of the result's wire size.
Generous for allocator noise and per-session buffers (a few MB), yet any
whole-result buffering fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

pytestmark = pytest.mark.integration

ROWS = 1_000_000
QUERY = f"SELECT g, repeat('x', 50) FROM generate_series(1, {ROWS}) g"
# The result really is this large on the wire: ~67 MiB as DataRows, ~60 MiB as
# CopyData (the bound leaves room for either and stays above MAX_GROWTH_BYTES).
MIN_RESULT_BYTES = 57 * 1024 * 1024
MAX_GROWTH_BYTES = 50 * 1024 * 1024


def _rss(process: psutil.Process) -> int:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return int(total)


class RssSampler:
    """Samples a process's RSS every few milliseconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss(self.process))
            self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.baseline = min(_rss(self.process) for _ in range(3))
        self.peak = self.baseline
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, _rss(self.process))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@contextmanager
def sampling(stack: Any, mode: str) -> Iterator[RssSampler]:
    pid = stack.tap_pids[mode]
    sampler = RssSampler(pid)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()
    assert psutil.pid_exists(pid), f"the {mode} tap died while streaming"


def data_row_size(g: int, text: str) -> int:
    """Wire size of the DataRow: type, length, field count, two length-prefixed values."""
    return 1 + 4 + 2 + 4 + len(str(g)) + 4 + len(text)


def _assert_bounded(sampler: RssSampler, mode: str, received: int) -> None:
    print(
        f"{mode}: {received / 2**20:.1f} MB through, tap RSS growth "
        f"{sampler.growth / 2**20:.1f} MB over {sampler.baseline / 2**20:.1f} MB"
    )
    assert received > MIN_RESULT_BYTES, f"only {received} bytes came through"
    assert sampler.samples > 10, "too few RSS samples to judge"
    assert sampler.growth < MAX_GROWTH_BYTES, (
        f"the {mode} tap's RSS grew by {sampler.growth / 2**20:.1f} MB "
        f"(baseline {sampler.baseline / 2**20:.1f} MB) while {received / 2**20:.1f} MB "
        "streamed through: it buffers the result"
    )


@pytest.fixture
def conn(stack: Any, mode: str) -> Iterator[psycopg.Connection[Any]]:
    # Plain TCP: TLS adds nothing to what this measures and costs CPU.
    dsn = make_conninfo(stack.gateway_dsn[mode], sslmode="disable")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT 1")  # session fully set up before the baseline
        yield c


def _stream(conn: psycopg.Connection[Any], on_row: Callable[[int], None] | None = None) -> int:
    """Consume the query with libpq's chunked/single-row mode; return the
    result's wire size and check every row arrived in order."""
    received = 0
    expected = 1
    with conn.cursor() as cur:
        for g, text in cur.stream(QUERY, size=1000):
            assert g == expected
            expected += 1
            received += data_row_size(g, text)
            if on_row is not None:
                on_row(g)
    assert expected - 1 == ROWS
    return received


def test_streamed_result_does_not_grow_tap_memory(
    stack: Any, mode: str, conn: psycopg.Connection[Any]
) -> None:
    with sampling(stack, mode) as sampler:
        received = _stream(conn)
    _assert_bounded(sampler, mode, received)
    assert conn.execute("SELECT 'after the big result'").fetchone() == ("after the big result",)


def test_slow_consumer_does_not_grow_tap_memory(stack: Any, mode: str, conn: psycopg.Connection[Any]) -> None:
    """The client stops reading after 10,000 rows for two seconds. The tap must
    then stop reading from PostgreSQL (backpressure) instead of queueing the
    rest of the result in memory."""

    def pause(g: int) -> None:
        if g == 10_000:
            time.sleep(2.0)

    with sampling(stack, mode) as sampler:
        received = _stream(conn, on_row=pause)
    _assert_bounded(sampler, mode, received)


def test_copy_out_does_not_grow_tap_memory(stack: Any, mode: str, conn: psycopg.Connection[Any]) -> None:
    received = 0
    lines = 0
    with sampling(stack, mode) as sampler:
        with conn.cursor().copy(f"COPY ({QUERY}) TO STDOUT") as copy:
            while data := copy.read():
                received += 5 + len(data)  # one CopyData message per row
                lines += bytes(data).count(b"\n")
    assert lines == ROWS
    _assert_bounded(sampler, mode, received)


def test_named_cursor_fetch_through_the_tap(stack: Any, mode: str, conn: psycopg.Connection[Any]) -> None:
    """A server-side cursor over the same result (FETCH in batches of 5000)
    delivers every row; memory stays flat here too."""
    received = 0
    count = 0
    with sampling(stack, mode) as sampler:
        with conn.transaction(), conn.cursor(name="big") as cur:
            cur.itersize = 5000
            cur.execute(QUERY)
            for g, text in cur:
                count += 1
                received += data_row_size(g, text)
                assert g == count
    assert count == ROWS
    _assert_bounded(sampler, mode, received)
