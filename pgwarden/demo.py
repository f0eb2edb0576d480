"""`make demo`: a scripted session through both gateway modes of the running
local stack (`make up` / `pgwarden up`), printing what happened.

The scenario is a list of :class:`Step` objects, each with the outcome it
expects; the demo exits 0 only if every step behaved. It is meant to grow into
the full story (identities, masking, holds, blocks, audit replay): add steps
to :func:`scenario`, keep each one's expectation explicit.

The demo never selects card numbers yet: until masking is wired in, a PAN
printed here would be a raw PAN on a screen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from psycopg.conninfo import make_conninfo

from pgwarden import stack

Conn = psycopg.Connection[Any]


class StepFailed(Exception):
    """The step ran but did not behave as expected."""


@dataclass(frozen=True)
class Step:
    """One scripted action; ``run`` returns a one-line summary or raises StepFailed."""

    title: str
    expect: str
    run: Callable[[Conn, Conn], str]  # (through the gateway, direct to PostgreSQL)


def _count_payments(gw: Conn, direct: Conn) -> str:
    got = gw.execute("SELECT count(*) FROM payments").fetchone()
    want = direct.execute("SELECT count(*) FROM payments").fetchone()
    if got != want or not got or got[0] <= 0:
        raise StepFailed(f"gateway counted {got}, PostgreSQL {want}")
    return f"{got[0]} payments, same as PostgreSQL"


def _select_rows(gw: Conn, direct: Conn) -> str:
    query = ("SELECT id, amount, merchant FROM payments "
             "WHERE amount BETWEEN 100 AND 200 ORDER BY id LIMIT 3")
    got = gw.execute(query).fetchall()
    if len(got) != 3 or got != direct.execute(query).fetchall():
        raise StepFailed(f"expected the same 3 rows as PostgreSQL, got {got}")
    return "; ".join(f"#{r[0]} {r[1]} at {r[2]}" for r in got)


def _error_keeps_session(gw: Conn, direct: Conn) -> str:
    try:
        gw.execute("SELECT * FROM no_such_table")
    except psycopg.errors.UndefinedTable as exc:
        diag = exc.diag
        message = f"ERROR:  {diag.message_primary} (SQLSTATE {diag.sqlstate})"
    else:
        raise StepFailed("the query on a missing table succeeded")
    if gw.execute("SELECT 1").fetchone() != (1,):
        raise StepFailed("the session was not usable after the error")
    return f"{message}; the session goes on"


def _extended_protocol(gw: Conn, direct: Conn) -> str:
    query = "SELECT count(*) FROM payments WHERE amount > %s"
    got = gw.execute(query, (10000,), prepare=True).fetchone()
    want = direct.execute(query, (10000,)).fetchone()
    if got != want:
        raise StepFailed(f"gateway {got}, PostgreSQL {want}")
    return f"{got[0] if got else '?'} payments above 10,000 (Parse/Bind/Execute, prepared)"


def _copy_out(gw: Conn, direct: Conn) -> str:
    copy = "COPY (SELECT id, amount FROM payments ORDER BY id LIMIT 100) TO STDOUT"
    chunks: list[bytes] = []
    with gw.cursor() as cur, cur.copy(copy) as cp:
        for block in cp:
            chunks.append(bytes(block))
    lines = b"".join(chunks).decode().splitlines()
    if len(lines) != 100:
        raise StepFailed(f"COPY gave {len(lines)} lines, expected 100")
    return f"{len(lines)} lines, first {lines[0]!r}"


def scenario() -> list[Step]:
    return [
        Step("count the payments", "same count as PostgreSQL", _count_payments),
        Step("read a few payments", "the same three rows as PostgreSQL", _select_rows),
        Step("query a table that does not exist", "ERROR 42P01, session still usable",
             _error_keeps_session),
        Step("parameterised, prepared query", "same answer as PostgreSQL", _extended_protocol),
        Step("COPY ... TO STDOUT", "100 lines", _copy_out),
    ]


def run(env: Mapping[str, str], out: Callable[[str], None] = print) -> bool:
    """Run the scenario through every gateway mode found in ``env``; True if all passed."""
    gateways = {"inline": env.get("PGWARDEN_GATEWAY_DSN"),
                "extproc": env.get("PGWARDEN_GATEWAY_EXTPROC_DSN")}
    direct_dsn = env["PGWARDEN_APP_DSN_DIRECT"]
    ok = True
    for mode, dsn in gateways.items():
        if not dsn:
            out(f"== {mode}: no gateway DSN in the environment")
            ok = False
            continue
        out(f"== gateway mode: {mode}")
        try:
            gw = psycopg.connect(make_conninfo(dsn, application_name="pgwarden-demo"),
                                 autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            out(f"  FAIL connect: {exc}")
            ok = False
            continue
        with gw, psycopg.connect(direct_dsn, autocommit=True) as direct:
            for step in scenario():
                try:
                    summary = step.run(gw, direct)
                except (StepFailed, psycopg.Error) as exc:
                    out(f"  FAIL {step.title} (expected: {step.expect}): {exc}")
                    ok = False
                else:
                    out(f"  ok   {step.title}: {summary}")
    out("demo passed" if ok else "demo FAILED")
    return ok


def demo_command(
    workdir: Annotated[Path, typer.Option(help="State directory of `pgwarden up`.")] = (
        stack.DEFAULT_WORKDIR
    ),
) -> None:
    """Run the scripted demo against the stack started by `pgwarden up`."""
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
