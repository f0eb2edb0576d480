"""`make demo`: the job pgwarden exists for, played against the local stack.

A nightly fraud-detection agent gets a short-lived token (group
``fraud-readers``), connects through Envoy, reads recent payments (card
numbers masked), tries ``DROP DATABASE`` and ``ALTER USER`` (refused, the
session goes on), runs a risky query that is held until an approver approves
it through the CLI, disconnects; then the evidence is replayed and the audit
chain verified.

Every step states what it expects and checks it; the demo exits 0 only if
every step behaved. Nothing secret is printed: no token, no password, no PAN
(the raw card numbers are read directly from PostgreSQL only to check the
last four digits the agent saw).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer

from pgwarden import stack

AGENT = "nightly-fraud-agent"
APPROVER = "alice@security"
RISKY = "SELECT * FROM payments WHERE amount > 10000"


class StepFailed(Exception):
    """The step ran but did not behave as expected."""


@dataclass
class Demo:
    env: Mapping[str, str]
    out: Callable[[str], None]
    token: str = field(default="", repr=False)
    approver_token: str = field(default="", repr=False)
    conn: psycopg.Connection[Any] | None = None
    session_id: str = ""
    approval_id: str = ""
    notes: list[str] = field(default_factory=list)

    # -- helpers ----------------------------------------------------------------

    def cli(self, *args: str, token: str | None = None, check: bool = True) -> str:
        env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in self.env.items()}}
        if token is not None:
            env["PGWARDEN_TOKEN"] = token
        exe = str(Path(sys.executable).parent / "pgwarden")
        proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        if check and proc.returncode != 0:
            raise StepFailed(f"`pgwarden {' '.join(args[:2])}` failed: "
                             f"{(proc.stderr or proc.stdout).strip()[:400]}")
        return proc.stdout

    def direct(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.env["PGWARDEN_UPSTREAM_DSN"], dbname="shop", autocommit=True)

    def agent(self) -> psycopg.Connection[Any]:
        assert self.conn is not None
        return self.conn


def _pans(values: list[Any]) -> list[str]:
    from maskd.detect import find_pans

    found = []
    for v in values:
        text = str(v)
        found += [text[a:b] for a, b in find_pans(text)]
    return found


# -- the steps ---------------------------------------------------------------------


def mint_tokens(d: Demo) -> str:
    from pgwarden.devissuer import ensure_dev_keys

    issuer = ensure_dev_keys(Path(d.env["PGWARDEN_IDENTITY_DIR"]))
    d.token = issuer.mint(AGENT, groups=("fraud-readers",), ttl=900, act="fraud-scheduler")
    d.approver_token = issuer.mint(APPROVER, groups=("approvers",), ttl=900, kind="human")
    return (f"sub={AGENT} groups=fraud-readers act=fraud-scheduler ttl=15 min "
            f"(issuer {issuer.issuer}); an approver token for {APPROVER}")


def connect(d: Demo) -> str:
    dsn = d.env["PGWARDEN_AGENT_DSN"]
    if "password" in dsn:
        raise StepFailed("the agent's connection string must not hold a database password")
    d.conn = psycopg.connect(dsn, password=d.token, application_name=AGENT, autocommit=True,
                             connect_timeout=15)
    row = d.agent().execute("SELECT current_user, inet_server_port() IS NOT NULL").fetchone()
    if row is None or row[0] != "fraud_reader":
        raise StepFailed(f"expected the mapped role fraud_reader, got {row}")
    tls = d.agent().info.pgconn.ssl_in_use
    if not tls:
        raise StepFailed("the agent's session is not encrypted")
    return "TLS to the gateway; PostgreSQL sees role fraud_reader, a password only the gateway holds"


def read_payments(d: Demo) -> str:
    query = ("SELECT id, card_number, cardholder, amount, merchant FROM payments "
             "ORDER BY created_at DESC, id LIMIT 5")
    rows = d.agent().execute(query).fetchall()
    with d.direct() as direct:
        raw = {r[0]: r[1] for r in direct.execute(query).fetchall()}
    if len(rows) != 5:
        raise StepFailed(f"expected 5 rows, got {len(rows)}")
    if _pans([c for r in rows for c in r]):
        raise StepFailed("a card number reached the agent unmasked")
    for r in rows:
        shown, real = str(r[1]), raw[r[0]]
        if shown == real or not shown.endswith(real[-4:]):
            raise StepFailed(f"payment {r[0]}: expected a mask keeping the last four digits")
    for r in rows:
        d.out(f"         #{r[0]:<5} {r[1]:<20} {r[2]:<20} {r[3]:>10} {r[4]}")
    return "5 rows; card numbers masked, last four kept (checked against PostgreSQL)"


def _refused(d: Demo, sql: str, marker: str) -> str:
    mark = Path(d.env["PGWARDEN_PG_LOG"]).stat().st_size
    try:
        d.agent().execute(sql)
    except psycopg.errors.InsufficientPrivilege as exc:
        message = str(exc).splitlines()[0]
    except psycopg.Error as exc:
        raise StepFailed(f"expected SQLSTATE 42501, got {exc.sqlstate}: {exc}") from exc
    else:
        raise StepFailed("the statement ran")
    with Path(d.env["PGWARDEN_PG_LOG"]).open("rb") as fh:
        fh.seek(mark)
        seen = fh.read().decode(errors="replace").lower()
    if marker in seen:
        raise StepFailed("PostgreSQL received the refused statement")
    d.out(f"         {message}")
    return "42501, and PostgreSQL never received it (checked in its log)"


def drop_database(d: Demo) -> str:
    return _refused(d, "DROP DATABASE shop", "drop database")


def alter_user(d: Demo) -> str:
    return _refused(d, "ALTER USER fraud_reader WITH PASSWORD 'pwned-by-agent'", "alter user")


def session_goes_on(d: Demo) -> str:
    row = d.agent().execute("SELECT count(*) FROM payments WHERE amount < 100").fetchone()
    if row is None:
        raise StepFailed("no answer")
    return f"{row[0]} small payments counted: the session is still usable"


def held_query(d: Demo) -> str:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["rows"] = d.agent().execute(RISKY).fetchall()
        except psycopg.Error as exc:
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    target = d.env["PGWARDEN_POLICYD"]
    deadline = time.monotonic() + 30
    while not d.approval_id:
        if time.monotonic() > deadline or not worker.is_alive():
            raise StepFailed(f"the statement was not held for approval: {result}")
        listing = d.cli("approvals", "list", "--policyd", target, token=d.approver_token)
        for line in listing.splitlines():
            if "pending" in line and AGENT in line:
                d.approval_id = line.split()[0]
        time.sleep(0.5)
    d.out(f"         held as {d.approval_id}; the agent is waiting in its query")
    d.out(f"         approver {APPROVER} runs: pgwarden approvals approve {d.approval_id} "
          "--reason ...")
    d.cli("approvals", "approve", d.approval_id, "--reason", "nightly fraud review, ticket FR-1042",
          "--policyd", target, token=d.approver_token)
    worker.join(60)
    waited = time.monotonic() - started
    if "error" in result:
        raise StepFailed(f"expected rows after the approval, got {result['error']}")
    rows = result.get("rows")
    if rows is None:
        raise StepFailed("no answer 60 s after the approval")
    with d.direct() as direct:
        expected = direct.execute("SELECT count(*) FROM payments WHERE amount > 10000").fetchone()
    if expected is None or len(rows) != expected[0]:
        raise StepFailed(f"expected {expected} rows, got {len(rows)}")
    if _pans([c for r in rows for c in r]):
        raise StepFailed("a card number reached the agent unmasked")
    return f"{len(rows)} rows arrived {waited:.1f} s later, card numbers masked"


def disconnect(d: Demo) -> str:
    d.agent().close()
    return "session closed"


def replay(d: Demo) -> str:
    deadline = time.monotonic() + 30
    transcript = ""
    while time.monotonic() < deadline:
        listing = json.loads(d.cli("sessions", "list", "--sub", AGENT, "--format", "json") or "[]")
        ids = [s["session_id"] for s in listing if s.get("application_name") == AGENT]
        if ids:
            d.session_id = ids[-1]
            transcript = d.cli("replay", d.session_id, check=False)
            if "session ended" in transcript and "DENY" in transcript and d.approval_id in transcript:
                break
        time.sleep(0.5)
    else:
        raise StepFailed("the session's evidence did not reach the audit store in 30 s")
    for line in transcript.splitlines():
        d.out(f"         {line}")
    if _pans([transcript]):
        raise StepFailed("the replay shows a raw card number")
    return "identity, every statement, decisions and reasons, the hold and its approver"


def verify(d: Demo) -> str:
    out = d.cli("audit", "verify").strip().splitlines()
    return out[-1] if out else "verified"


STEPS: list[tuple[str, str, Callable[[Demo], str]]] = [
    ("mint a short-lived token", "a token for the agent, one for an approver", mint_tokens),
    ("connect through Envoy (inline tap)", "role fraud_reader, TLS, no password held",
     connect),
    ("read recent payments", "card numbers masked, last four shown", read_payments),
    ("DROP DATABASE shop", "refused before PostgreSQL", drop_database),
    ("ALTER USER ... PASSWORD", "refused before PostgreSQL", alter_user),
    ("keep working", "the session continues", session_goes_on),
    (RISKY, "held, approved through the CLI, rows arrive masked", held_query),
    ("disconnect", "session ends", disconnect),
    ("pgwarden replay", "the evidence of the session", replay),
    ("pgwarden audit verify", "the chain is intact", verify),
]


def run(env: Mapping[str, str], out: Callable[[str], None] = print) -> bool:
    d = Demo(env, out)
    ok = True
    for title, expect, step in STEPS:
        out(f"-> {title}  (expected: {expect})")
        try:
            summary = step(d)
        except (StepFailed, psycopg.Error, OSError) as exc:
            out(f"   FAIL {exc}")
            ok = False
            break
        out(f"   ok   {summary}")
    out("")
    if ok:
        out("The demo behaved as described. To look further:")
        out("  console (sign in with a token from `pgwarden token mint --sub you --groups auditors`):")
        out(f"      {env.get('PGWARDEN_CONSOLE_URL', '(not running)')}")
        out("  an agent session of your own:")
        out("      source .run/env")
        out('      PGPASSWORD="$(.venv/bin/pgwarden token mint --keys $PGWARDEN_IDENTITY_DIR '
            '--sub me --groups fraud-readers)" psql "$PGWARDEN_AGENT_DSN"')
        out("  evidence: .venv/bin/pgwarden sessions list; .venv/bin/pgwarden replay <session>")
        out("  the stack keeps running (`make down` stops it).")
    else:
        out("demo FAILED: see the step above; logs are in .run/")
    return ok


def demo_command(
    workdir: Annotated[Path, typer.Option(help="State directory of `pgwarden up`.")] = (
        stack.DEFAULT_WORKDIR
    ),
) -> None:
    """Play the fraud-agent scenario against the stack started by `pgwarden up`."""
    state = stack.read_state(workdir)
    if state is None or not stack.healthy(state):
        typer.echo("the local stack is not running: `make up` (or `pgwarden up`) first", err=True)
        raise typer.Exit(2)
    if not run({str(k): str(v) for k, v in state["env"].items()}, typer.echo):
        raise typer.Exit(1)


def main() -> None:
    typer.run(demo_command)


if __name__ == "__main__":
    main()
