"""Remove PANs and secrets from everything the audit trail stores.

PCI DSS 3.5.1 counts the audit store and the spool as places where PAN is
stored, and 10.2.1.5 wants credential changes logged without the secret. So
every free-text field passes through two scrubbers before it is spooled:

- the PAN detector maskd uses (``maskd.detect.scrub``: Luhn-valid,
  issuer-prefixed 13-19 digit runs, last four kept). If that module cannot be
  imported, a stricter stand-in masks *every* 13-19 digit run: over-masking
  loses some evidence detail, under-masking would break 3.5.1.
- a secret scrubber for SQL: the string literal (or the parameter) after a
  ``PASSWORD`` keyword token, ``password=`` pairs inside connection-string
  literals, and JSON Web Tokens anywhere.

SQL is tokenised with PostgreSQL's own scanner (pglast), never parsed with a
regular expression. When the scanner rejects the text (an unterminated
literal, say), the fallback is conservative: if the text mentions
``password`` at all, every quoted literal after the first mention is replaced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import re2
from pglast import parser as _pg

from policyd.audit.events import (
    ApprovalEvent,
    AuthEvent,
    Event,
    EvidenceAccessEvent,
    GatewayEvent,
    SessionEndEvent,
    SessionStartEvent,
    StatementEvent,
    StatementResultEvent,
)

SECRET_MASK = "'<redacted>'"  # noqa: S105 - the replacement, not a secret
PARAM_MASK = "<redacted>"
# Hard cap on recorded rows per statement whatever the policy asks, so one
# statement cannot make an unbounded audit record.
MAX_RECORDED_ROWS = 1000

_DIGIT_RUN = re.compile(r"(?<!\d)(\d[ -]?){12,18}\d(?!\d)")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_CONN_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*('[^']*'|\"[^\"]*\"|[^\s;'\"]+)")
_QUOTED = re.compile(r"'(?:[^']|'')*'?")
_PASSWORD_WORD = re.compile(r"(?i)password")


def _fallback_pan_scrub(text: str) -> str:
    """Stand-in while maskd.detect is missing: mask every 13-19 digit run
    (separators allowed), keeping the last four digits."""

    def repl(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        return "*" * (len(digits) - 4) + digits[-4:]

    return _DIGIT_RUN.sub(repl, text)


def _load_pan_scrubber() -> Callable[[str], str]:
    try:
        from maskd.detect import scrub as detect_scrub
    except ImportError:  # pragma: no cover - depends on the maskd branch
        return _fallback_pan_scrub
    return detect_scrub


_pan_scrub = _load_pan_scrubber()


def scrub_pan(text: str) -> str:
    return _pan_scrub(text)


def scrub_text(text: str) -> str:
    """Any free text (an error message, a detail): PANs, tokens and
    ``password=`` pairs removed."""
    if not text:
        return text
    if "eyJ" in text:
        text = _JWT.sub("<jwt>", text)
    if _may_hold_password(text):
        text = _CONN_PASSWORD.sub(lambda m: f"{m.group(1)}={PARAM_MASK}", text)
    return scrub_pan(text)


# Over a whole serialised event: every PAN form either scrubber finds (runs
# of 13+ digits with separators, JSON escapes, bytea hex) and every secret
# pattern above has one of these in its JSON text.
# RE2: one linear pass (CPython's engine took 4x longer on this alternation).
_LINE_DIRTY = re2.compile(rb"[0-9][0-9 -]{12,}|\\[uxX]|eyJ|(?i:pass|pwd)")


def line_needs_scrub(line: str | bytes) -> bool:
    """False only when nothing in this JSON text can be a PAN or a secret, so
    the event it encodes is already as :func:`scrub_event` would leave it
    (up to the recorded-rows cap, which the caller checks). A sound
    pre-check: it may say True for a clean line, never False for a dirty
    one (tests/unit/test_audit_scrub_prefilter.py)."""
    data = line.encode() if isinstance(line, str) else line
    return _LINE_DIRTY.search(data) is not None


def _may_hold_password(text: str) -> bool:
    """Cheap pre-check: every secret pattern here contains one of these."""
    low = text.lower()
    return "pass" in low or "pwd" in low


def _secret_spans(sql: str) -> tuple[list[tuple[int, int]], set[int]] | None:
    """Character spans of literals that hold a secret, and parameter numbers that
    do. None if PostgreSQL's scanner rejects the text."""
    try:
        tokens = _pg.scan(sql)
    except Exception:  # the scanner raises its own error types
        return None
    spans: list[tuple[int, int]] = []
    params: set[int] = set()
    after_password = False
    for tok in tokens:
        if tok.name == "PASSWORD":
            after_password = True
            continue
        if after_password:
            if tok.name in ("SCONST", "USCONST", "XCONST", "BCONST"):
                spans.append((tok.start, tok.end + 1))
            elif tok.name == "PARAM":
                text = sql[tok.start : tok.end + 1]
                if text[1:].isdigit():
                    params.add(int(text[1:]))
            elif tok.name == "ASCII_61":  # '=' as in "password = 'x'" option syntax
                continue
            after_password = False
        elif tok.name in ("SCONST", "USCONST") and _CONN_PASSWORD.search(
            sql[tok.start : tok.end + 1]
        ):
            spans.append((tok.start, tok.end + 1))
    return spans, params


def scrub_sql(
    sql: str, params: Sequence[str | None] | None = None
) -> tuple[str, list[str | None] | None]:
    """Return the statement text and parameters as they may be stored.

    Secret literals become ``'<redacted>'``; a parameter bound to a
    ``PASSWORD $n`` becomes ``<redacted>``; then tokens and PANs are removed
    from the text and every parameter.
    """
    found = _secret_spans(sql) if _may_hold_password(sql) else ([], set())
    secret_params: set[int] = set()
    if found is None:
        m = _PASSWORD_WORD.search(sql)
        if m is not None:
            head, tail = sql[: m.end()], sql[m.end() :]
            sql = head + _QUOTED.sub(SECRET_MASK, tail)
            secret_params = set(range(1, len(params or ()) + 1))
    else:
        spans, secret_params = found
        if spans:
            parts: list[str] = []
            last = 0
            for start, end in spans:
                parts += [sql[last:start], SECRET_MASK]
                last = end
            parts.append(sql[last:])
            sql = "".join(parts)
    clean_params: list[str | None] | None = None
    if params is not None:
        clean_params = [
            None if p is None else (PARAM_MASK if i in secret_params else scrub_text(p))
            for i, p in enumerate(params, start=1)
        ]
    return scrub_text(sql), clean_params


def scrub_rows(
    rows: Iterable[Sequence[str | None]], cap: int
) -> tuple[list[list[str | None]], bool]:
    """Recorded result rows, capped, each value PAN-scrubbed again (the tap
    already masked them; this is the store's own 3.5.1 guarantee)."""
    out: list[list[str | None]] = []
    truncated = False
    for i, row in enumerate(rows):
        if i >= cap:
            truncated = True
            break
        out.append([None if v is None else scrub_text(v) for v in row])
    return out, truncated


def scrub_event(event: Event) -> Event:
    """The event with every free-text field scrubbed (PCI DSS 3.5.1, 10.2.1.5).

    Identity fields (subject, groups, addresses) are kept as given: they are
    the evidence. Anything a client or a database can put text into is
    scrubbed, the start-up parameters a client chooses (user name, database,
    application_name) included.
    """
    if isinstance(event, StatementEvent):
        sql, params = scrub_sql(event.sql, event.params)
        changes: dict[str, object] = {
            "sql": sql,
            "params": params,
            "error_message": scrub_text(event.error_message),
            "reasons": [scrub_text(r) for r in event.reasons],
            # a parse error in the analysis can quote the statement
            "analysis": _scrub_json(event.analysis),
        }
        if event.recorded_rows is not None:
            rows, truncated = scrub_rows(event.recorded_rows, MAX_RECORDED_ROWS)
            changes["recorded_rows"] = rows
            changes["rows_truncated"] = event.rows_truncated or truncated
        return event.model_copy(update=changes)
    if isinstance(event, StatementResultEvent):
        result_changes: dict[str, object] = {"error_message": scrub_text(event.error_message)}
        if event.recorded_rows is not None:
            rows, truncated = scrub_rows(event.recorded_rows, MAX_RECORDED_ROWS)
            result_changes["recorded_rows"] = rows
            result_changes["rows_truncated"] = event.rows_truncated or truncated
        return event.model_copy(update=result_changes)
    if isinstance(event, SessionEndEvent):
        return event.model_copy(update={"detail": scrub_text(event.detail)})
    if isinstance(event, SessionStartEvent):
        return event.model_copy(update={
            "user": scrub_text(event.user), "database": scrub_text(event.database),
            "application_name": scrub_text(event.application_name)})
    if isinstance(event, AuthEvent):
        return event.model_copy(update={
            "reason": scrub_text(event.reason), "user": scrub_text(event.user),
            "database": scrub_text(event.database)})
    if isinstance(event, ApprovalEvent):
        return event.model_copy(update={"reason": scrub_text(event.reason)})
    if isinstance(event, GatewayEvent | EvidenceAccessEvent):
        return event.model_copy(update={"detail": _scrub_json(event.detail)})
    return event


def _scrub_json(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: _scrub_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v) for v in value]
    return value
