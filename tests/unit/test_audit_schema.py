"""The stable pieces of the audit trail: the documented export schema, the
migrations matching the models, and the scrubbers."""

from __future__ import annotations

import json
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import SQLModel

from policyd.audit.events import export_json_schema
from policyd.audit.scrub import scrub_sql, scrub_text
from policyd.audit.store import make_engine, upgrade

REPO = Path(__file__).resolve().parents[2]


def test_export_schema_doc_is_current() -> None:
    """docs/audit-export-schema.json is what the code emits; regenerate with
    `python -m policyd.audit.events > docs/audit-export-schema.json`
    only together with a schema version decision."""
    doc = json.loads((REPO / "docs" / "audit-export-schema.json").read_text())
    assert doc == json.loads(json.dumps(export_json_schema()))


def test_migrations_match_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "include_object": lambda o, name, type_, *a: type_ != "table"
                or (str(name).startswith("audit_")
                and name != "audit_alembic_version"),
            },
        )
        diff = compare_metadata(ctx, SQLModel.metadata)
    engine.dispose()
    assert diff == []


def test_password_literals_and_parameters_are_redacted() -> None:
    cases = {
        "ALTER ROLE a WITH ENCRYPTED PASSWORD 'p''w' VALID UNTIL '2030-01-01'":
            "ALTER ROLE a WITH ENCRYPTED PASSWORD '<redacted>' VALID UNTIL '2030-01-01'",
        "CREATE USER b PASSWORD E'x\\'y'": "CREATE USER b PASSWORD '<redacted>'",
        "CREATE USER MAPPING FOR c SERVER s OPTIONS (user 'u', password 'pw')":
            "CREATE USER MAPPING FOR c SERVER s OPTIONS (user 'u', password '<redacted>')",
        "alter user d password 'unterminated": "alter user d password '<redacted>'",
        "SELECT dblink('dbname=x password=pw')": "SELECT dblink('<redacted>')",
    }
    for sql, want in cases.items():
        assert scrub_sql(sql)[0] == want
    assert scrub_sql("ALTER USER e PASSWORD $2", ["e", "pw"]) == (
        "ALTER USER e PASSWORD $2", ["e", "<redacted>"])
    assert scrub_sql("SELECT 'password is not here'")[0] == "SELECT 'password is not here'"


def test_tokens_are_removed_from_text() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    assert jwt not in scrub_text(f"Authorization: Bearer {jwt}")


def _luhn_complete(body: str) -> str:
    digits = [int(c) for c in body]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from(["4", "51", "55", "2221", "34", "37", "6011"]),
    rest=st.text("0123456789", min_size=11, max_size=14),
    where=st.sampled_from(["SELECT '{}'", "INSERT INTO t VALUES ({})", "SELECT 1 -- {}"]),
)
def test_no_valid_pan_survives_scrubbing(prefix: str, rest: str, where: str) -> None:
    pan = _luhn_complete(prefix + rest)[:19]
    if len(pan) < 13:
        return
    pan = _luhn_complete(pan[:-1])
    sql, params = scrub_sql(where.format(pan), [pan])
    assert pan not in sql
    assert params is not None and pan not in (params[0] or "")
