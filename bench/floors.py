"""What the taps add over a Python process that does no protocol work.

Runs the local stack (no services) twice per round, once with the real
taps and once with bench/echo_tap.py in their place (an ext_proc echo and a
bare uvloop byte pipe, started through ``PGWARDEN_TAP_COMMAND``), behind the
same Envoy configurations, and measures ``pgbench -S -n`` with one client
(latency) and with ``-c 8 -j 2`` (throughput) against direct PostgreSQL and
Envoy tcp_proxy alone and both gateways:

    .venv/bin/python bench/floors.py [--seconds 6] [--rounds 2]

With TLS on both legs (``tls_c8``, ``tls_c1``: ``pgbench -S -n -M prepared``,
client ``sslmode=require``) it also measures what terminating an encrypted
session costs, against Envoy tcp_proxy with PostgreSQL doing the TLS: the
echo's pipe then terminates the client's TLS and opens its own to PostgreSQL
(the shape of the governed gateway, none of its work), while the data-path
tap terminates only the client's (its upstream leg is plaintext here). The
ext_proc echo has no TLS of its own and is left out of these two.

Prints medians per target; nothing is written. Figures are quoted, with the
date, in bench/RESULTS.md. Issue 2 calibrates its targets with the same two
floors (a bare uvloop pipe behind Envoy 0.50 of tcp_proxy, a bare Python
ext_proc echo 0.22).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import run as bench_run  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from pgwarden import stack as st  # noqa: E402

DB = "pgwarden_floors"
TARGETS = ("direct", "envoy_tcp", "inline", "extproc")
# The shape of make bench's masked fetch (200,000 rows of id, card number,
# cardholder, amount), here unmasked: what moving the rows alone costs.
FETCH_SETUP = ("CREATE TABLE rows_out AS SELECT i AS id, "
               "lpad((4000000000000000 + i * 7919)::text, 16, '0') AS card_number, "
               "'Cardholder ' || i AS cardholder, (i % 50000)::numeric(12, 2) AS amount "
               "FROM generate_series(1, 3000) i")
KINDS = (("c1", ["-c", "1"]), ("c8", ["-c", "8", "-j", "2"]),
         ("tls_c1", ["-M", "prepared", "-c", "1"]),
         ("tls_c8", ["-M", "prepared", "-c", "8", "-j", "2"]))
TLS_TARGETS = ("envoy_tcp", "inline")
FETCH = "SELECT id, card_number, cardholder, amount FROM rows_out, generate_series(1, 67) g LIMIT 200000"


def one_stack(label: str, seconds: int, samples: dict[tuple[str, str, str], list[float]]) -> None:
    if label == "echo":
        os.environ["PGWARDEN_TAP_COMMAND"] = shlex.join([sys.executable,
                                                         str(HERE / "echo_tap.py")])
    else:
        os.environ.pop("PGWARDEN_TAP_COMMAND", None)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-floors-"))
    try:
        with st.running_stack(workdir, pg_settings=bench_run.QUIET_PG, services=False) as stack:
            with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {} OWNER app").format(sql.Identifier(DB)))
            dsns = {
                "direct": stack.app_dsn_direct,
                "envoy_tcp": stack.envoy_tcp_dsn,
                "inline": stack.gateway_dsn["inline"],
                "extproc": stack.gateway_dsn["extproc"],
            }
            dsns = {k: make_conninfo(v, dbname=DB, sslmode="disable") for k, v in dsns.items()}
            init = bench_run.pgbench(["-i", "-q", "-s", "1"], dsns["direct"], timeout=600)
            if init.returncode != 0:
                raise RuntimeError(init.stderr[-500:])
            with psycopg.connect(dsns["direct"], autocommit=True) as conn:
                conn.execute(FETCH_SETUP)
            tls = {k: make_conninfo(v, sslmode="require") for k, v in dsns.items()}
            for target in TARGETS:
                for kind, opts in KINDS:
                    if kind.startswith("tls") and target not in TLS_TARGETS:
                        continue
                    dsn = tls[target] if kind.startswith("tls") else dsns[target]
                    run = bench_run.pgbench(["-S", "-n", *opts, "-T", str(seconds)],
                                            dsn, timeout=seconds * 4 + 60)
                    tps, ms = bench_run.parse(run.stdout)
                    samples.setdefault((label, target, kind), []).append(
                        ms if kind.endswith("c1") else tps)
                    print(f"[floors] {label} {target} {kind}: {tps:.0f} tps, {ms:.3f} ms",
                          flush=True)
                with psycopg.connect(dsns[target]) as conn:
                    started = time.perf_counter()
                    got = len(conn.execute(FETCH).fetchall())
                    took = time.perf_counter() - started
                if got != 200_000:
                    raise RuntimeError(f"{label} {target}: fetched {got} rows")
                samples.setdefault((label, target, "fetch"), []).append(took)
                print(f"[floors] {label} {target} fetch: {took:.2f} s", flush=True)
    finally:
        os.environ.pop("PGWARDEN_TAP_COMMAND", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    samples: dict[tuple[str, str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for label in (("tap", "echo") if rnd % 2 == 0 else ("echo", "tap")):
            one_stack(label, args.seconds, samples)
    for label in ("tap", "echo"):
        direct = statistics.median(samples[(label, "direct", "c1")])
        for target in TARGETS:
            ms = statistics.median(samples[(label, target, "c1")])
            tps = statistics.median(samples[(label, target, "c8")])
            print(f"{label:<5} {target:<8} c1 {ms:.3f} ms (+{ms - direct:.3f} over direct)  "
                  f"c8 {tps:.0f} tps")
    def vs_tcp(target: str, kind: str) -> tuple[float, float]:
        """(tap, floor) of ``kind`` through ``target`` as ratios to tcp_proxy
        (its samples of both stacks together)."""
        tcp = statistics.median(samples[("tap", "envoy_tcp", kind)]
                                + samples[("echo", "envoy_tcp", kind)])
        return (statistics.median(samples[("tap", target, kind)]) / tcp,
                statistics.median(samples[("echo", target, kind)]) / tcp)

    for target in ("inline", "extproc"):
        tap, echo = vs_tcp(target, "c8")
        print(f"{target}: c8 throughput vs envoy_tcp: tap {tap:.2f}, floor {echo:.2f};"
              f" tap / floor {tap / echo:.2f}")
        tap, echo = vs_tcp(target, "fetch")
        print(f"{target}: 200,000-row fetch vs envoy_tcp: tap (unmasked) {tap:.2f}x,"
              f" floor {echo:.2f}x")
    tap, echo = vs_tcp("inline", "tls_c8")
    print(f"inline with TLS: c8 throughput vs envoy_tcp with TLS: tap (client leg only) "
          f"{tap:.2f}, floor (both legs) {echo:.2f}")
    tcp = statistics.median(samples[("tap", "envoy_tcp", "tls_c1")]
                            + samples[("echo", "envoy_tcp", "tls_c1")])
    for label in ("tap", "echo"):
        ms = statistics.median(samples[(label, "inline", "tls_c1")])
        print(f"{label:<5} inline with TLS: c1 {ms:.3f} ms (+{ms - tcp:.3f} over envoy_tcp "
              f"with TLS)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
