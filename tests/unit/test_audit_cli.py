"""`pgwarden sessions list`, `replay`, `audit export|verify|prune` on a
SQLite store, as an auditor would run them; every read leaves an
evidence_access record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from sqlalchemy import text
from test_audit_chain import session_events  # type: ignore[import-not-found]
from typer.testing import CliRunner

from policyd.audit.cli import audit_app, replay_app, sessions_app
from policyd.audit.events import EVENT_ADAPTER, EXPORT_ENVELOPE
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter

runner = CliRunner()
# The same wiring as pgwarden/cli.py, kept local so these tests do not depend
# on every other sub-application importing cleanly.
app = typer.Typer()
app.add_typer(sessions_app, name="sessions")
app.add_typer(replay_app, name="replay")
app.add_typer(audit_app, name="audit")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("PGWARDEN_AUDIT_URL", url)
    monkeypatch.setenv("PGWARDEN_AUDIT_KEY", str(tmp_path / "key"))
    monkeypatch.setenv("PGWARDEN_AUDIT_CHECKPOINTS", str(tmp_path / "cp.jsonl"))
    monkeypatch.setenv("PGWARDEN_OPERATOR", "auditor-1")
    w = AuditWriter(url, tmp_path / "spool.jsonl").start()
    assert w.submit(session_events("s1") + session_events("s2", "agent-8"))
    assert w.close()
    return url


def access_log(url: str) -> list[tuple[str, str]]:
    with AuditStore(url) as st, st.engine.connect() as c:
        return [(r[0], r[1]) for r in c.execute(
            text("SELECT action, accessor FROM audit_evidence_access ORDER BY seq"))]


def test_sessions_list_filters(env: str) -> None:
    out = runner.invoke(app, ["sessions", "list"])
    assert out.exit_code == 0, out.output
    assert "s1" in out.output and "s2" in out.output
    out = runner.invoke(app, ["sessions", "list", "--sub", "agent-8", "--format", "json"])
    assert [s["session_id"] for s in json.loads(out.output)] == ["s2"]
    out = runner.invoke(app, ["sessions", "list", "--group", "nobody"])
    assert "no sessions" in out.output
    out = runner.invoke(app, ["sessions", "list", "--decision", "denied", "--format", "json"])
    rows = json.loads(out.output)
    assert {r["session_id"] for r in rows} == {"s1", "s2"} and rows[0]["denied"] == 1
    assert access_log(env)[0][0] == "list"


def test_replay_text_shows_identity_decisions_counts_rows_errors(env: str) -> None:
    out = runner.invoke(app, ["replay", "s1"])
    assert out.exit_code == 0, out.output
    t = out.output
    assert "subject=agent-7" in t and "groups=fraud" in t and "10.0.0.5" in t
    assert "#1 (simple) ALLOW" in t and "SELECT 2 · 2 rows returned · masked public.cards.pan=2" in t
    assert "| XXXXXXXXXXXX1111" in t
    assert "touches:  public.cards:read (SELECT)" in t
    assert "#2 (simple) DENY" in t and "because prohibited statement" in t
    assert "error:    42501" in t
    assert "approval ap-1 approved for #3 by alice" in t
    assert "#3 (simple) ALLOW" in t and "result:   SELECT 0 · 0 rows returned" in t
    assert "session ended: client_terminate" in t
    assert t.index("#1 ") < t.index("#2 ") < t.index("#3 ")
    [(action, who)] = access_log(env)
    assert action == "replay" and who.endswith(" as auditor-1")


def test_replay_json_and_unknown_session(env: str) -> None:
    out = runner.invoke(app, ["replay", "s2", "--format", "json"])
    doc = json.loads(out.output)
    assert [r["type"] for r in doc["records"]][:3] == ["auth", "session_start", "statement"]
    out = runner.invoke(app, ["replay", "nope"])
    assert out.exit_code == 1


def test_export_jsonl_lines_follow_the_schema(env: str, tmp_path: Path) -> None:
    out = runner.invoke(app, ["audit", "export", "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(ln) for ln in out.output.splitlines()]
    assert len(lines) >= 18
    assert [ln["seq"] for ln in lines] == sorted(ln["seq"] for ln in lines)
    for ln in lines:
        assert ln["schema"] == "pgwarden.audit.v1"
        event = {k: v for k, v in ln.items() if k not in EXPORT_ENVELOPE}
        EVENT_ADAPTER.validate_python(event)
    assert lines[-1]["type"] == "evidence_access"  # the export recorded itself first
    since = lines[-1]["ts"]
    later = runner.invoke(app, ["audit", "export", "--since", since, "-o", str(tmp_path / "x")])
    assert later.exit_code == 0
    again = [json.loads(ln) for ln in (tmp_path / "x").read_text().splitlines()]
    assert [(ln["type"], ln["action"]) for ln in again] == [("evidence_access", "export")] * 2


def test_verify_passes_then_fails_naming_the_record(env: str) -> None:
    out = runner.invoke(app, ["audit", "verify"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("OK:")
    with AuditStore(env) as st, st.engine.begin() as c:
        seq = c.execute(text("SELECT seq FROM audit_statements WHERE verdict='deny' LIMIT 1")).scalar()
        c.execute(text("UPDATE audit_statements SET verdict='allow' WHERE seq=:s"), {"s": seq})
    out = runner.invoke(app, ["audit", "verify"])
    assert out.exit_code == 1
    assert f"FAIL changed: audit_statements seq {seq}" in out.output
    actions = [a for a, _ in access_log(env)]
    assert actions == ["verify", "verify"]


def test_prune_via_cli(env: str) -> None:
    out = runner.invoke(app, ["audit", "prune", "--older-than", "365d"])
    assert out.exit_code == 0, out.output
    assert "pruned 0 records" in out.output
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
