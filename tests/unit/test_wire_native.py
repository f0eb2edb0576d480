"""tap/_wire.c against its pure-Python twins, on generated and hostile input.

The C loops frame every message the tap reads and walk every DataRow it
masks, so they must give exactly what the Python reference gives, refuse
what it refuses, and never read outside the buffer whatever the offsets
say. (The masking itself is compared with the per-row path in
test_mask_frames.py, in all three walks.)"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskd import engine
from maskd.engine import ColumnMeta, Masker
from maskd.styles import Oid
from tap import _wire as native  # an ImportError fails the module: the build is missing
from tap import protocol as pg
from tap.hooks import ColumnRule, MaskPlan

MAX = 1 << 20


def test_the_tap_and_the_masker_use_the_built_module() -> None:
    # pip install builds it (pyproject's ext-modules); a silent fallback to
    # the Python loops would leave the C path untested and the bench slow.
    assert pg._native is native and engine._native is native


def python_split(data: bytes, max_size: int) -> tuple[object, ...]:
    try:
        return ("ok", *pg.split_frames(data, max_size))
    except pg.ProtocolError as exc:
        return ("error", str(exc))


def native_split(data: bytes, max_size: int) -> tuple[object, ...]:
    try:
        return ("ok", *pg._native_split(data, max_size))
    except pg.ProtocolError as exc:
        return ("error", str(exc))


message = st.builds(lambda t, body: bytes([t]) + struct.pack("!i", len(body) + 4) + body,
                    st.integers(0, 255), st.binary(max_size=60))
stream = st.lists(st.one_of(message, st.binary(max_size=12)), max_size=12).map(b"".join)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=stream, cut=st.integers(0, 800), max_size=st.sampled_from([4, 20, 64, MAX]))
def test_split_frames_matches_the_python_loop(data: bytes, cut: int, max_size: int) -> None:
    for chunk in (data, data[:cut], bytearray(data)):
        assert native_split(chunk, max_size) == python_split(bytes(chunk), max_size)


@pytest.mark.parametrize("length", [-1, 0, 3, -(2 ** 31), 2 ** 31 - 1, MAX + 1])
def test_split_frames_refuses_a_length_the_python_loop_refuses(length: int) -> None:
    data = b"Z\0\0\0\x05I" + b"D" + struct.pack("!i", length) + b"x" * 8
    got = native_split(data, MAX)
    assert got == python_split(data, MAX) and got[0] == "error"


COLUMNS = (
    ColumnMeta("id", None, Oid.INT4, 0),
    ColumnMeta("card_number", "public.payments.card_number", Oid.TEXT, 0),
    ColumnMeta("note", "public.payments.note", Oid.TEXT, 0),
)
PLANS = [
    MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),)),
    MaskPlan(rules=(ColumnRule("public.payments.card_number", "first6_last4"),
                    ColumnRule("public.payments.note", "last4"))),
]

field = st.one_of(st.none(), st.binary(max_size=24),
                  st.from_regex(rb"[0-9 -]{0,20}[0-9]{4}", fullmatch=True),
                  st.sampled_from([b"4111111111111111", b"5555-5555-5555-4444", b"1234", b"x1234"]))
good_row = st.lists(field, min_size=3, max_size=3).map(pg.encode_data_row)


def _with_tail(row: bytes, tail: bytes) -> bytes:
    """A well-formed row with bytes after its last field, inside the message."""
    return pg.Message(b"D", row[5:] + tail).encode()


# What PostgreSQL would never send: wrong counts, lengths past the end,
# truncated fields, trailing bytes, a body of noise.
bad_row = st.one_of(
    st.lists(field, min_size=0, max_size=5).map(pg.encode_data_row),
    st.builds(lambda n, lens, tail: pg.Message(
        b"D", struct.pack("!h", n) + b"".join(struct.pack("!i", x) for x in lens) + tail).encode(),
        st.integers(-2, 4), st.lists(st.integers(-3, 40), max_size=4), st.binary(max_size=30)),
    st.binary(min_size=0, max_size=30).map(lambda b: pg.Message(b"D", b).encode()),
    st.builds(_with_tail, good_row, st.binary(min_size=1, max_size=6)),
)


def walks(masker_plan: MaskPlan, block: bytes, frames: list[tuple[int, int, int]],
          lo: int, hi: int) -> tuple[object, object]:
    results = []
    for use_native in (True, False):
        rm = Masker(masker_plan, b"k" * 32).prepare(COLUMNS)
        found = [0] * len(rm._ops)
        if use_native:
            walked = rm._rules_native(block, frames, lo, hi, found)
            got = None if walked is None else walked[0]
        else:
            try:
                got = rm._rules_loop(block, frames, lo, hi, found)
            except engine.MALFORMED:
                got = None
        results.append((got, found if got is not None else None))
    return results[0], results[1]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.sampled_from(range(len(PLANS))),
       rows=st.lists(st.one_of(good_row, good_row, bad_row), min_size=1, max_size=10))
def test_walk_rules_matches_the_python_loop(plan: int, rows: list[bytes]) -> None:
    block = b"".join(rows)
    frames = pg.split_frames(block, MAX)[0]
    assert len(frames) == len(rows)
    c, py = walks(PLANS[plan], block, frames, 0, len(frames))
    assert c == py


def test_walk_rules_keeps_to_the_block_whatever_the_frames_say() -> None:
    row = pg.encode_data_row([b"1", b"4111111111111111", None])
    block = row * 2
    kinds = bytes([0, 1, 0])
    n = len(row)
    hostile = [
        [(0x44, 0, n), (0x44, n, 3 * n)],          # past the block's end
        [(0x44, -n, 0), (0x44, 0, n)],             # before its start
        [(0x44, 0, n), (0x44, n + 1, 2 * n)],      # not contiguous
        [(0x44, 0, 4), (0x44, 4, 2 * n)],          # a frame too short for a header
        [(0x44, n, 0), (0x44, 0, 2 * n)],          # going backwards
    ]
    for frames in hostile:
        assert native.walk_rules(block, frames, 0, 2, kinds, 1 << 24) is None, frames
    ok = native.walk_rules(block, [(0x44, 0, n), (0x44, n, 2 * n)], 0, 2, kinds, 1 << 24)
    assert ok is not None and ok[0] is not None
    assert b"4111111111111111" not in ok[0] and ok[1] == [0, 2, 0] and ok[3] == []
    with pytest.raises(ValueError):
        native.walk_rules(block, [(0x44, 0, n)], 0, 2, kinds, 1 << 24)
    with pytest.raises(TypeError):
        native.walk_rules(block, [[0x44, 0, n]], 0, 1, kinds, 1 << 24)


scan_value = st.one_of(st.none(), st.binary(max_size=30),
                       st.from_regex(rb"[a-z ]{0,4}[0-9 -]{0,24}[a-z\\]{0,3}", fullmatch=True))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(scan_value, min_size=3, max_size=3), min_size=1, max_size=8))
def test_walk_rules_flags_exactly_the_rows_whose_scanned_values_could_hold_a_pan(
        rows: list[list[bytes | None]]) -> None:
    # Column 0 scanned, column 1 last4, column 2 neither: only column 0
    # counts. A PAN has at least 13 ASCII digits, or hides them behind a
    # backslash (an escape, bytea hex).
    block = b"".join(pg.encode_data_row(r) for r in rows)
    frames = pg.split_frames(block, MAX)[0]
    walked = native.walk_rules(block, frames, 0, len(frames), bytes([3, 1, 0]), 1 << 24)
    assert walked is not None
    expected = [i for i, r in enumerate(rows) if r[0] is not None and (
        sum(ch in b"0123456789" for ch in r[0]) >= 13 or b"\\" in r[0])]
    assert walked[3] == expected


@settings(max_examples=300, deadline=None)
@given(kinds=st.lists(st.sampled_from([0x44, 0x43, 0x5A]), max_size=12),
       start=st.integers(-2, 14), kind=st.sampled_from([0x44, 0x43]))
def test_run_end_matches_the_python_loop(kinds: list[int], start: int, kind: int) -> None:
    frames = [(k, 5 * i, 5 * i + 5) for i, k in enumerate(kinds)]
    i = max(start, 0)
    while i < len(frames) and frames[i][0] == kind:
        i += 1
    assert native.run_end(frames, start, kind) == i
    assert pg.run_end is native.run_end
    if start >= 0:
        assert pg.run_end_py(frames, start, kind) == i
