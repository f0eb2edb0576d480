"""Masking a run of DataRow messages in one call (RowMasker.mask_frames,
ResultMasker.data_rows) must give exactly what the per-row path gives: the
same bytes, the same counts, the same refusals. The per-row path is the
reference; these tests compare the two on generated results."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskd import engine
from maskd.detect import contains_pan
from maskd.engine import ColumnMeta, Masker
from maskd.styles import Oid
from tap import protocol as pg
from tap.hooks import ColumnRule, Decision, MaskPlan, Verdict
from tap.masking import MaskingFactory

KEY = b"gateway-key-0123456789abcdef0123"
PANS = [b"4111111111111111", b"5555 5555 5555 4444", b"3782-822463-10005", b"6011111111111117"]
PLANS = {
    "last4": MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),)),
    "first6": MaskPlan(rules=(ColumnRule("public.payments.card_number", "first6_last4"),)),
    "hmac": MaskPlan(rules=(ColumnRule("public.payments.card_number", "hmac"),)),
    "scan_only": MaskPlan(),
    "two_rules": MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),
                                 ColumnRule("public.payments.note", "last4"))),
}
COLUMNS = (
    ColumnMeta("id", None, Oid.INT4, 0),
    ColumnMeta("card_number", "public.payments.card_number", Oid.TEXT, 0),
    ColumnMeta("note", "public.payments.note", Oid.TEXT, 0),
    ColumnMeta("amount", None, Oid.NUMERIC, 0),
)

value = st.one_of(
    st.none(),
    st.sampled_from(PANS),
    st.sampled_from([b"", b"1", b"1234", b"Jane Q Holder", b"x\\x34313131", b"2" + b" " * 12,
                     b"card 4111111111111111 used", b"42.00", b"4111111111111112"]),
    st.binary(max_size=40),
    st.text(alphabet="0123456789 -abc\\", max_size=30).map(str.encode),
    st.from_regex(rb"[0-9 -]{1,20}[0-9]{4}", fullmatch=True),
)
row = st.tuples(value, value, value, value).map(list)


MODES = ("native", "numpy", "loop")


@contextlib.contextmanager
def path(mode: str) -> Iterator[None]:
    """Force one of the three rule walks: C (tap/_wire.c), numpy (any run
    length) or the row loop. The Python ones are what runs where the C
    module is not built."""
    saved = engine.VECTOR_MIN_ROWS, engine._native
    if mode == "native":
        assert engine._native is not None, "tap._wire is not built"
    else:
        engine._native = None
        engine.VECTOR_MIN_ROWS = 1 if mode == "numpy" else 1 << 30
    try:
        yield
    finally:
        engine.VECTOR_MIN_ROWS, engine._native = saved


def frames_of(rows: list[list[bytes | None]]) -> tuple[bytes, list[tuple[int, int, int]]]:
    block = pg.encode_data_row([b"lead"]) + b"".join(pg.encode_data_row(r) for r in rows)
    frames = pg.MessageReader().split(block)[0]
    return block, frames


def per_row(masker: Masker, block: bytes, frames: list[tuple[int, int, int]]) -> tuple[bytes, list[int], int]:
    rm = masker.prepare(COLUMNS)
    out = []
    for _, s, e in frames[1:]:
        body = rm.mask_datarow(block[s + 5:e])
        out.append(b"D" + struct.pack("!i", len(body) + 4) + body)
    return b"".join(out), list(rm._counts), rm.rows


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.sampled_from(sorted(PLANS)), rows=st.lists(row, min_size=1, max_size=12),
       mode=st.sampled_from(MODES))
def test_a_run_masks_exactly_like_the_per_row_path(plan: str, rows: list[list[bytes | None]],
                                                   mode: str) -> None:
    masker = Masker(PLANS[plan], KEY)
    block, frames = frames_of(rows)
    expected, counts, nrows = per_row(masker, block, frames)
    rm = masker.prepare(COLUMNS)
    with path(mode):
        got = rm.mask_frames(block, frames, 1, len(frames))
    if got is None:
        # Only shapes whose rules change a value's length take the per-row path.
        assert plan == "hmac"
        return
    assert got == expected
    assert rm._counts == counts and rm.rows == nrows


@pytest.mark.parametrize("mode", MODES)
def test_a_run_with_pans_everywhere_leaves_none(mode: str) -> None:
    rows: list[list[bytes | None]] = [[b"%d" % i, PANS[i % 4], b"paid with " + PANS[(i + 1) % 4],
                                       None] for i in range(200)]
    masker = Masker(PLANS["last4"], KEY)
    block, frames = frames_of(rows)
    expected, _, _ = per_row(masker, block, frames)
    rm = masker.prepare(COLUMNS)
    with path(mode):
        got = rm.mask_frames(block, frames, 1, len(frames))
    assert got == expected and not contains_pan(got)
    assert rm.stats.by_rule == {"last4": 200, "content": 200} and rm.rows == 200


BAD_ROWS = [
    # a field length running past the message
    b"D" + struct.pack("!i", 4 + 2 + 4 + 3) + struct.pack("!h", 4) + struct.pack("!i", 3) + b"123",
    # too few fields for the shape
    b"D" + struct.pack("!ih", 4 + 2 + 4 + 1, 1) + struct.pack("!i", 1) + b"7",
    # the right count, but the last length points beyond the message
    pg.Message(b"D", struct.pack("!hi", 4, 1) + b"1" + struct.pack("!i", 16) + PANS[0]
               + struct.pack("!i", 1) + b"x" + struct.pack("!i", 5) + b"1").encode(),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD_ROWS)
def test_a_malformed_row_sends_the_run_to_the_per_row_path_counting_nothing(
        mode: str, bad: bytes) -> None:
    masker = Masker(PLANS["last4"], KEY)
    good = pg.encode_data_row([b"1", PANS[0], b"x", b"1"])
    block = good * 3 + bad + good
    frames = pg.MessageReader().split(block)[0]
    assert len(frames) == 5
    rm = masker.prepare(COLUMNS)
    with path(mode):
        assert rm.mask_frames(block, frames, 0, 5) is None
    assert rm.rows == 0 and rm.stats.values == 0


def _factory() -> MaskingFactory:
    names = {(16384, 1): "public.payments.id", (16384, 2): "public.payments.card_number",
             (16384, 3): "public.payments.note", (16384, 4): "public.payments.amount"}
    return MaskingFactory(key=KEY, catalog=lambda _db: lambda t, c: names.get((t, c)))


FIELDS = tuple(pg.Field(name, 16384 if n else 0, n, typ, -1, -1, 0)
               for name, n, typ in (("id", 1, 23), ("card_number", 2, 25), ("note", 3, 25),
                                    ("amount", 4, 1700)))
COMPUTED = (*FIELDS[:3], pg.Field("reversed", 0, 0, 25, -1, -1, 0))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.sampled_from(sorted(PLANS)), computed=st.booleans(),
       rows=st.lists(row, min_size=1, max_size=8), mode=st.sampled_from(MODES))
def test_result_masker_run_equals_data_row_per_message(plan: str, computed: bool,
                                                       rows: list[list[bytes | None]],
                                                       mode: str) -> None:
    decision = Decision(verdict=Verdict.ALLOW, mask=PLANS[plan])
    fields = COMPUTED if computed else FIELDS
    block, frames = frames_of(rows)
    one = _factory()(decision, fields, "shop")
    run = _factory()(decision, fields, "shop")
    assert one is not None and run is not None
    expected = b"".join(one.data_row(block[s + 5:e]) for _, s, e in frames[1:])
    with path(mode):
        assert run.data_rows(block, frames, 1, len(frames)) == expected
    assert run.stats_dict() == one.stats_dict()
