"""What one Python hop costs a single client, before any protocol work.

Issue 2 asks for at most 0.1 ms of latency added over direct PostgreSQL by the
inline gateway (Envoy in front of the tap). This measures, interleaved in one
run, ``pgbench -S -n -c 1`` against:

* ``direct``: PostgreSQL;
* ``bare_pipe``: a bare uvloop byte pipe (no framing, nothing inspected) to
  PostgreSQL, ``bench/echo_tap.py inline``: the floor for any Python process
  on the path;
* ``tap_inline``: the inline tap itself, without Envoy;
* ``envoy_tcp``: Envoy tcp_proxy alone;
* ``gateway_inline``: Envoy in front of the inline tap (what ``make bench`` reports).

    .venv/bin/python bench/latency_floor.py [--seconds 8] [--rounds 3]

Prints the median latency per target and what each adds over direct; nothing
is written. Figures are quoted, with the date, in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import run as bench_run  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from pgwarden import stack as st  # noqa: E402

DB = "pgwarden_floor"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-floor-"))
    with st.running_stack(workdir, pg_settings=bench_run.QUIET_PG, services=False) as stack:
        with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER app").format(sql.Identifier(DB)))
        port = st.free_port()
        pipe = subprocess.Popen([sys.executable, str(HERE / "echo_tap.py"), "inline",
                                 "--listen", f"127.0.0.1:{port}",
                                 "--upstream", f"127.0.0.1:{stack.postgres.port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_wait_port(port))
            targets = {
                "direct": stack.app_dsn_direct,
                "bare_pipe": stack.dsn(port),
                "tap_inline": stack.dsn(stack.ports["tap_inline"]),
                "envoy_tcp": stack.envoy_tcp_dsn,
                "gateway_inline": stack.gateway_dsn["inline"],
            }
            targets = {k: make_conninfo(v, dbname=DB, sslmode="disable")
                       for k, v in targets.items()}
            init = bench_run.pgbench(["-i", "-q", "-s", "1"], targets["direct"], timeout=600)
            if init.returncode != 0:
                print(init.stderr[-500:])
                return 1
            samples: dict[str, list[float]] = {t: [] for t in targets}
            names = list(targets)
            for rnd in range(args.rounds):
                for target in names[rnd % len(names):] + names[:rnd % len(names)]:
                    run = bench_run.pgbench(["-S", "-n", "-c", "1", "-T", str(args.seconds)],
                                            targets[target],
                                            timeout=args.seconds * 4 + 60)
                    try:
                        samples[target].append(bench_run.parse(run.stdout)[1])
                    except ValueError:
                        print(f"{target}: pgbench failed: {run.stderr.strip()[-300:]}")
                        return 1
        finally:
            pipe.terminate()
            pipe.wait(timeout=10)
    direct = statistics.median(samples["direct"])
    for target, values in samples.items():
        ms = statistics.median(values)
        print(f"{target:<16} {ms:.3f} ms  (+{ms - direct:.3f} ms over direct)")
    return 0


async def _wait_port(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError("the bare pipe did not start")


if __name__ == "__main__":
    raise SystemExit(main())
