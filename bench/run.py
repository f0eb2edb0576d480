"""`make bench`: what the gateway costs, measured against the alternatives in one run.

Brings up its own stack (pgwarden.stack, in a temporary directory) plus a
pgbouncer in session mode, initialises a pgbench database once
(``pgbench -i -s SCALE``), then runs interleaved rounds of

* ``pgbench -S -n -c 8 -j 2 -T SECONDS``  (throughput, tps)
* ``pgbench -S -n -c 1 -T SECONDS``       (per-statement latency, ms)

against ``direct`` (PostgreSQL), ``envoy_tcp`` (Envoy tcp_proxy, the baseline),
``pgbouncer``, ``gateway_inline`` and ``gateway_extproc``. The order of the
targets rotates every round so slow drifts of this shared machine hit every
target alike; the medians go to bench/results.json and a table with ratios to
``envoy_tcp`` between markers in bench/RESULTS.md (other sections are kept).

Client TLS is off on every path (``sslmode=disable``) so the comparison is
about the proxying, not about who terminates TLS. Server statement logging is
off for the same reason (the test stack logs every statement).

Knobs: BENCH_SECONDS (15), BENCH_ROUNDS (3), BENCH_SCALE (10), BENCH_OUT
(output folder, default bench/). ``BENCH_SECONDS=3 BENCH_ROUNDS=1`` is a smoke run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgwarden import stack as st

HERE = Path(__file__).resolve().parent
TARGETS = ("direct", "envoy_tcp", "pgbouncer", "gateway_inline", "gateway_extproc")
BASELINE = "envoy_tcp"
BEGIN = "<!-- bench:pgbench:begin (written by bench/run.py; edit outside the markers) -->"
END = "<!-- bench:pgbench:end -->"
BENCH_DB = "bench"


def start_pgbouncer(stack: st.LocalStack, workdir: Path) -> tuple[st.Proc, int]:
    """pgbouncer in session mode in front of the bench database, SCRAM with a
    userlist generated from the app password (file 0600, owned by the user
    pgbouncer runs as)."""
    user = st.service_user()
    home = st.service_home(workdir, "pgbouncer")
    port = st.free_port()
    userlist = home / "userlist.txt"
    userlist.write_text(f'"app" "{stack.passwords["app"]}"\n')
    os.chmod(userlist, 0o600)
    ini = home / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{BENCH_DB} = host={st.HOST} port={stack.postgres.port} dbname={BENCH_DB}\n"
        "[pgbouncer]\n"
        f"listen_addr = {st.HOST}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {userlist}\n"
        "pool_mode = session\n"
        "max_client_conn = 200\n"
        "default_pool_size = 20\n"
        "client_tls_sslmode = disable\n"
        "server_tls_sslmode = disable\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        for path in (userlist, ini):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    proc = st.spawn("pgbouncer", [exe, str(ini)], workdir / "pgbouncer.log", user=user, cwd=home)
    try:
        st.wait_for_port(port, proc=proc)
    except st.StackError:
        st.stop(proc)
        raise
    return proc, port


def pgbench(args: Sequence[str], dsn: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(["pgbench", *args, dsn], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def parse(output: str) -> tuple[float, float]:
    """(tps, average latency in ms) from pgbench's report."""
    tps = re.search(r"^tps = ([\d.]+)", output, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", output, re.M)
    if not tps or not lat:
        raise ValueError("no tps/latency in pgbench output")
    return float(tps.group(1)), float(lat.group(1))


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}"


def render_table(results: dict[str, dict[str, float | None]], meta: dict[str, object]) -> str:
    tps = results["pgbench_select_c8_tps"]
    lat = results["pgbench_select_c1_latency_ms"]
    lines = [
        BEGIN,
        "## pgbench select-only: gateway vs. alternatives",
        "",
        f"Measured {meta['date']} on this machine ({os.cpu_count()} cores, shared), "
        f"{meta['rounds']} interleaved rounds of {meta['seconds']} s, medians; "
        f"scale {meta['scale']}, client TLS off. Command: `{meta['command']}`",
        "",
        f"Runs: `{meta['c8']}` and `{meta['c1']}`.",
        "",
        "| target | tps, -c 8 -j 2 | tps vs envoy_tcp | latency ms, -c 1 | latency vs envoy_tcp |",
        "|---|---:|---:|---:|---:|",
    ]
    for target in TARGETS:
        t, lt = tps.get(target), lat.get(target)
        lines.append(
            f"| {target} | {f'{t:.0f}' if t is not None else 'failed'} | "
            f"{ratio(t, tps.get(BASELINE))} | "
            f"{f'{lt:.3f}' if lt is not None else 'failed'} | {ratio(lt, lat.get(BASELINE))} |"
        )
    lines += ["", "Ratios are measured in this one run; absolute numbers drift with the "
              "machine's other load.", END]
    return "\n".join(lines)


def write_markdown(path: Path, table: str) -> None:
    if path.is_file():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            path.write_text(head + table + tail)
            return
        path.write_text(text.rstrip("\n") + "\n\n" + table + "\n")
        return
    path.write_text("# Benchmark results\n\n" + table + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pgbench through every path (see docstring)")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 15)))
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)))
    parser.add_argument("--scale", type=int, default=int(os.environ.get("BENCH_SCALE", 10)))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("BENCH_OUT", HERE)))
    args = parser.parse_args(argv)
    command = (f"BENCH_SECONDS={args.seconds} BENCH_ROUNDS={args.rounds} "
               f"BENCH_SCALE={args.scale} make bench")
    c8 = ["-S", "-n", "-c", "8", "-j", "2", "-T", str(args.seconds)]
    c1 = ["-S", "-n", "-c", "1", "-T", str(args.seconds)]
    timeout = args.seconds * 4 + 120

    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    quiet = {"log_statement": "'none'", "log_connections": "off", "log_disconnections": "off"}
    samples: dict[str, dict[str, list[float]]] = {
        "c8": {t: [] for t in TARGETS}, "c1": {t: [] for t in TARGETS}}
    failures: list[str] = []
    # Registered services (the governed stack) are not on the measured paths.
    with st.running_stack(workdir, pg_settings=quiet, services=False) as stack:
        with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER app").format(sql.Identifier(BENCH_DB)))
        bouncer, bouncer_port = start_pgbouncer(stack, workdir)
        try:
            dsns = {
                "direct": stack.app_dsn_direct,
                "envoy_tcp": stack.envoy_tcp_dsn,
                "pgbouncer": stack.dsn(bouncer_port),
                "gateway_inline": stack.gateway_dsn["inline"],
                "gateway_extproc": stack.gateway_dsn["extproc"],
            }
            dsns = {k: make_conninfo(v, dbname=BENCH_DB, sslmode="disable")
                    for k, v in dsns.items()}
            print(f"[bench] pgbench -i -s {args.scale} (direct)", flush=True)
            init = pgbench(["-i", "-q", "-s", str(args.scale)], dsns["direct"], timeout=1800)
            if init.returncode != 0:
                print(init.stderr[-2000:], file=sys.stderr)
                return 1
            for rnd in range(args.rounds):
                order = TARGETS[rnd % len(TARGETS):] + TARGETS[:rnd % len(TARGETS)]
                for kind, opts in (("c8", c8), ("c1", c1)):
                    for target in order:
                        run = pgbench(opts, dsns[target], timeout=timeout)
                        try:
                            tps, lat = parse(run.stdout)
                        except ValueError:
                            failures.append(f"{target} {kind} round {rnd + 1}: "
                                            f"{run.stderr.strip()[-500:]}")
                            print(f"[bench] {target} {kind} FAILED", flush=True)
                            continue
                        samples[kind][target].append(tps if kind == "c8" else lat)
                        print(f"[bench] round {rnd + 1} {kind} {target}: {tps:.0f} tps, "
                              f"{lat:.3f} ms", flush=True)
        finally:
            st.stop(bouncer)
            shutil.rmtree(st.service_home(workdir, "pgbouncer"), ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    results: dict[str, dict[str, float | None]] = {
        "pgbench_select_c8_tps": {t: median(samples["c8"][t]) for t in TARGETS},
        "pgbench_select_c1_latency_ms": {t: median(samples["c1"][t]) for t in TARGETS},
    }
    meta: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "scale": args.scale,
        "c8": "pgbench " + shlex.join(c8),
        "c1": "pgbench " + shlex.join(c1),
        "samples": samples,
        "failures": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    table = render_table(results, meta)
    write_markdown(args.out / "RESULTS.md", table)
    print(table)
    for failure in failures:
        print(f"[bench] failure: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
