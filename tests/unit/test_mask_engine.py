"""The masking engine: rows, DataRow bodies, COPY streams, digests."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskd.detect import contains_pan
from maskd.engine import ColumnMeta, Masker, MaskError, ResultDigest
from maskd.styles import Oid, encode_numeric
from maskd.wire import build_datarow, build_datarow_message, parse_datarow, parse_datarow_message
from tap.hooks import ColumnRule, MaskPlan

KEY = b"gateway-key-0123456789abcdef0123"
PLAN = MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),
                       ColumnRule("public.payments.card_hash", "hmac")))
COLUMNS = [
    ColumnMeta("id", None, Oid.INT8, 0),
    ColumnMeta("card_number", "public.payments.card_number", Oid.TEXT, 0),
    ColumnMeta("cardholder", "public.payments.cardholder", Oid.TEXT, 0),
    ColumnMeta("amount", "public.payments.amount", Oid.NUMERIC, 0),
]


def test_mask_row_rules_content_and_stats() -> None:
    m = Masker(PLAN, KEY)
    row = [b"1", b"4111 1111 1111 1111", b"Ann (card 5555555555554444)", b"12.50"]
    out, stats = m.mask_row(row, COLUMNS)
    assert out == [b"1", b"XXXX XXXX XXXX 1111", b"Ann (card XXXXXXXXXXXX4444)", b"12.50"]
    assert stats.rows == 1 and stats.values == 2
    assert stats.by_column == {"card_number": 1, "cardholder": 1}
    assert stats.by_rule == {"last4": 1, "content": 1}
    out, stats = m.mask_row([b"2", None, b"Bob", b"1.00"], COLUMNS)
    assert out == [b"2", None, b"Bob", b"1.00"] and stats.values == 0


def test_derived_and_unmasked_and_inactive() -> None:
    cols = [ColumnMeta("r", None, Oid.TEXT, 0), ColumnMeta("n", None, Oid.INT8, 1)]
    m = Masker(MaskPlan(derived_columns=(0, 1)), KEY)
    out, stats = m.mask_row([b"1111111111114111", struct.pack(">q", 12)], cols)
    assert out == [b"[redacted]", struct.pack(">q", 0)]
    assert stats.by_rule == {"derived": 2}
    raw = Masker(MaskPlan(rules=PLAN.rules, unmasked=True), KEY)
    row = [b"1", b"4111111111111111", b"x", b"1"]
    assert raw.mask_row(row, COLUMNS)[0] == row
    assert not raw.prepare(COLUMNS).needs_work
    off = Masker(MaskPlan(scan_content=False), KEY)
    assert not off.prepare(COLUMNS).needs_work


def test_unknown_style_rejected_at_construction() -> None:
    with pytest.raises(ValueError):
        Masker(MaskPlan(rules=(ColumnRule("a.b.c", "show_all"),)), KEY)
    with pytest.raises(ValueError):
        Masker(PLAN, b"")


def test_caller_resolved_style_and_binary_formats() -> None:
    m = Masker(MaskPlan(), KEY)
    cols = [ColumnMeta("c", None, Oid.INT8, 1, style="last4"),
            ColumnMeta("j", None, Oid.JSONB, 1)]
    out, _ = m.mask_row([struct.pack(">q", 4111111111111111),
                         b'\x01{"pan": "4111111111111111"}'], cols)
    assert out == [struct.pack(">q", 1111), b'\x01{"pan": "XXXXXXXXXXXX1111"}']


def test_mask_rows_and_column_agree_with_mask_row() -> None:
    rows = [[b"%d" % i, b"4111111111111111", b"name %d" % i, None] for i in range(50)]
    rows[7][2] = b"see 378282246310005"
    a = Masker(PLAN, KEY).prepare(COLUMNS)
    b = Masker(PLAN, KEY).prepare(COLUMNS)
    batch = a.mask_rows(rows)
    single = [b.mask_row(r) for r in rows]
    assert batch == single
    assert a.stats.as_dict() == b.stats.as_dict()
    assert a.stats.by_column == {"card_number": 50, "cardholder": 1}
    c = Masker(PLAN, KEY).prepare(COLUMNS)
    assert c.mask_column(1, [r[1] for r in rows]) == [r[1] for r in batch]


def test_datarow_roundtrip_and_fast_path() -> None:
    rm = Masker(MaskPlan(), KEY).prepare([ColumnMeta("a", None, Oid.TEXT, 0),
                                          ColumnMeta("b", None, Oid.INT4, 1)])
    clean = build_datarow([b"hello", struct.pack(">i", 5)])
    assert rm.mask_datarow(clean) is clean
    dirty = build_datarow([b"pan 4111111111111111", None])
    out = rm.mask_datarow(dirty)
    assert parse_datarow(out) == [b"pan XXXXXXXXXXXX1111", None]
    msg = build_datarow_message([b"x", None])
    assert parse_datarow_message(msg) == [b"x", None]
    with pytest.raises(ValueError):
        parse_datarow(dirty[:-1])
    with pytest.raises(ValueError):
        rm.mask_datarow(build_datarow([b"4111111111111111"]))  # wrong field count


def test_mask_datarows_batch_equals_one_by_one() -> None:
    cols = [ColumnMeta("a", None, Oid.TEXT, 0), ColumnMeta("b", None, Oid.INT8, 0)]
    rows: list[list[bytes | None]] = [
        [b"x" * 45 + b"4111111111111111", b"1"],  # length 61: byte 0x3d before it
        [b"plain", b"4111111111111111"],
        [b"note 523456 2026-11-05", None],
        [None, b"12"],
        [b'{"c": "\\u00345555555555554444"}', b"7"],
    ]
    rows += [[b"%048d" % i + b"4111111111111111", b"3"] for i in range(3)]
    bodies = [build_datarow(r) for r in rows]
    for plan in (MaskPlan(), PLAN):
        a = Masker(plan, KEY).prepare(cols)
        b = Masker(plan, KEY).prepare(cols)
        batch = a.mask_datarows(bodies)
        assert batch == [b.mask_datarow(x) for x in bodies]
        assert a.stats.as_dict() == b.stats.as_dict()
        assert not any(contains_pan(v) for x in batch for v in parse_datarow(x) if v)
        assert batch[2] is bodies[2] and batch[3] is bodies[3]


VALUE = st.one_of(st.none(), st.binary(max_size=20),
                  st.sampled_from([b"4111111111111111", b"x 5555 5555 5555 4444 y", b"12"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(VALUE, VALUE, VALUE, VALUE), min_size=1, max_size=5))
def test_datarow_splice_equals_parse_mask_build(rows: list[tuple[bytes | None, ...]]) -> None:
    a = Masker(PLAN, KEY).prepare(COLUMNS)
    b = Masker(PLAN, KEY).prepare(COLUMNS)
    for row in rows:
        assert parse_datarow(a.mask_datarow(build_datarow(row))) == b.mask_row(row)
    assert a.stats.as_dict() == b.stats.as_dict()
    with pytest.raises(ValueError):
        a.mask_datarow(build_datarow(rows[0])[:-1] if any(rows[0]) else b"\x00\x04")


def test_result_digest_before_after() -> None:
    m = Masker(PLAN, KEY)
    rm = m.prepare(COLUMNS)
    d1, d2 = m.digest(), m.digest()
    rows = [[b"1", b"4111111111111111", b"a", b"1"], [b"2", None, b"b", b"2"]]
    for r in rows:
        out = rm.mask_row(r)
        d1.update(r, out)
        d2.update_raw(build_datarow(r), build_datarow(out))
    before, after = d1.hexdigests()
    assert (before, after) == d2.hexdigests()
    assert before != after and len(before) == 64
    other = ResultDigest(b"another key")
    other.update(rows[0], rows[0])
    assert other.hexdigests()[0] != before
    assert not contains_pan(before + after)


# ---------------------------------------------------------------- COPY


COPY_TEXT = (b"1\t4111 1111 1111 1111\tAnn\n"
             b"2\t\\N\tref 5555-5555-5555-4444 ok\n"
             b'3\t{"c": "\\\\u0034111111111111111"}\tx\n'
             b"4\t\\\\x" + b"378282246310005".hex().encode() + b"\tend\n")
COPY_CSV = b'1,"4111 1111 1111 1111",Ann\n2,5555555555554444,"a,b"\n'


@pytest.mark.parametrize("data", [COPY_TEXT, COPY_CSV])
def test_copy_text_split_at_every_offset(data: bytes) -> None:
    m = Masker(MaskPlan(), KEY)
    whole_state = m.copy_state("text")
    whole = m.mask_stream(data, whole_state) + m.finish_stream(whole_state)
    assert not contains_pan(whole)
    for cut in range(len(data) + 1):
        state = m.copy_state(0)
        out = m.mask_stream(data[:cut], state) + m.mask_stream(data[cut:], state)
        out += m.finish_stream(state)
        assert out == whole, cut


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, len(COPY_TEXT)), max_size=6))
def test_copy_text_many_chunks(cuts: list[int]) -> None:
    m = Masker(MaskPlan(), KEY)
    bounds = [0, *sorted(cuts), len(COPY_TEXT)]
    state = m.copy_state("text")
    out = b"".join(m.mask_stream(COPY_TEXT[a:b], state) for a, b in itertools.pairwise(bounds))
    out += m.finish_stream(state)
    assert not contains_pan(out)
    assert out.count(b"\n") == COPY_TEXT.count(b"\n")


def test_copy_row_aligned_chunks_are_not_held_back() -> None:
    m = Masker(MaskPlan(), KEY)
    state = m.copy_state("text")
    assert m.mask_stream(b"1\t4111111111111111\n", state) == b"1\tXXXXXXXXXXXX1111\n"
    assert state.carry == b""
    assert state.stats.by_rule == {"content": 1}


def _copy_binary(rows: list[list[bytes | None]]) -> bytes:
    out = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    for r in rows:
        out += build_datarow(r)
    return out + b"\xff\xff"


def test_copy_binary_split_at_every_offset() -> None:
    data = _copy_binary([[struct.pack(">q", 1), b"4111111111111111", None],
                         [struct.pack(">q", 4111111111111111), b"ok", b"5555 5555 5555 4444"]])
    m = Masker(MaskPlan(), KEY)
    for types in ([Oid.INT8, Oid.TEXT, Oid.TEXT], None):
        ref_state = m.copy_state("binary", types)
        ref = m.mask_stream(data, ref_state) + m.finish_stream(ref_state)
        assert b"4111111111111111" not in ref and struct.pack(">q", 4111111111111111) not in ref
        assert struct.pack(">q", 1111) in ref and ref.endswith(b"\xff\xff")
        for cut in range(len(data) + 1):
            state = m.copy_state(1, types)
            out = m.mask_stream(data[:cut], state) + m.mask_stream(data[cut:], state)
            out += m.finish_stream(state)
            assert out == ref, cut
    state = m.copy_state(1)
    m.mask_stream(data[:25], state)
    with pytest.raises(MaskError):
        m.finish_stream(state)


def _read_copy_binary(data: bytes) -> list[list[bytes | None]]:
    """Decode a binary COPY stream (test oracle: every length must add up)."""
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00") and data.endswith(b"\xff\xff")
    pos = 19 + struct.unpack_from(">i", data, 15)[0]
    rows: list[list[bytes | None]] = []
    while True:
        (n,) = struct.unpack_from(">h", data, pos)
        pos += 2
        if n == -1:
            assert pos == len(data)
            return rows
        row: list[bytes | None] = []
        for _ in range(n):
            (length,) = struct.unpack_from(">i", data, pos)
            pos += 4
            row.append(None if length < 0 else data[pos:pos + length])
            pos += max(length, 0)
        rows.append(row)


def test_copy_binary_strict_rule_masks_what_content_detection_passes() -> None:
    """A non-Luhn card number (or a reshaped one) in binary COPY: the strict
    rule masks long digit runs field by field, never across a length word
    (a 49-byte field's length ends in 0x31, the digit 1)."""
    non_luhn = b"4111111111111112"
    text = non_luhn + b" " + b"a" * 32  # 49 bytes
    numeric = encode_numeric(int(non_luhn))
    stamp = struct.pack(">q", 848_000_000_000_000)  # a timestamptz: 8 bytes, 15 digits
    data = _copy_binary([[struct.pack(">q", 1), text, numeric, stamp, None]])
    m = Masker(MaskPlan(), KEY)
    plain = m.copy_state(1)
    assert non_luhn in m.mask_stream(data, plain) + m.finish_stream(plain)
    for cut in range(len(data) + 1):
        state = m.copy_state(1, strict=True)
        out = m.mask_stream(data[:cut], state) + m.mask_stream(data[cut:], state)
        out += m.finish_stream(state)
        assert _read_copy_binary(out) == [[struct.pack(">q", 1), b"X" * 16 + text[16:],
                                           encode_numeric(0), stamp, None]], cut
        assert state.stats.by_rule == {"strict": 2}


def test_copy_binary_positions_from_the_plan() -> None:
    """Binary COPY data carries no column identity: the plan names the
    positions of card number columns (their rule applies, whatever the
    digits) and of derived ones (masked as a whole)."""
    non_luhn = b"4111111111111112"
    data = _copy_binary([[struct.pack(">q", 7), non_luhn, struct.pack(">q", int(non_luhn)),
                          encode_numeric(int(non_luhn)), None]])
    plan = MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),),
                    derived_columns=(2, 3),
                    column_positions=((1, "public.payments.card_number"), (4, "x.y.z")))
    m = Masker(plan, KEY)
    for cut in range(len(data) + 1):
        state = m.copy_state(1, strict=True)
        out = m.mask_stream(data[:cut], state) + m.mask_stream(data[cut:], state)
        out += m.finish_stream(state)
        assert _read_copy_binary(out) == [[struct.pack(">q", 7), b"X" * 12 + b"1112",
                                           bytes(8), encode_numeric(0), None]], cut
    assert state.stats.by_rule == {"last4": 1, "derived": 2}
    # text COPY has no field positions: the caller's strict rule covers it
    text_state = m.copy_state(0)
    assert m.mask_stream(b"7\t" + non_luhn + b"\n", text_state) == b"7\t" + non_luhn + b"\n"


FUZZ_TYPES = [Oid.TEXT, Oid.INT8, Oid.INT4, Oid.INT2, Oid.NUMERIC, Oid.JSON, Oid.JSONB,
              Oid.BYTEA, Oid.RECORD, 1016, 1231, 1009, Oid.UUID, 123456]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=64), oid=st.sampled_from(FUZZ_TYPES), fmt=st.sampled_from([0, 1]),
       style=st.sampled_from([None, "last4", "first6_last4", "redact", "null", "hmac"]))
def test_malformed_values_fail_as_value_error(value: bytes, oid: int, fmt: int,
                                             style: str | None) -> None:
    """Whatever bytes claim to be of a type, masking either returns a value
    or refuses with ValueError (which the tap turns into an ErrorResponse)."""
    masker = Masker(MaskPlan(), KEY)
    col = ColumnMeta("c", None, oid, fmt, style=style)
    try:
        masker.mask_row([value], [col])
    except ValueError:
        pass
    rm = masker.prepare([col])
    try:
        rm.mask_datarow(build_datarow([value]))
    except ValueError:
        pass
