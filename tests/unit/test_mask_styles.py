"""Column rule styles and content masking per type OID and format."""

from __future__ import annotations

import hmac
import json
import struct
from decimal import Decimal

import pytest

from maskd.detect import contains_pan
from maskd.styles import REDACTED, Oid, content_fn, encode_numeric, rule_fn, strict_fn

KEY = b"k" * 32
PAN = b"4111111111111111"


def numeric_value(v: bytes) -> Decimal:
    """Decode binary numeric the way a driver does (test oracle)."""
    ndigits, weight, sign, _dscale = struct.unpack_from(">hhHh", v)
    digits = struct.unpack_from(f">{ndigits}h", v, 8)
    value = Decimal(0)
    for i, d in enumerate(digits):
        value += Decimal(d) * Decimal(10000) ** (weight - i)
    return -value if sign == 0x4000 else value


def numeric_bin(text: str) -> bytes:
    """Binary numeric of a decimal literal (test helper, independent)."""
    d = Decimal(text)
    sign = 0x4000 if d < 0 else 0
    d = abs(d)
    intpart, _, frac = format(d, "f").partition(".")
    dscale = len(frac)
    digits_str = intpart.lstrip("0")
    pad = (-len(digits_str)) % 4
    digits_str = "0" * pad + digits_str
    groups = [int(digits_str[i:i + 4]) for i in range(0, len(digits_str), 4)]
    weight = len(groups) - 1
    if frac:
        f = frac + "0" * ((-len(frac)) % 4)
        groups += [int(f[i:i + 4]) for i in range(0, len(f), 4)]
    while groups and groups[-1] == 0:
        groups.pop()
    return struct.pack(f">hhHh{len(groups)}h", len(groups), weight, sign, dscale, *groups)


# ---------------------------------------------------------------- text types


@pytest.mark.parametrize("oid", [Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR, Oid.NAME])
@pytest.mark.parametrize("fmt", [0, 1])
def test_text_styles(oid: int, fmt: int) -> None:
    assert rule_fn("last4", oid, fmt, KEY)(b"4111-1111-1111-1111") == b"XXXX-XXXX-XXXX-1111"
    assert rule_fn("last4", oid, fmt, KEY)(b"4111111111111111    ") == b"XXXXXXXXXXXX1111    "
    assert rule_fn("first6_last4", oid, fmt, KEY)(PAN) == b"411111XXXXXX1111"
    assert rule_fn("first6_last4", oid, fmt, KEY)(b"12345678") == b"XXXX5678"
    assert rule_fn("redact", oid, fmt, KEY)(PAN) == REDACTED
    assert rule_fn("null", oid, fmt, KEY)(PAN) is None
    h = rule_fn("hmac", oid, fmt, KEY)
    assert h(PAN) == h(PAN) != h(b"5555555555554444")
    assert len(h(PAN) or b"") == 16 and not contains_pan(h(PAN) or b"")
    assert rule_fn("hmac", oid, fmt, b"other key" * 4)(PAN) != h(PAN)


def test_hmac_is_hmac_sha256() -> None:
    from maskd.styles import _hmac_bytes

    for key in (b"k", KEY, b"x" * 100):
        for msg in (b"", PAN, b"y" * 200):
            assert _hmac_bytes(key, msg) == hmac.digest(key, msg, "sha256")
    assert rule_fn("hmac", Oid.TEXT, 0, KEY)(PAN) == hmac.digest(KEY, PAN, "sha256").hex()[
        :16].encode()


def test_unknown_style_fails_closed() -> None:
    with pytest.raises(ValueError, match="unknown mask style"):
        rule_fn("last5", Oid.TEXT, 0, KEY)


def test_text_content_scan() -> None:
    fn = content_fn(Oid.TEXT, 0)
    assert fn is not None
    v = b"paid with 4111 1111 1111 1111 today"
    assert fn(v) == b"paid with XXXX XXXX XXXX 1111 today"
    clean = b"nothing to see 12345"
    assert fn(clean) is clean  # same object: nothing counted
    assert content_fn(Oid.INT4, 0) is None
    assert content_fn(Oid.TIMESTAMPTZ, 1) is None


# ---------------------------------------------------------------- numbers


def test_int8_text_and_binary() -> None:
    assert rule_fn("last4", Oid.INT8, 0, KEY)(PAN) == b"1111"
    assert rule_fn("first6_last4", Oid.INT8, 0, KEY)(b"-5555555555554444") == b"-4444"
    assert rule_fn("redact", Oid.INT8, 0, KEY)(PAN) == b"0"
    binary = struct.pack(">q", int(PAN))
    assert struct.unpack(">q", rule_fn("last4", Oid.INT8, 1, KEY)(binary) or b"")[0] == 1111
    assert struct.unpack(">q", rule_fn("redact", Oid.INT8, 1, KEY)(binary) or b"")[0] == 0
    h_text = rule_fn("hmac", Oid.INT8, 0, KEY)(PAN) or b""
    h_bin = struct.unpack(">q", rule_fn("hmac", Oid.INT8, 1, KEY)(binary) or b"")[0]
    assert int(h_text) == h_bin  # text and binary clients join on the same value
    assert 0 <= h_bin < 2**39 and len(str(h_bin)) < 13
    scan_t, scan_b = content_fn(Oid.INT8, 0), content_fn(Oid.INT8, 1)
    assert scan_t is not None and scan_b is not None
    assert scan_t(PAN) == b"1111"
    assert struct.unpack(">q", scan_b(binary) or b"")[0] == 1111
    other = struct.pack(">q", 4111111111111112)  # fails Luhn
    assert scan_b(other) is other
    small = b"1234567"
    assert scan_t(small) is small


def test_int4_rules() -> None:
    v = struct.pack(">i", 123456789)
    assert struct.unpack(">i", rule_fn("last4", Oid.INT4, 1, KEY)(v) or b"")[0] == 6789
    assert 0 <= struct.unpack(">i", rule_fn("hmac", Oid.INT4, 1, KEY)(v) or b"")[0] < 2**31
    assert rule_fn("last4", Oid.INT4, 0, KEY)(b"123456789") == b"6789"


def test_numeric_text_and_binary() -> None:
    assert rule_fn("last4", Oid.NUMERIC, 0, KEY)(b"4111111111111111.00") == b"1111.00"
    scan = content_fn(Oid.NUMERIC, 0)
    assert scan is not None
    assert scan(b"4111111111111111.00") == b"1111.00"
    for text in ("4111111111111111", "-5555555555554444.25", "378282246310005"):
        b = numeric_bin(text)
        assert numeric_value(b) == Decimal(text)  # helper sanity
        fn = content_fn(Oid.NUMERIC, 1)
        assert fn is not None
        out = fn(b) or b""
        assert out is not b
        want = Decimal(text.split(".")[0][-4:]) * (-1 if text.startswith("-") else 1)
        assert numeric_value(out) == want
        assert struct.unpack_from(">h", out, 6)[0] == struct.unpack_from(">h", b, 6)[0]
    amount = numeric_bin("1234.56")
    fn = content_fn(Oid.NUMERIC, 1)
    assert fn is not None and fn(amount) is amount
    assert numeric_value(rule_fn("redact", Oid.NUMERIC, 1, KEY)(amount) or b"") == 0
    assert numeric_value(rule_fn("last4", Oid.NUMERIC, 1, KEY)(numeric_bin(PAN.decode()))
                         or b"") == 1111
    assert numeric_value(encode_numeric(10000)) == 10000
    assert numeric_value(encode_numeric(123456789012, negative=True, dscale=2)) \
        == Decimal(-123456789012)


# ---------------------------------------------------------------- json, bytea


def test_json_and_jsonb() -> None:
    doc = json.dumps({"card": "4111 1111 1111 1111", "n": 5555555555554444}).encode()
    for oid in (Oid.JSON, Oid.JSONB):
        fn = content_fn(oid, 0)
        assert fn is not None
        out = json.loads(fn(doc) or b"")
        assert out == {"card": "XXXX XXXX XXXX 1111", "n": "XXXXXXXXXXXX4444"}
    fn = content_fn(Oid.JSONB, 1)
    assert fn is not None
    out_b = fn(b"\x01" + doc) or b""
    assert out_b[:1] == b"\x01" and json.loads(out_b[1:])["card"] == "XXXX XXXX XXXX 1111"
    assert json.loads(rule_fn("last4", Oid.JSON, 0, KEY)(doc) or b"").endswith("XXXXXXXXXXXX4444}")
    assert json.loads(rule_fn("redact", Oid.JSONB, 0, KEY)(doc) or b"") == "[redacted]"
    jb = rule_fn("hmac", Oid.JSONB, 1, KEY)(b"\x01" + doc) or b""
    assert jb[:1] == b"\x01" and len(json.loads(jb[1:])) == 16


def test_bytea_text_and_binary() -> None:
    hexv = b"\\x" + b"card:4111111111111111".hex().encode()
    fn = content_fn(Oid.BYTEA, 0)
    assert fn is not None
    out = fn(hexv) or b""
    assert bytes.fromhex(out[2:].decode()) == b"card:XXXXXXXXXXXX1111"
    fnb = content_fn(Oid.BYTEA, 1)
    assert fnb is not None
    assert fnb(b"card:4111111111111111") == b"card:XXXXXXXXXXXX1111"
    r = rule_fn("last4", Oid.BYTEA, 0, KEY)(hexv) or b""
    assert bytes.fromhex(r[2:].decode()) == b"card:XXXXXXXXXXXX1111"
    assert rule_fn("redact", Oid.BYTEA, 1, KEY)(b"\x00\x01") == REDACTED


# ---------------------------------------------------------------- containers


def _array(elem_oid: int, elems: list[bytes | None]) -> bytes:
    out = struct.pack(">iiIii", 1, int(any(e is None for e in elems)), elem_oid, len(elems), 1)
    for e in elems:
        out += b"\xff\xff\xff\xff" if e is None else struct.pack(">i", len(e)) + e
    return out


def test_binary_array_of_int8_and_text() -> None:
    fn = content_fn(1016, 1)  # int8[]
    assert fn is not None
    arr = _array(Oid.INT8, [struct.pack(">q", int(PAN)), None, struct.pack(">q", 7)])
    out = fn(arr) or b""
    assert out != arr and len(out) == len(arr)
    assert struct.unpack_from(">q", out, 24)[0] == 1111
    tarr = _array(Oid.TEXT, [b"x 4111111111111111", b"ok"])
    fn2 = content_fn(1009, 1)
    assert fn2 is not None
    assert b"XXXXXXXXXXXX1111" in (fn2(tarr) or b"")


def test_binary_record() -> None:
    rec = struct.pack(">i", 2) + struct.pack(">Ii", Oid.INT8, 8) + struct.pack(">q", int(PAN)) \
        + struct.pack(">Ii", Oid.TEXT, 3) + b"abc"
    fn = content_fn(Oid.RECORD, 1)
    assert fn is not None
    out = fn(rec) or b""
    assert struct.unpack_from(">q", out, 12)[0] == 1111 and out.endswith(b"abc")
    # a rule on a record column: every field masked by its own type
    r = rule_fn("last4", Oid.RECORD, 1, KEY)(rec) or b""
    assert struct.unpack_from(">q", r, 12)[0] == 1111


def test_unknown_binary_rule_becomes_null() -> None:
    assert rule_fn("last4", Oid.UUID, 1, KEY)(b"\x00" * 16) is None


def test_number_array_text_keeps_parseable() -> None:
    fn = content_fn(1016, 0)
    assert fn is not None
    out = fn(b"{4111111111111111,42}") or b""
    assert out == b"{0000000000001111,42}"
    assert [int(x) for x in out.strip(b"{}").split(b",")] == [1111, 42]


def test_text_form_arrays_and_other_types_under_rules() -> None:
    assert rule_fn("last4", 1016, 0, KEY)(b"{4111111111111111,NULL,-42}") == b"{1111,NULL,-42}"
    assert rule_fn("redact", 1231, 0, KEY)(b"{4111111111111111.5}") == b"{0}"
    assert rule_fn("redact", 1009, 0, KEY)(b'{"4111 1111"}') == b"{}"
    assert (rule_fn("hmac", 1009, 0, KEY)(b"{a}") or b"")[:1] == b"{"
    assert rule_fn("redact", Oid.DATE, 0, KEY)(b"2026-11-26") is None
    assert rule_fn("last4", Oid.DATE, 0, KEY)(b"2026-11-26") == b"XXXX-11-26"


# ---------------------------------------------------------------- strict rule

NON_LUHN = b"4111111111111112"  # a stored card number that fails the Luhn check


def _strict(oid: int, fmt: int, v: bytes) -> bytes | None:
    fn = strict_fn(oid, fmt)
    assert fn is not None
    return fn(v)


def test_strict_rule_masks_binary_numbers_content_detection_passes() -> None:
    """A computed column (a cursor's card_number::numeric) is masked whole
    whatever its digits: content detection leaves a non-Luhn number alone."""
    as_int8 = struct.pack(">q", int(NON_LUHN))
    assert content_fn(Oid.INT8, 1)(as_int8) is as_int8  # type: ignore[misc]
    assert _strict(Oid.INT8, 1, as_int8) == struct.pack(">q", 0)
    as_numeric = numeric_bin(NON_LUHN.decode() + ".50")
    assert content_fn(Oid.NUMERIC, 1)(as_numeric) is as_numeric  # type: ignore[misc]
    assert numeric_value(_strict(Oid.NUMERIC, 1, as_numeric) or b"") == 0
    assert numeric_value(_strict(Oid.NUMERIC, 1, numeric_bin("-" + NON_LUHN.decode())) or b"") == 0
    assert struct.unpack(">d", _strict(Oid.FLOAT8, 1, struct.pack(">d", float(NON_LUHN))) or b"") == (0.0,)
    assert _strict(790, 1, as_int8) == struct.pack(">q", 0)  # money: cents in an int8


def test_strict_rule_keeps_short_numbers_and_types_without_digits() -> None:
    for oid, v in [(Oid.INT8, struct.pack(">q", 10**12 - 1)),
                   (Oid.NUMERIC, numeric_bin("999999999999.99")),
                   (Oid.FLOAT8, struct.pack(">d", float("nan"))),
                   (Oid.FLOAT8, struct.pack(">d", -1.5e11)),
                   (Oid.TEXT, b"order 123456789012")]:
        assert _strict(oid, 1, v) is v
    assert strict_fn(Oid.TIMESTAMPTZ, 1) is None and strict_fn(Oid.INT4, 1) is None


def test_strict_rule_in_text_and_text_like_binary() -> None:
    assert _strict(Oid.NUMERIC, 0, NON_LUHN + b".00") == b"0"  # still a number
    assert _strict(Oid.INT8, 0, b"-" + NON_LUHN) == b"0"
    assert _strict(Oid.FLOAT8, 0, b"4.111111111111112e+15") == b"4." + b"X" * 15 + b"e+15"
    for oid in (Oid.TEXT, Oid.VARCHAR, Oid.BYTEA, Oid.JSON):
        assert _strict(oid, 1, b"ref " + NON_LUHN) == b"ref " + b"X" * 16
    assert _strict(Oid.JSONB, 1, b'\x01{"n": ' + NON_LUHN + b"}") == b'\x01{"n": ' + b"X" * 16 + b"}"


def test_strict_rule_walks_binary_arrays_and_records() -> None:
    arr = _array(Oid.NUMERIC, [numeric_bin("7"), numeric_bin(NON_LUHN.decode()), None])
    out = _strict(1231, 1, arr) or b""  # numeric[]
    first = len(numeric_bin("7"))
    assert out[:24 + first] == arr[:24 + first]
    (second,) = struct.unpack_from(">i", out, 24 + first)
    assert numeric_value(out[28 + first:28 + first + second]) == 0
    assert out.endswith(b"\xff\xff\xff\xff")
    record = struct.pack(">i", 2)
    for oid, v in [(Oid.INT8, struct.pack(">q", int(NON_LUHN))), (Oid.TEXT, b"x")]:
        record += struct.pack(">Ii", oid, len(v)) + v
    masked = _strict(Oid.RECORD, 1, record) or b""
    assert struct.pack(">q", int(NON_LUHN)) not in masked and masked.endswith(b"x")
