"""Where the governed gateway's CPU goes, per transaction, process by process.

Throughput on this 2-core machine is bounded by the CPU every process on the
path spends per transaction (the tap, policyd storing the audit events, the
agents' Envoy, PostgreSQL, pgbench itself). This brings up the same stack as
``make bench``'s governed phase, runs the governed point read
(``pgbench -M prepared -c 8 -j 2``, token over TLS, policy, masking and audit
on) through each tap, and divides each process's CPU time (user + system,
from /proc via psutil) by the transactions pgbench completed; PostgreSQL's
backends (born and gone with pgbench's connections), pgbench and the kernel
are the machine's busy time minus those processes.

    .venv/bin/python bench/cpu_per_txn.py [--seconds 8] [--rounds 2] [--modes inline,extproc,envoy_tcp]
    .venv/bin/python bench/cpu_per_txn.py --floor    # the TLS pipe floor instead

``envoy_tcp`` is make bench's baseline (PostgreSQL and libpq do the TLS);
``--floor`` divides the same way for bench/floors.py's TLS pipe (echo_tap.py
ending the client's TLS and opening its own, behind the agents' Envoy):
what a gateway that reads the bytes costs before it does any work.

It prints one line per process and round; nothing is written. Figures from
it are quoted, with the date, in bench/RESULTS.md ("Where the time goes").
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
import psycopg  # noqa: E402
import run as bench_run  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from pgwarden import stack as st  # noqa: E402
from pgwarden.devissuer import ensure_dev_keys  # noqa: E402

DSN_KEYS = {"inline": "PGWARDEN_AGENT_DSN", "extproc": "PGWARDEN_AGENT_EXTPROC_DSN"}
FLOOR_DB = "pgwarden_cpu_floor"


def _label(proc: psutil.Process) -> str:
    cmd = proc.cmdline()
    text = " ".join(cmd)
    if "policyd.cli" in text:
        return "policyd"
    if "echo_tap.py" in text:
        return "echo_tap " + ("inline" if "inline" in cmd else "extproc")
    if "envoy" in Path(cmd[0]).name:
        return "envoy (agents)" if "envoy-agent" in text else "envoy"
    if "postgres" in Path(cmd[0]).name or "postgres:" in text:
        return "postgresql"
    for word in ("inline", "extproc", "console", "maskd"):
        if word in cmd:
            return f"tap {word}" if word in DSN_KEYS else word
    return Path(cmd[0]).name


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def measure(label: str, dsn: str, pgbench_args: list[str], workdir: Path) -> bool:
    """Run pgbench on ``dsn`` and print each process's CPU per transaction."""
    me = psutil.Process()
    procs = [p for p in psutil.process_iter() if p.pid != me.pid
             and _safe_is_ours(p, str(workdir))]
    before = {p.pid: _cpu(p) for p in procs}
    machine = psutil.cpu_times()
    run = bench_run.pgbench(pgbench_args, dsn, timeout=600)
    found = re.search(r"number of transactions actually processed: (\d+)", run.stdout)
    if not found:
        print(f"{label}: pgbench failed: {run.stderr.strip()[-300:]}")
        return False
    after = psutil.cpu_times()
    busy = sum(getattr(after, f) - getattr(machine, f) for f in after._fields
               if f not in ("idle", "iowait", "guest", "guest_nice"))
    n = int(found.group(1))
    tps, _ = bench_run.parse(run.stdout)
    totals: dict[str, float] = {}
    for p in procs:
        name = _label(p)
        totals[name] = totals.get(name, 0.0) + _cpu(p) - before[p.pid]
    print(f"{label}: {tps:.0f} tps, CPU µs per transaction:")
    for name, spent in sorted(totals.items(), key=lambda kv: -kv[1]):
        if spent > 0:
            print(f"    {name:<16} {spent / n * 1e6:8.0f}")
    rest = busy - sum(totals.values())
    print(f"    {'the rest':<16} {rest / n * 1e6:8.0f}  (PostgreSQL backends, pgbench, "
          "kernel: the machine's busy time minus the processes above)")
    print(f"    {'machine':<16} {busy / n * 1e6:8.0f}", flush=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="inline,extproc",
                        help="inline, extproc and/or envoy_tcp (the baseline, PostgreSQL doing TLS)")
    parser.add_argument("--floor", action="store_true",
                        help="instead: bench/echo_tap.py's TLS pipe in the inline tap's place "
                             "(pgbench -S -M prepared, TLS both legs) and Envoy tcp_proxy")
    args = parser.parse_args()
    if args.floor:
        return floor(args.seconds, args.rounds)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-cpu-"))
    script = workdir / "point_read.sql"
    script.write_text(bench_run.POINT_READ)
    with st.running_stack(workdir, pg_settings=bench_run.QUIET_PG) as stack:
        token = ensure_dev_keys(stack.workdir / "identity").mint(
            "bench-agent", groups=("fraud-readers",), ttl=7200)
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                if mode == "envoy_tcp":
                    dsn = make_conninfo(stack.dsn(stack.ports["envoy_tcp"], user="fraud_reader"),
                                        sslmode="require",
                                        password=stack.passwords["fraud_reader"])
                else:
                    dsn = make_conninfo("", **{**conninfo_to_dict(stack.extra_env[DSN_KEYS[mode]]),
                                               "password": token, "sslmode": "require"})
                if not measure(f"round {rnd + 1} {mode}", dsn,
                               ["-n", "-M", "prepared", "-f", str(script), "-c", "8", "-j", "2",
                                "-T", str(args.seconds)], workdir):
                    return 1
    return 0


def floor(seconds: int, rounds: int) -> int:
    """The same division for the TLS floor of bench/floors.py: a process
    that only ends the client's TLS, opens its own to PostgreSQL and pipes
    the bytes, behind the agents' Envoy, against tcp_proxy with TLS."""
    os.environ["PGWARDEN_TAP_COMMAND"] = shlex.join([sys.executable, str(HERE / "echo_tap.py")])
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-cpu-floor-"))
    try:
        with st.running_stack(workdir, pg_settings=bench_run.QUIET_PG, services=False) as stack:
            with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {} OWNER app").format(
                    sql.Identifier(FLOOR_DB)))
            dsns = {k: make_conninfo(v, dbname=FLOOR_DB) for k, v in (
                ("envoy_tcp", stack.envoy_tcp_dsn), ("inline", stack.gateway_dsn["inline"]),
                ("direct", stack.app_dsn_direct))}
            init = bench_run.pgbench(["-i", "-q", "-s", "1"], dsns.pop("direct"), timeout=600)
            if init.returncode != 0:
                print(init.stderr[-500:])
                return 1
            for rnd in range(rounds):
                for target, dsn in dsns.items():
                    label = "tls pipe (echo_tap.py)" if target == "inline" else target
                    if not measure(f"round {rnd + 1} {label}", make_conninfo(dsn, sslmode="require"),
                                   ["-S", "-n", "-M", "prepared", "-c", "8", "-j", "2",
                                    "-T", str(seconds)], workdir):
                        return 1
    finally:
        os.environ.pop("PGWARDEN_TAP_COMMAND", None)
    return 0


def _safe_is_ours(proc: psutil.Process, workdir: str) -> bool:
    """The stack's processes: their command line or (PostgreSQL backends)
    their parent's names the stack's work directory."""
    try:
        if workdir in " ".join(proc.cmdline()):
            return True
        parent = proc.parent()
        return parent is not None and workdir in " ".join(parent.cmdline())
    except psutil.Error:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
