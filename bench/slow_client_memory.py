"""What one large result costs Envoy and the tap in memory, per mode.

A client streams ``SELECT g, repeat('x', 50) FROM generate_series(1, N) g``
(about 70 bytes a row on the wire) through each path, once reading as fast as
it can and once pausing for ``--pause`` seconds after the first 10,000 rows
(a slow agent). Meanwhile the resident set size of Envoy and of the tap that
serves the path is sampled every 50 ms; the peak growth over the value before
the query is printed.

    .venv/bin/python bench/slow_client_memory.py [--rows 4000000] [--pause 8]
        [--max-result-bytes N]

Each measurement runs on a stack of its own, so that memory an allocator kept
from an earlier run does not hide growth. With ``--max-result-bytes`` the taps
run with that limit: the result is cut there (SQLSTATE 54000, the session
ends); ``envoy_tcp`` has no tap and streams the whole result.

* ``envoy_tcp`` (tcp_proxy alone) shows Envoy's own back-pressure: its
  downstream write buffer passes its limit, tcp_proxy stops reading from
  PostgreSQL, and the result waits in PostgreSQL's socket.
* ``inline`` (Envoy, then the asyncio tap): the tap stops reading from
  PostgreSQL while its write buffer to Envoy is above its limit.
* ``extproc``: Envoy's network ext_proc filter sends each chunk it reads from
  PostgreSQL to the tap and has no flow control on that side stream, so Envoy
  keeps reading while the tap or the client lags and holds the difference.

Nothing is written; figures are quoted, with the date, in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
import psycopg  # noqa: E402
import run as bench_run  # noqa: E402
from psycopg import errors  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from pgwarden import stack as st  # noqa: E402

MB = 2**20


class Peaks:
    """Peak RSS growth of a few processes, sampled in a background thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.base = {name: p.memory_info().rss for name, p in self.procs.items()}
        self.peak = dict(self.base)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], p.memory_info().rss)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return {name: (self.peak[name] - self.base[name]) / MB for name in self.procs}


def stream(dsn: str, rows: int, pause: float) -> tuple[int, float, bool]:
    """Rows received, seconds, and whether the gateway cut the result."""
    started = time.monotonic()
    count = 0
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            query = "SELECT g, repeat('x', 50) FROM generate_series(1, %s) g"
            for (g, _) in cur.stream(query, (rows,), size=1000):
                count += 1
                if pause and g == 10_000:
                    time.sleep(pause)
    except errors.ProgramLimitExceeded:
        return count, time.monotonic() - started, True
    return count, time.monotonic() - started, False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--pause", type=float, default=8.0)
    parser.add_argument("--max-result-bytes", type=int, default=None)
    args = parser.parse_args()
    extra = ["--max-result-bytes", str(args.max_result_bytes)] if args.max_result_bytes else []
    print(f"{args.rows} rows (~{args.rows * 70 / MB:.0f} MB on the wire); "
          f"peak RSS growth while it streams")
    for name in ("envoy_tcp", "inline", "extproc"):
        for label, pause in (("fast client", 0.0), (f"paused {args.pause:g}s", args.pause)):
            workdir = Path(tempfile.mkdtemp(prefix="pgwarden-slowclient-"))
            with st.running_stack(workdir, pg_settings=bench_run.QUIET_PG,
                                  extra_tap_args=extra) as stack:
                dsn = make_conninfo(stack.envoy_tcp_dsn if name == "envoy_tcp"
                                    else stack.gateway_dsn[name], sslmode="disable")
                stream(dsn, 1000, 0)  # session set-up and first-use costs out of the way
                pids = {"envoy": stack.procs["envoy"].pid}
                if name != "envoy_tcp":
                    pids["tap"] = stack.procs[f"tap-{name}"].pid
                peaks = Peaks(pids)
                count, seconds, cut = stream(dsn, args.rows, pause)
                growth = peaks.stop()
            if count != args.rows and not cut:
                print(f"{name}: only {count} of {args.rows} rows arrived")
                return 1
            shown = "  ".join(f"{proc} +{mb:6.1f} MB" for proc, mb in growth.items())
            ending = f"  cut at {count} rows (54000)" if cut else ""
            print(f"{name:<10} {label:<12} {seconds:5.1f} s  {shown}{ending}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
