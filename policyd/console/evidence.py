"""Reading the audit trail for the console, and recording that it was read.

The record-keeping is the point: PCI DSS 10.2.1.3 asks that every access to
the audit logs be logged, so :func:`record_access` runs before a page shows
any evidence, and a read that cannot be recorded is refused (the audit CLI
does the same). The rest reuses :mod:`policyd.audit`: ``export_line`` turns a
stored record into the exported (and replayed) form, ``render_transcript`` is
the text ``pgwarden replay`` prints and ``chain.verify`` the integrity check.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyd.audit.chain import (
    CheckpointLog,
    SigningKeyError,
    checkpoints_path,
    key_path,
    load_public_key,
    verify,
)
from policyd.audit.chain import VerifyReport as VerifyReport
from policyd.audit.cli import export_line, render_transcript
from policyd.audit.events import AuthEvent, EvidenceAccessEvent, EvidenceAction
from policyd.audit.store import AuditStore
from policyd.console.signin import ConsoleUser

_HOST = socket.gethostname()


class AccessNotRecorded(Exception):
    """The evidence-access record could not be stored; nothing may be shown."""


def accessor(user: ConsoleUser) -> str:
    """How the audit trail names a console reader: token subject and issuer,
    so a reader is attributable to one person or system (PCI DSS 8.2.1)."""
    who = f"console:{user.subject}"
    if user.actor:
        who += f" (actor {user.actor})"
    return f"{who} @ {user.issuer}" if user.issuer else who


def record_access(
    store: AuditStore,
    user: ConsoleUser,
    action: EvidenceAction,
    target: str,
    *,
    client_addr: str,
    **detail: Any,
) -> None:
    """Append one ``evidence_access`` record, or raise :class:`AccessNotRecorded`."""
    event = EvidenceAccessEvent(
        action=action,
        accessor=accessor(user),
        host=_HOST,
        target=target,
        detail={
            "via": "console",
            "client_addr": client_addr,
            "groups": list(user.groups),
            **{k: v for k, v in detail.items() if v not in (None, "")},
        },
    )
    try:
        store.append([event])
    except Exception as exc:  # any store failure means: do not show evidence
        raise AccessNotRecorded(type(exc).__name__) from exc


def record_sign_in(
    store: AuditStore,
    *,
    ok: bool,
    reason: str,
    subject: str = "",
    issuer: str = "",
    client_addr: str = "",
) -> None:
    """An authentication attempt at the console (PCI DSS 10.2.1.4 for the
    failures). Never carries the token, only the reason code."""
    store.append(
        [
            AuthEvent(
                outcome="success" if ok else "failure",
                reason=reason,
                subject=subject,
                issuer=issuer,
                client_addr=client_addr,
                user="console",
            )
        ]
    )


# -- replay -------------------------------------------------------------------

_RESULT_KEYS = (
    "finished_at",
    "command_tag",
    "rows_returned",
    "rows_affected",
    "masked_counts",
    "recorded_rows",
    "rows_truncated",
    "error_sqlstate",
    "error_message",
)


@dataclass
class Replay:
    """One session, ready for the timeline template."""

    session_id: str
    start: dict[str, Any] | None
    end: dict[str, Any] | None
    items: list[dict[str, Any]] = field(default_factory=list)
    transcript: str = ""

    @property
    def denied(self) -> int:
        return sum(1 for i in self.items if i["type"] == "statement" and i["verdict"] == "deny")

    @property
    def held(self) -> int:
        return sum(1 for i in self.items if i["type"] == "statement" and i["verdict"] == "hold")


def replay(store: AuditStore, session_id: str) -> Replay | None:
    """The session's records as timeline items, or None if there are none.

    A ``statement_result`` (recorded after the statement was forwarded) is
    folded into its statement, as ``pgwarden replay`` shows it; one without
    its statement stays a separate item so nothing recorded is hidden.
    """
    records = store.session_records(session_id)
    if not records:
        return None
    lines = [export_line(r) for r in records]
    stated = {ln["statement_seq"] for ln in lines if ln["type"] == "statement"}
    results: dict[int, dict[str, Any]] = {}
    for ln in lines:
        if ln["type"] == "statement_result" and ln["statement_seq"] in stated:
            results[ln["statement_seq"]] = ln
    out = Replay(session_id=session_id, start=None, end=None, transcript=render_transcript(lines))
    for ln in lines:
        kind = ln["type"]
        if kind == "statement_result" and ln["statement_seq"] in results:
            continue
        item = dict(ln)
        if kind == "statement":
            res = results.get(ln["statement_seq"])
            if res is not None:
                for key in _RESULT_KEYS:
                    value = res.get(key)
                    if value not in (None, "", {}, [], False):
                        item[key] = value
        elif kind == "session_start":
            out.start = item
        elif kind == "session_end":
            out.end = item
        out.items.append(item)
    return out


# -- verification ---------------------------------------------------------------


@dataclass(frozen=True)
class VerifyStatus:
    report: VerifyReport
    signatures_checked: bool
    key_note: str


def verify_chain(
    store: AuditStore, key: Path | None = None, checkpoints: Path | None = None
) -> VerifyStatus:
    """Run ``policyd.audit.chain.verify`` as ``pgwarden audit verify`` does.

    Without the signing key (or its ``.pub``) the hash chains are still
    recomputed but checkpoint signatures cannot be checked; the page says so
    rather than failing."""
    path = key_path(key)
    public = None
    note = ""
    for candidate in (path, path.with_suffix(".pub")):
        if candidate.exists():
            try:
                public = load_public_key(candidate)
                note = f"signatures checked with {candidate.name}"
            except SigningKeyError as exc:
                note = f"signatures not checked: {exc}"
            break
    else:
        note = f"signatures not checked: no key at {path}"
    report = verify(store, CheckpointLog(checkpoints_path(checkpoints)), public)
    return VerifyStatus(report=report, signatures_checked=public is not None, key_note=note)
