"""``pgwarden sessions``, ``pgwarden replay`` and ``pgwarden audit``.

Every command that reads evidence first records an ``evidence_access`` event
(PCI DSS 10.2.1.3) naming the OS user (and ``PGWARDEN_OPERATOR`` if set). If
that record cannot be written the command refuses to show anything: an
unrecorded read of the audit trail is exactly what 10.2.1.3 forbids.

Store URL: ``--store`` or ``PGWARDEN_AUDIT_URL`` (default
``sqlite:///.run/audit.db``). Key and checkpoint file: ``--key`` /
``PGWARDEN_AUDIT_KEY`` and ``--checkpoints`` / ``PGWARDEN_AUDIT_CHECKPOINTS``.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from policyd.audit.chain import (
    CheckpointLog,
    PruneRefused,
    SigningKeyError,
    checkpoints_path,
    key_path,
    load_or_create_key,
    load_public_key,
    parse_since,
    prune,
    verify,
)
from policyd.audit.events import SCHEMA_VERSION, EvidenceAccessEvent
from policyd.audit.models import CHAIN_COLUMNS, row_to_event
from policyd.audit.scrub import scrub_text
from policyd.audit.store import AuditStore, Record

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="Audit store URL (env PGWARDEN_AUDIT_URL)."),
]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", help="Only from this time: ISO date/time (UTC) or 7d, 12h, 30m."),
]
KeyOpt = Annotated[
    Path | None,
    typer.Option("--key", help="Signing key, or its public half (env PGWARDEN_AUDIT_KEY)."),
]
CheckpointsOpt = Annotated[
    Path | None,
    typer.Option("--checkpoints", help="Checkpoint file (env PGWARDEN_AUDIT_CHECKPOINTS)."),
]

sessions_app = typer.Typer(help="List recorded sessions.", no_args_is_help=True)
replay_app = typer.Typer(
    help="Replay one recorded session as a transcript.",
    # a group with one argument and no subcommands: let options follow it
    context_settings={"allow_interspersed_args": True},
)
audit_app = typer.Typer(help="Export, verify and prune the audit trail.", no_args_is_help=True)

_DECISIONS = {
    "denied": "deny",
    "deny": "deny",
    "held": "hold",
    "hold": "hold",
    "allowed": "allow",
    "allow": "allow",
}


def accessor() -> str:
    """Who is reading: the OS user, plus the operator name they declared."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    operator = os.environ.get("PGWARDEN_OPERATOR", "")
    return f"{user} as {operator}" if operator else user


def record_access(store: AuditStore, action: str, target: str, **detail: Any) -> None:
    """Append the evidence-access record, or stop the command (exit 2)."""
    event = EvidenceAccessEvent(
        action=action,
        accessor=accessor(),
        host=socket.gethostname(),
        target=target,
        detail={k: v for k, v in detail.items() if v is not None},
    )
    try:
        store.append([event])
    except Exception as exc:
        typer.echo(
            f"error: cannot record this read of the audit trail ({type(exc).__name__}); "
            "refusing to show evidence without recording the access (PCI DSS 10.2.1.3)",
            err=True,
        )
        raise typer.Exit(2) from exc


def _open(store: str | None) -> AuditStore:
    try:
        return AuditStore(store)
    except Exception as exc:
        first = scrub_text(str(exc).splitlines()[0] if str(exc) else "")
        typer.echo(f"error: cannot open the audit store: {type(exc).__name__}: {first}", err=True)
        raise typer.Exit(2) from exc


def export_line(rec: Record) -> dict[str, Any]:
    """One JSONL export object (schema in docs/audit-export-schema.json)."""
    event = row_to_event(rec.table, rec.row)
    line: dict[str, Any] = {"schema": SCHEMA_VERSION, "table": rec.table}
    line.update(event.model_dump(mode="json"))
    for key in ("ts", "started_at", "finished_at"):
        if key in rec.row:
            line[key] = rec.row[key]  # the stored, hashed text form
    for key in CHAIN_COLUMNS:
        line[key] = rec.row[key]
    return line


# -- sessions ---------------------------------------------------------------------


@sessions_app.command("list")
def sessions_list(
    store: StoreOpt = None,
    since: SinceOpt = None,
    sub: Annotated[str | None, typer.Option("--sub", help="Token subject.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Token group.")] = None,
    decision: Annotated[
        str | None,
        typer.Option("--decision", help="Only sessions with a denied/held/allowed statement."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """List sessions, newest last."""
    verdict = None
    if decision is not None:
        verdict = _DECISIONS.get(decision.lower())
        if verdict is None:
            raise typer.BadParameter("use denied, held or allowed", param_hint="--decision")
    since_ts = parse_since(since) if since else None
    with _open(store) as st:
        record_access(
            st, "list", "sessions", since=since_ts, sub=sub, group=group, decision=decision
        )
        rows = st.list_sessions(since=since_ts, subject=sub, group=group, decision=verdict)
    if fmt == "json":
        typer.echo(
            json.dumps(
                [{k: v for k, v in r.items() if k not in CHAIN_COLUMNS} for r in rows], indent=2
            )
        )
        return
    if not rows:
        typer.echo("no sessions")
        return
    # The whole session id: it is what `pgwarden replay` takes.
    width = max(36, *(len(r["session_id"]) for r in rows))
    typer.echo(f"{'STARTED':27} {'SESSION':{width}} {'SUBJECT':24} STMTS DENIED HELD  END")
    for r in rows:
        typer.echo(
            f"{r['ts']:27} {r['session_id']:{width}} {r['subject'][:24]:24} "
            f"{r['statements']:5} {r['denied']:6} {r['held']:4}  {r['end_reason'] or 'open'}"
        )


# -- replay -----------------------------------------------------------------------


def _fmt_counts(line: dict[str, Any]) -> str:
    parts = []
    if line.get("command_tag"):
        parts.append(line["command_tag"])
    if line.get("rows_returned") is not None:
        parts.append(f"{line['rows_returned']} rows returned")
    if line.get("rows_affected") is not None:
        parts.append(f"{line['rows_affected']} rows affected")
    masked = line.get("masked_counts") or {}
    if masked:
        parts.append("masked " + ", ".join(f"{k}={v}" for k, v in sorted(masked.items())))
    return " · ".join(parts)


_RESULT_FIELDS = frozenset({
    "finished_at", "command_tag", "rows_returned", "rows_affected", "masked_counts",
    "digest_before", "digest_after", "recorded_rows", "rows_truncated", "error_sqlstate",
    "error_message",
})


def _given(value: Any) -> bool:
    """A result field that says something (0 rows does; "" and None do not)."""
    return value is not None and value is not False and value not in ("", {}, [])


def render_transcript(lines: list[dict[str, Any]]) -> str:
    """A human-readable transcript of one session's records."""
    out: list[str] = []
    stated = {ln["statement_seq"] for ln in lines if ln["type"] == "statement"}
    results = {
        ln["statement_seq"]: ln
        for ln in lines
        if ln["type"] == "statement_result" and ln["statement_seq"] in stated
    }
    for ln in lines:
        t = ln["type"]
        ts = ln["ts"]
        if t == "statement_result" and ln["statement_seq"] in results:
            continue  # shown with its statement
        if t == "statement" and ln["statement_seq"] in results:
            res = results[ln["statement_seq"]]
            ln = {**ln, **{k: v for k, v in res.items() if k in _RESULT_FIELDS and _given(v)}}
        if t == "session_start":
            out += [
                f"Session {ln['session_id']}",
                f"  started   {ts}",
                f"  identity  subject={ln['subject']} kind={ln['kind']} "
                f"groups={','.join(ln['groups']) or '-'} issuer={ln['issuer'] or '-'}"
                + (f" actor={ln['actor']}" if ln.get("actor") else ""),
                f"  origin    {ln['client_addr'] or '-'} database={ln['database']} "
                f"role={ln['upstream_role']} tls={'yes' if ln['tls'] else 'no'} "
                f"app={ln['application_name'] or '-'} driver={ln['driver_mode'] or '-'}",
                "",
            ]
        elif t == "auth":
            out.append(f"[{ts}] auth {ln['outcome']}: {ln['reason'] or '-'}")
        elif t == "statement":
            out.append(f"[{ts}] #{ln['statement_seq']} ({ln['path']}) {ln['verdict'].upper()}")
            out += ["    " + s for s in ln["sql"].splitlines() or [""]]
            if ln.get("params"):
                out.append(f"    params: {ln['params']}")
            why = "; ".join(ln["reasons"]) or "-"
            ref = ", ".join(
                x
                for x in (
                    f"decision {ln['decision_id']}" if ln["decision_id"] else "",
                    f"policy {ln['policy_revision']}" if ln["policy_revision"] else "",
                    f"approval {ln['approval_id']}" if ln["approval_id"] else "",
                )
                if x
            )
            out.append(f"  decision: {ln['verdict']} because {why}" + (f" ({ref})" if ref else ""))
            analysis = ln.get("analysis") or {}
            touched = ", ".join(analysis.get("relations") or [])
            if touched or analysis.get("commands"):
                out.append(
                    f"  touches:  {touched or '-'}"
                    + (f" ({', '.join(analysis['commands'])})" if analysis.get("commands") else "")
                )
            counts = _fmt_counts(ln)
            if counts:
                out.append(f"  result:   {counts}")
            if ln.get("started_at") and ln.get("finished_at"):
                out.append(f"  timing:   {ln['started_at']} -> {ln['finished_at']}")
            if ln.get("recorded_rows"):
                out.append("  rows (as the client saw them):")
                for row in ln["recorded_rows"]:
                    out.append("    | " + " | ".join("NULL" if v is None else v for v in row))
                if ln.get("rows_truncated"):
                    out.append("    ... (truncated)")
            if ln.get("error_sqlstate"):
                out.append(f"  error:    {ln['error_sqlstate']} {ln['error_message']}")
        elif t == "statement_result":
            out.append(f"[{ts}] #{ln['statement_seq']} result: {_fmt_counts(ln) or '-'}")
            if ln.get("error_sqlstate"):
                out.append(f"  error:    {ln['error_sqlstate']} {ln['error_message']}")
        elif t == "approval":
            who = f" by {ln['approver']}" if ln["approver"] else ""
            stmt = f" for #{ln['statement_seq']}" if ln.get("statement_seq") else ""
            out.append(
                f"[{ts}] approval {ln['approval_id']} {ln['action']}{stmt}{who}"
                + (f": {ln['reason']}" if ln["reason"] else "")
            )
        elif t == "session_end":
            out.append(
                f"[{ts}] session ended: {ln['reason']}"
                + (f" ({ln['detail']})" if ln["detail"] else "")
            )
        else:
            out.append(f"[{ts}] {t}: {json.dumps(ln, sort_keys=True)}")
    return "\n".join(out)


@replay_app.callback(invoke_without_command=True)
def replay(
    session_id: Annotated[str, typer.Argument(help="Session id (see `pgwarden sessions list`).")],
    store: StoreOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Show who did what in one session: statements, decisions, approvals,
    row counts, the masked rows recorded and errors."""
    with _open(store) as st:
        record_access(st, "replay", session_id, format=fmt)
        records = st.session_records(session_id)
    if not records:
        typer.echo(f"no records for session {session_id}", err=True)
        raise typer.Exit(1)
    lines = [export_line(r) for r in records]
    if fmt == "json":
        typer.echo(json.dumps({"session_id": session_id, "records": lines}, indent=2))
    else:
        typer.echo(render_transcript(lines))


# -- audit ------------------------------------------------------------------------


@audit_app.command("init")
def audit_init(store: StoreOpt = None, key: KeyOpt = None) -> None:
    """Create or migrate the store and create the signing key if absent (dev)."""
    with _open(store) as st:
        typer.echo(f"store ready ({st.dialect})")
    k = key_path(key)
    load_or_create_key(k)
    typer.echo(f"signing key {k} (keep it outside the database, mode 0600)")


@audit_app.command("export")
def audit_export(
    store: StoreOpt = None,
    since: SinceOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl (the only format)")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default stdout).")
    ] = None,
) -> None:
    """Export records as JSON lines for a SIEM (docs/audit-export-schema.json)."""
    if fmt != "jsonl":
        raise typer.BadParameter("only jsonl is supported", param_hint="--format")
    since_ts = parse_since(since) if since else None
    with _open(store) as st:
        record_access(st, "export", "all", since=since_ts, output=str(output) if output else "-")
        sink = open(output, "w") if output else sys.stdout
        try:
            n = 0
            # up to the chain head as it is now: the tables are read one by
            # one, and a record shipped meanwhile could reach some and not
            # others (a gap the SIEM would never see filled)
            head_seq, _ = st.head()
            for rec in st.iter_records(since_ts=since_ts, until_seq=head_seq):
                sink.write(json.dumps(export_line(rec), ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
        finally:
            if output:
                sink.close()
    if output:
        typer.echo(f"exported {n} records to {output}", err=True)


def _public(key: Path | None) -> Any:
    path = key_path(key)
    pub = path.with_suffix(".pub")
    try:
        if path.exists():
            return load_public_key(path)
        if pub.exists():
            return load_public_key(pub)
    except SigningKeyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(
        f"error: no signing key at {path}: checkpoint signatures cannot be checked", err=True
    )
    raise typer.Exit(2)


@audit_app.command("verify")
def audit_verify(
    store: StoreOpt = None,
    since: SinceOpt = None,
    key: KeyOpt = None,
    checkpoints: CheckpointsOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Recompute the hash chains and check the signed checkpoints. Exit 1 and
    name each changed, deleted, inserted or reordered record."""
    public = _public(key)
    since_ts = parse_since(since) if since else None
    with _open(store) as st:
        record_access(st, "verify", "all", since=since_ts)
        report = verify(st, CheckpointLog(checkpoints_path(checkpoints)), public, since=since_ts)
    if fmt == "json":
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for p in report.problems:
            typer.echo(f"FAIL {p}")
        state = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
        typer.echo(
            f"{state}: {report.records} records (seq {report.first_seq}..{report.last_seq}) "
            f"from {report.start}; {report.checkpoints_covered} of {report.checkpoints} "
            "signed checkpoints matched"
        )
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="e.g. 365d")],
    store: StoreOpt = None,
    key: KeyOpt = None,
    checkpoints: CheckpointsOpt = None,
) -> None:
    """Delete records older than the retention period and sign an anchor so the
    rest still verifies (PCI DSS 10.5.1 keeps 12 months: use 365d or more)."""
    path = key_path(key)
    try:
        private = load_or_create_key(path, create=False)
    except SigningKeyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    with _open(store) as st:
        record_access(st, "prune", older_than)
        try:
            result = prune(
                st,
                CheckpointLog(checkpoints_path(checkpoints), private),
                private.public_key(),
                older_than,
            )
        except PruneRefused as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(
        f"pruned {result.deleted} records older than {result.cutoff}; "
        f"chain now starts at seq {result.first_kept_seq}"
    )


@audit_app.command("ship")
def audit_ship(
    spool: Annotated[Path, typer.Option("--spool", help="Spool path the producer writes.")],
    store: StoreOpt = None,
    policyd: Annotated[
        str | None,
        typer.Option("--policyd", help="Ship to policyd's AuditSink (host:port) instead."),
    ] = None,
    writer_id: Annotated[
        str | None, typer.Option("--writer-id", help="Default: derived from the spool path.")
    ] = None,
    key: KeyOpt = None,
    checkpoints: CheckpointsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1000,
) -> None:
    """Ship a spool written by ``AuditWriter(ship=False)`` (the tap, say) into
    the store, in its own process, until SIGTERM/SIGINT."""
    import signal
    import threading

    from policyd.audit.sinks import GrpcSink, Sink
    from policyd.audit.writer import SpoolShipper, default_writer_id, store_sink

    wid = writer_id or default_writer_id(spool)
    sink: Sink = (
        GrpcSink(policyd)
        if policyd
        else store_sink(store, signing_key=key, checkpoint_file=checkpoints, writer_id=wid)
    )
    shipper = SpoolShipper(spool, sink, writer_id=wid, batch_size=batch_size)

    def stop(_sig: int, _frame: object) -> None:
        shipper.stopping.set()
        shipper.notify()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    typer.echo(f"shipping {spool} as {wid}", err=True)
    runner = threading.Thread(target=shipper.run, name="audit-shipper")
    runner.start()
    while runner.is_alive():
        runner.join(0.5)
    shipper.close()
    typer.echo(f"stopped after {shipper.stats.stored} events", err=True)
