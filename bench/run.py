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
# Server logging off on measured paths (the test stack logs every statement).
QUIET_PG = {"log_statement": "'none'", "log_connections": "off", "log_disconnections": "off"}
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
    return st.listening(proc, port), port


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


GOVERNED = ("envoy_tcp", "gateway_inline", "gateway_extproc")
GOV_BEGIN = "<!-- bench:governed:begin (written by bench/run.py; edit outside the markers) -->"
GOV_END = "<!-- bench:governed:end -->"
POINT_READ = "\\set id random(1, 3000)\nSELECT amount, merchant FROM payments WHERE id = :id;\n"
MASKED_FETCH = ("SELECT id, card_number, cardholder, amount FROM payments, "
                "generate_series(1, 67) g LIMIT 200000")


def extproc_chunks(admin_port: int) -> int | None:
    """Server chunks Envoy's network ext_proc filter has sent to the tap
    (its ``write_data_sent`` counter): one gRPC message each. How Envoy cut
    PostgreSQL's output decides most of an ext_proc fetch's time (the tap's
    cost per chunk is mostly fixed), so each masked fetch reports it."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{st.HOST}:{admin_port}/stats?filter="
                                    "write_data_sent", timeout=5) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    found = re.search(r"^network_ext_proc\.gateway_extproc\.write_data_sent: (\d+)$", body,
                      re.MULTILINE)
    return int(found.group(1)) if found else None


def governed_phase(seconds: int, rounds: int) -> tuple[dict[str, dict[str, float | None]],
                                                       dict[str, object]]:
    """The product as agents use it: token auth, policy on every statement
    (decision cache warm), masking, audit spooled before forwarding, TLS on
    both legs. Baseline: Envoy tcp_proxy straight to PostgreSQL with TLS, as
    the same database role (fraud_reader) with its password."""
    import time as _time

    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-gov-"))
    script = workdir / "point_read.sql"
    script.write_text(POINT_READ)
    tps: dict[str, list[float]] = {t: [] for t in GOVERNED}
    lat: dict[str, list[float]] = {t: [] for t in GOVERNED}
    fetch: dict[str, list[float]] = {t: [] for t in GOVERNED}
    chunks: list[int] = []  # per ext_proc masked fetch
    with st.running_stack(workdir, pg_settings=QUIET_PG) as stack:
        admin = stack.procs["envoy-agent"].ports["admin"]
        from psycopg.conninfo import conninfo_to_dict

        from pgwarden.devissuer import ensure_dev_keys

        token = ensure_dev_keys(stack.workdir / "identity").mint(
            "bench-agent", groups=("fraud-readers",), ttl=7200)

        def agent(key: str) -> str:
            d = conninfo_to_dict(stack.extra_env[key])
            return make_conninfo("", **{**d, "password": token, "sslmode": "require"})

        dsns = {
            "envoy_tcp": make_conninfo(stack.dsn(stack.ports["envoy_tcp"], user="fraud_reader"),
                                       sslmode="require",
                                       password=stack.passwords["fraud_reader"]),
            "gateway_inline": agent("PGWARDEN_AGENT_DSN"),
            "gateway_extproc": agent("PGWARDEN_AGENT_EXTPROC_DSN"),
        }
        for rnd in range(rounds):
            order = GOVERNED[rnd % 3:] + GOVERNED[:rnd % 3]
            for target in order:
                for clients, bucket in ((8, tps), (1, lat)):
                    # -M prepared: the way psycopg 3 and asyncpg send statements
                    # (parameters bound server-side), so the policy decides the
                    # statement once per connection and each execution is checked
                    # against that decision.
                    opts = ["-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
                            "-j", str(min(clients, 2)), "-T", str(seconds)]
                    run = pgbench(opts, dsns[target], timeout=seconds * 4 + 120)
                    try:
                        t, ms = parse(run.stdout)
                    except ValueError:
                        print(f"[bench] governed {target} c{clients} FAILED: "
                              f"{run.stderr.strip()[-300:]}", flush=True)
                        continue
                    bucket[target].append(t if clients == 8 else ms)
                    print(f"[bench] governed round {rnd + 1} c{clients} {target}: {t:.0f} tps, "
                          f"{ms:.3f} ms", flush=True)
                counted = target == "gateway_extproc"
                sent = extproc_chunks(admin) if counted else None
                with psycopg.connect(dsns[target]) as conn:
                    started = _time.perf_counter()
                    rows = conn.execute(MASKED_FETCH).fetchall()
                    took = _time.perf_counter() - started
                if len(rows) != 200_000:
                    print(f"[bench] masked fetch {target}: {len(rows)} rows", flush=True)
                    continue
                fetch[target].append(took)
                note = ""
                after = extproc_chunks(admin) if counted else None
                if sent is not None and after is not None:
                    chunks.append(after - sent)
                    note = f" ({after - sent} chunks from Envoy)"
                print(f"[bench] governed round {rnd + 1} masked fetch {target}: {took:.2f} s"
                      f"{note}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    results = {
        "governed_point_read_c8_tps": {t: median(tps[t]) for t in GOVERNED},
        "governed_point_read_c1_latency_ms": {t: median(lat[t]) for t in GOVERNED},
        "masked_fetch_seconds": {t: median(fetch[t]) for t in GOVERNED},
    }
    return results, {"governed_samples": {"tps": tps, "latency": lat, "fetch": fetch,
                                          "extproc_fetch_chunks": chunks}}


def render_governed(results: dict[str, dict[str, float | None]], meta: dict[str, object]) -> str:
    tps = results["governed_point_read_c8_tps"]
    lat = results["governed_point_read_c1_latency_ms"]
    fetch = results["masked_fetch_seconds"]
    lines = [
        GOV_BEGIN,
        "## The governed gateway: policy, masking and audit on",
        "",
        f"Measured {meta['date']}, same run as above ({meta['rounds']} rounds, medians). "
        "Agents connect with a token over TLS; every statement is decided (decision cache "
        "warm), results are masked, events are spooled before forwarding and shipped to "
        "policyd. Baseline: Envoy tcp_proxy to PostgreSQL with TLS, same role and query.",
        "",
        "Point read: `\\set id random(1, 3000)` / "
        "`SELECT amount, merchant FROM payments WHERE id = :id` "
        "(pgbench -M prepared -f, -c 8 -j 2 and -c 1). Masked fetch: 200,000 rows of "
        "(id, card_number, cardholder, amount), psycopg fetchall.",
        "",
        "| target | tps, -c 8 | vs envoy_tcp | latency ms, -c 1 | added over envoy_tcp | "
        "masked fetch s | vs envoy_tcp |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in GOVERNED:
        mine, base = lat.get(t), lat.get("envoy_tcp")
        added = f"{mine - base:+.3f} ms" if mine is not None and base is not None else "n/a"
        lines.append(
            f"| {t} | {f'{tps[t]:.0f}' if tps.get(t) else 'failed'} | "
            f"{ratio(tps.get(t), tps.get('envoy_tcp'))} | "
            f"{f'{lat[t]:.3f}' if lat.get(t) else 'failed'} | {added} | "
            f"{f'{fetch[t]:.2f}' if fetch.get(t) else 'failed'} | "
            f"{ratio(fetch.get(t), fetch.get('envoy_tcp'))} |")
    samples = meta.get("governed_samples")
    chunks = samples.get("extproc_fetch_chunks") if isinstance(samples, dict) else None
    if chunks:
        lines += ["", "Chunks Envoy's network ext_proc filter sent the tap per masked fetch "
                  f"(one gRPC message each), by round: {', '.join(map(str, chunks))}."]
    lines += ["", GOV_END]
    return "\n".join(lines)


def write_section(path: Path, begin: str, end: str, table: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        path.write_text(head + table + tail)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + table + "\n")


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
    samples: dict[str, dict[str, list[float]]] = {
        "c8": {t: [] for t in TARGETS}, "c1": {t: [] for t in TARGETS}}
    failures: list[str] = []
    # Registered services (the governed stack) are not on the measured paths.
    with st.running_stack(workdir, pg_settings=QUIET_PG, services=False) as stack:
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
    print("[bench] governed gateway (policy, masking, audit on)", flush=True)
    governed, governed_meta = governed_phase(args.seconds, args.rounds)
    results.update(governed)
    meta.update(governed_meta)
    print("[bench] maskd alone (bench/maskd_bench.py --quick)", flush=True)
    masking = subprocess.run([sys.executable, str(HERE / "maskd_bench.py"), "--quick"],
                             capture_output=True, text=True, timeout=1800, check=False)
    try:
        results["maskd_values_per_s"] = json.loads(masking.stdout)["maskd_values_per_s"]
    except (ValueError, KeyError):
        print(f"[bench] maskd bench failed: {masking.stderr.strip()[-300:]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    previous: dict[str, object] = {}
    out_json = args.out / "results.json"
    if out_json.is_file():
        # Figures other benches write (maskd_values_per_s, audit_events_per_s,
        # policy decisions) are kept.
        previous = {k: v for k, v in json.loads(out_json.read_text()).items()
                    if k not in results and k != "meta"}
    out_json.write_text(json.dumps({**previous, **results, "meta": meta}, indent=2) + "\n")
    table = render_table(results, meta)
    write_markdown(args.out / "RESULTS.md", table)
    write_section(args.out / "RESULTS.md", GOV_BEGIN, GOV_END, render_governed(results, meta))
    print(table)
    print(render_governed(results, meta))
    for failure in failures:
        print(f"[bench] failure: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
