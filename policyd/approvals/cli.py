"""``pgwarden approvals list|show|approve|deny|serve-http``.

The approver's token comes from ``--token`` or ``PGWARDEN_TOKEN`` (prefer
the variable: a command line is visible to other users of the machine).
Commands talk gRPC to policyd (``--policyd``, default 127.0.0.1:50061),
which validates the token and applies the approver rules. Exit codes:
0 done, 1 refused (not found, not pending, self-approval, not an approver),
2 usage, 3 authentication failed, 4 policyd unreachable.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer

from policyd.approvals.client import DEFAULT_TARGET, RemoteApprovals, ServiceUnavailable
from policyd.approvals.models import ApprovalRecord
from policyd.approvals.store import ApprovalError, InvalidRequest, Unauthenticated

app = typer.Typer(help="Just-in-time approvals: list, show, approve, deny.",
                  no_args_is_help=True)

T = TypeVar("T")

TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="Approver's OIDC token (env PGWARDEN_TOKEN).", show_default=False)]
PolicydOpt = Annotated[str, typer.Option(
    "--policyd", help="policyd gRPC address (host:port or unix:/path).",
    envvar="PGWARDEN_POLICYD")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept as audit evidence).")]


def _token(token: str | None) -> str:
    value = token or os.environ.get("PGWARDEN_TOKEN", "")
    if not value.strip():
        typer.echo("error: no approver token: pass --token or set PGWARDEN_TOKEN", err=True)
        raise typer.Exit(2)
    return value.strip()


def _run(policyd: str, call: Callable[[RemoteApprovals], Awaitable[T]]) -> T:
    async def main() -> T:
        async with RemoteApprovals(policyd) as remote:
            return await call(remote)

    try:
        return asyncio.run(main())
    except Unauthenticated as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    except ServiceUnavailable as exc:
        typer.echo(f"error: {exc} at {policyd}", err=True)
        raise typer.Exit(4) from None
    except InvalidRequest as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ApprovalError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _show(rec: ApprovalRecord) -> str:
    lines = [
        f"approval        {rec.approval_id}",
        f"status          {rec.status.value}" + ("  (late grant: one retry)"
                                                 if rec.late_grant else ""),
        f"requester       {rec.subject}" + (f" (actor {rec.actor})" if rec.actor else ""),
        f"groups          {', '.join(rec.groups) or '-'}",
        f"database        {rec.database or '-'}   session {rec.session_id or '-'}",
        f"reason          {rec.reason or '-'}",
        f"approvers       {', '.join(rec.approver_groups) or '-'}",
        f"created         {_when(rec.created_at)} UTC",
        f"hold ends       {_when(rec.expires_at)} UTC",
        f"late window     until {_when(rec.late_grant_until)} UTC",
        f"decided         {_when(rec.decided_at)}"
        + (f" by {rec.approver}: {rec.approver_reason}" if rec.approver else ""),
        f"fingerprint     {rec.fingerprint or '-'}",
        "statement",
        *("    " + line for line in rec.statement.splitlines() or [""]),
    ]
    return "\n".join(lines)


def _emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command("list")
def list_command(
    status: Annotated[str | None, typer.Option(
        help="pending, approved, denied, expired, cancelled or spent.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    token: TokenOpt = None, policyd: PolicydOpt = DEFAULT_TARGET, as_json: JsonOpt = False,
) -> None:
    """Requests you made or may decide, newest first."""
    tok = _token(token)
    records = _run(policyd, lambda r: r.list(tok, status, limit))
    if as_json:
        _emit({"approvals": [r.to_json() for r in records]})
        return
    if not records:
        typer.echo("no approval requests")
        return
    typer.echo(f"{'ID':<16}{'STATUS':<11}{'REQUESTER':<22}{'DATABASE':<12}{'CREATED (UTC)':<21}"
               "REASON")
    for r in records:
        typer.echo(f"{r.approval_id:<16}{r.status.value:<11}{r.subject[:21]:<22}"
                   f"{r.database[:11]:<12}{_when(r.created_at):<21}{r.reason[:60]}")


@app.command("show")
def show_command(approval_id: str, token: TokenOpt = None,
                 policyd: PolicydOpt = DEFAULT_TARGET, as_json: JsonOpt = False) -> None:
    """One request: who asked, what, why, and what happened."""
    tok = _token(token)
    rec = _run(policyd, lambda r: r.get(tok, approval_id))
    if as_json:
        _emit(rec.to_json())
    else:
        typer.echo(_show(rec))


def _decide(approval_id: str, approve: bool, reason: str, token: str | None, policyd: str,
            as_json: bool) -> None:
    if not reason.strip():
        typer.echo("error: --reason must say why", err=True)
        raise typer.Exit(2)
    tok = _token(token)
    rec = _run(policyd, lambda r: r.decide(tok, approval_id, approve, reason))
    if as_json:
        _emit(rec.to_json())
        return
    verb = "approved" if approve else "denied"
    extra = ""
    if approve and rec.late_grant:
        extra = (f"; the hold had ended: {rec.subject} may retry the identical statement once "
                 f"until {_when(rec.late_grant_until)} UTC")
    typer.echo(f"{rec.approval_id} {verb}{extra}")


@app.command("approve")
def approve_command(approval_id: str, reason: ReasonOpt, token: TokenOpt = None,
                    policyd: PolicydOpt = DEFAULT_TARGET, as_json: JsonOpt = False) -> None:
    """Let the held statement run (or, after the hold, one identical retry)."""
    _decide(approval_id, True, reason, token, policyd, as_json)


@app.command("deny")
def deny_command(approval_id: str, reason: ReasonOpt, token: TokenOpt = None,
                 policyd: PolicydOpt = DEFAULT_TARGET, as_json: JsonOpt = False) -> None:
    """Refuse the held statement: the client gets SQLSTATE PW001."""
    _decide(approval_id, False, reason, token, policyd, as_json)


@app.command("serve-http")
def serve_http_command(
    listen: Annotated[str, typer.Option(help="host:port of the HTTP API.")] = "127.0.0.1:8061",
    policyd: PolicydOpt = DEFAULT_TARGET,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the approvals HTTP API (JSON, Bearer tokens), backed by policyd."""
    import uvicorn

    from policyd.approvals.http import create_app

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        typer.echo("error: --listen must be host:port", err=True)
        raise typer.Exit(2)
    uvicorn.run(create_app(RemoteApprovals(policyd)), host=host.strip("[]"), port=int(port),
                log_level=log_level, access_log=False)  # access log would show query strings
