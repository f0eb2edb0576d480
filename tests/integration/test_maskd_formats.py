"""maskd against the wire values real PostgreSQL produces.

Unit tests build binary numerics, jsonb, arrays and records with our own
encoders; here PostgreSQL 15 produces every form (text and binary result
format, through libpq), the engine masks it, and PostgreSQL itself reads the
masked binary values back through each type's receive function: the masked
value must be accepted (valid encoding) and, rendered as text, hold no PAN.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from maskd.detect import contains_pan
from maskd.engine import ColumnMeta, Masker
from pgwarden.stack import Postgres, ensure_certs, start_postgres, stop
from tap.hooks import ColumnRule, MaskPlan

pytestmark = [pytest.mark.integration]

KEY = b"integration-key-0123456789abcdef"
PANS = {
    "visa": "4111111111111111", "mastercard": "5555555555554444", "amex": "378282246310005",
    "discover": "6011111111111117", "jcb": "3530111333300000", "diners": "30569309025904",
    "unionpay": "6200000000000005", "maestro": "6759649826438453",
}

# SQL expressions producing a PAN ({p}) in some form, and whether the
# masked value keeps the last four digits visible in its text rendering.
FORMS = [
    ("'{p}'::text", True),
    ("'{p}'::varchar(40)", True),
    ("'{p}'::char(24)", True),
    ("'card {s}'::text", True),  # spaced groups of four
    ("{p}::bigint", True),
    ("{p}::numeric", True),
    ("{p}.25::numeric", True),
    ("-{p}::numeric(30,2)", True),
    ("json_build_object('c', '{p}')", True),
    ("jsonb_build_object('c', '{p}', 'n', {p}::bigint)", True),
    ("to_json('{s}'::text)", True),
    ("'{{\"c\": \"\\u00{h}{p1}\"}}'::json", True),  # first digit escaped
    ("ARRAY['{p}', 'x']", True),
    ("ARRAY[{p}::bigint, 42]", True),
    ("ARRAY[{p}::numeric]", True),
    ("convert_to('pan {p}', 'UTF8')", False),  # rendered as hex
    ("row('{p}'::text, {p}::bigint, 'x')", True),
    ("string_agg(x, ' ') FROM (VALUES ('{p}'), ('5555555555554444')) v(x)", True),
]


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    work: Path = tmp_path_factory.mktemp("maskd-pg")
    server = start_postgres(work, ensure_certs(work / "certs"))
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture(scope="module")
def conn(pg: Postgres) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(pg.admin_dsn()) as c:
        yield c


def _query(conn: psycopg.Connection[tuple[object, ...]], sql: str,
           fmt: int) -> tuple[bytes | None, int]:
    res = conn.pgconn.exec_params(sql.encode(), [], result_format=fmt)
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    return res.get_value(0, 0), res.ftype(0)


def _render(conn: psycopg.Connection[tuple[object, ...]], value: bytes, oid: int,
            fmt: int) -> str:
    """PostgreSQL reads ``value`` as type ``oid`` (binary or text input) and
    renders it as text: proves the masked value is valid for its type."""
    res = conn.pgconn.exec_params(b"SELECT $1::text", [value], [oid], [fmt], 0)
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    out = res.get_value(0, 0)
    assert out is not None
    return out.decode()


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("brand", sorted(PANS))
def test_content_masking_of_every_form(conn: psycopg.Connection[tuple[object, ...]],
                                       brand: str, fmt: int) -> None:
    pan = PANS[brand]
    spaced = " ".join(pan[i:i + 4] for i in range(0, len(pan), 4))
    masker = Masker(MaskPlan(scan_content=True), KEY)
    for form, keeps_last4 in FORMS:
        sql = "SELECT " + form.format(p=pan, s=spaced, p1=pan[1:], h=f"{ord(pan[0]):x}")
        value, oid = _query(conn, sql, fmt)
        assert value is not None
        col = ColumnMeta("c", None, oid, fmt)
        (masked,), stats = masker.mask_row([value], [col])
        assert masked is not None, sql
        assert masked != value, (sql, "not masked")
        assert stats.values == 1
        if oid == 2249:  # anonymous records cannot be read back: check the bytes
            assert pan.encode() not in masked and not contains_pan(masked)
            continue
        rendered = _render(conn, masked, oid, fmt)
        assert not contains_pan(rendered), (sql, fmt)
        if keeps_last4:  # a number shows its last four as a number: 0005 -> 5
            assert (pan[-4:].lstrip("0") or "0") in rendered.replace(" ", ""), (sql, fmt, rendered)


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("style", ["last4", "first6_last4", "redact", "null", "hmac"])
def test_rule_styles_give_valid_values(conn: psycopg.Connection[tuple[object, ...]],
                                       style: str, fmt: int) -> None:
    pan = PANS["visa"]
    plan = MaskPlan(rules=(ColumnRule("public.t.c", style),), scan_content=False)
    masker = Masker(plan, KEY)
    for expr in ("'{p}'::text", "{p}::bigint", "{p}::numeric", "({p} % 1000000000)::int4",
                 "jsonb_build_object('c', '{p}')", "convert_to('{p}', 'UTF8')",
                 "ARRAY['{p}']", "ARRAY[{p}::bigint, NULL, 42]", "ARRAY[{p}::numeric]",
                 "row('{p}'::text)::text"):
        value, oid = _query(conn, "SELECT " + expr.format(p=pan), fmt)
        assert value is not None
        (masked,), _ = masker.mask_row([value], [ColumnMeta("c", "public.t.c", oid, fmt)])
        if style == "null":
            assert masked is None
            continue
        assert masked is not None
        rendered = _render(conn, masked, oid, fmt)
        assert not contains_pan(rendered)
        assert pan[6:12] not in rendered.replace(" ", "").replace("-", "")
