"""Column rule styles and content masking, per PostgreSQL type and format.

A result value arrives as the bytes of a DataRow field: text format (0) or
binary format (1), with the column's type OID. Everything here turns one
non-NULL value into its masked replacement while keeping it a valid value of
the same type and format, so client drivers keep working:

* text-like types (text, varchar, bpchar, name, unknown text): digits are
  replaced by ``X``; separators and other characters stay.
* numbers (int2/int4/int8/numeric): a number cannot hold an ``X``. A masked
  number is the number formed by its last four integer digits
  (4111111111111111 → 1111, sign and numeric scale kept); ``redact`` gives 0;
  ``hmac`` gives a 39-bit (int8/numeric), 31-bit (int4) or 15-bit (int2)
  non-negative integer, which can never look like a 13+ digit PAN.
* json/jsonb: PANs in strings are masked in place; a masked bare number is
  turned into a JSON string so the document stays valid. Whole-value styles
  return a JSON string. jsonb binary format is the text behind a version
  byte ``1``.
* bytea: the hex text form (``\\x...``) is decoded, masked and re-encoded;
  binary format is the raw bytes.
* binary arrays and records are self-describing (element/field type OIDs),
  so they are walked and each element masked by its own type.
* other binary types cannot be rewritten safely: a column rule turns them
  into NULL; content scanning masks ASCII digit runs in their raw bytes.

docs/masking.md documents each style for each type.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable

from maskd.detect import MASK_CHAR, is_pan_digits, mask_bytes, strict_mask

__all__ = [
    "REDACTED",
    "STYLES",
    "Oid",
    "ValueFn",
    "content_fn",
    "rule_fn",
]

STYLES = frozenset({"last4", "first6_last4", "redact", "null", "hmac"})
REDACTED = b"[redacted]"
HMAC_HEX_CHARS = 16  # 64 bits: plenty for joins and counting, not reversible

# A function from one non-NULL field value to its replacement (None = NULL).
ValueFn = Callable[[bytes], bytes | None]


class Oid:
    """The type OIDs maskd understands (pg_type.dat)."""

    BOOL = 16
    BYTEA = 17
    NAME = 19
    INT8 = 20
    INT2 = 21
    INT4 = 23
    TEXT = 25
    OID = 26
    JSON = 114
    XML = 142
    FLOAT4 = 700
    FLOAT8 = 701
    UNKNOWN = 705
    BPCHAR = 1042
    VARCHAR = 1043
    DATE = 1082
    TIME = 1083
    TIMESTAMP = 1114
    TIMESTAMPTZ = 1184
    INTERVAL = 1186
    NUMERIC = 1700
    UUID = 2950
    RECORD = 2249
    JSONB = 3802


TEXT_TYPES = frozenset({Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR, Oid.NAME, Oid.UNKNOWN, Oid.XML})
INT_TYPES = frozenset({Oid.INT2, Oid.INT4, Oid.INT8})
NUMBER_TYPES = INT_TYPES | {Oid.NUMERIC}
JSON_TYPES = frozenset({Oid.JSON, Oid.JSONB})
# Types whose values can never spell 13 digits: content scanning skips them.
# (int2/int4 are too short; float output is in e-notation beyond 15 digits,
# a PAN cast to float is a derived column for the analysis.)
NO_PAN_TYPES = frozenset({Oid.BOOL, Oid.INT2, Oid.INT4, Oid.OID, Oid.FLOAT4, Oid.FLOAT8,
                          Oid.DATE, Oid.TIME, Oid.TIMESTAMP, Oid.TIMESTAMPTZ,
                          Oid.INTERVAL, Oid.UUID})
# Text-format array OIDs whose elements are numbers: mask with 0, not X.
NUMBER_ARRAY_TYPES = frozenset({1005, 1007, 1016, 1231})

_DIGITS = b"0123456789"
DIGITS_TO_X = bytes.maketrans(_DIGITS, MASK_CHAR * 10)  # for bytes.translate
_INT8 = struct.Struct(">q")
_INT4 = struct.Struct(">i")
_INT2 = struct.Struct(">h")
_NUMERIC_HEAD = struct.Struct(">hhHh")
_NUMERIC_NEG = 0x4000
_I32 = struct.Struct(">i")
_FLOAT8 = struct.Struct(">d")
_MONEY = 790
_U32 = struct.Struct(">I")


# --------------------------------------------------------------------------
# text helpers


def last4_text(v: bytes) -> bytes:
    """All digits but the last four become ``X``; everything else stays."""
    if v[-4:].isdigit():  # fast path: the value ends with its last four digits
        return v[:-4].translate(DIGITS_TO_X) + v[-4:]
    buf = bytearray(v)
    seen = 0
    x = MASK_CHAR[0]
    for i in range(len(buf) - 1, -1, -1):
        if 48 <= buf[i] <= 57:
            seen += 1
            if seen > 4:
                buf[i] = x
    return bytes(buf)


def first6_last4_text(v: bytes) -> bytes:
    """First six and last four digits shown, the rest ``X``. A value with
    fewer than 13 digits is not a PAN-length number and falls back to
    ``last4`` so that short values are not shown almost whole."""
    pos = [i for i, c in enumerate(v) if 48 <= c <= 57]
    if len(pos) < 13:
        return last4_text(v)
    buf = bytearray(v)
    x = MASK_CHAR[0]
    for i in pos[6:-4]:
        buf[i] = x
    return bytes(buf)


class _HmacSha256:
    """HMAC-SHA-256 (RFC 2104) with the padded key states computed once:
    two hash-state copies per value instead of re-keying, about twice as
    fast as ``hmac.digest`` for short values. Equal to ``hmac.digest``."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_HMACS: dict[bytes, _HmacSha256] = {}


def _hmac_bytes(key: bytes, v: bytes) -> bytes:
    h = _HMACS.get(key)
    if h is None:
        if len(_HMACS) > 16:
            _HMACS.clear()
        h = _HMACS[key] = _HmacSha256(key)
    return h.digest(v)


def hmac_text(key: bytes, v: bytes) -> bytes:
    """HMAC-SHA-256 of the value, first 16 hex characters. Deterministic per
    key, so masked columns can still be joined, grouped and counted. In the
    ~1e-5 case that the hex spells a PAN-like run, that run is masked
    (deterministically, so joins still work)."""
    out = _hmac_bytes(key, v).hex()[:HMAC_HEX_CHARS].encode("ascii")
    return mask_bytes(out)[0]


def _hmac_int(key: bytes, v: bytes, bits: int) -> int:
    return int.from_bytes(_hmac_bytes(key, v)[:8], "big") >> (64 - bits)


def json_string(v: bytes) -> bytes:
    """``v`` as a JSON string literal (``v`` is ASCII masking output)."""
    return b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# --------------------------------------------------------------------------
# numbers


def _split_number(v: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(sign, integer digits, rest) of a decimal text number; None for NaN,
    Infinity and anything unexpected (left alone)."""
    sign = b""
    if v[:1] in (b"-", b"+"):
        sign, v = v[:1], v[1:]
    end = 0
    while end < len(v) and 48 <= v[end] <= 57:
        end += 1
    if end == 0:
        return None
    return sign if sign == b"-" else b"", v[:end], v[end:]


def _last4_number_text(v: bytes) -> bytes:
    parts = _split_number(v)
    if parts is None:
        return v
    sign, digits, rest = parts
    return sign + b"%d" % (int(digits) % 10000) + rest


def decode_numeric(v: bytes) -> tuple[int, bool, int] | None:
    """(integer part, negative, dscale) of a binary numeric; None for
    NaN/Infinity. The fraction does not matter: a PAN is an integer."""
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(v)
    if sign not in (0, _NUMERIC_NEG):
        return None
    digits = struct.unpack_from(f">{ndigits}h", v, 8)
    acc = 0
    for i in range(weight + 1):
        acc = acc * 10000 + (digits[i] if i < ndigits else 0)
    return acc, sign == _NUMERIC_NEG, dscale


def encode_numeric(value: int, negative: bool = False, dscale: int = 0) -> bytes:
    """Binary numeric of a non-negative integer ``value`` (sign separate)."""
    groups: list[int] = []
    while value:
        value, r = divmod(value, 10000)
        groups.append(r)
    groups.reverse()
    weight = len(groups) - 1 if groups else 0
    while groups and groups[-1] == 0:  # PostgreSQL strips trailing zero groups
        groups.pop()
    sign = _NUMERIC_NEG if negative and groups else 0
    return _NUMERIC_HEAD.pack(len(groups), weight, sign, dscale) + struct.pack(
        f">{len(groups)}h", *groups)


def _number_rule(style: str, oid: int, fmt: int, key: bytes) -> ValueFn:
    bits = {Oid.INT2: 15, Oid.INT4: 31}.get(oid, 39)
    if fmt == 0:
        if style == "redact":
            return lambda v: b"0"
        if style == "hmac":
            def text_hmac(v: bytes) -> bytes:
                parts = _split_number(v)
                canon = parts[0] + parts[1] if parts else v
                return b"%d" % _hmac_int(key, canon, bits)
            return text_hmac
        return _last4_number_text  # last4, first6_last4
    if oid in INT_TYPES:
        packer = {Oid.INT2: _INT2, Oid.INT4: _INT4, Oid.INT8: _INT8}[oid]
        if style == "redact":
            zero = packer.pack(0)
            return lambda v: zero
        if style == "hmac":
            return lambda v: packer.pack(_hmac_int(key, b"%d" % packer.unpack(v)[0], bits))

        def int_last4(v: bytes) -> bytes:
            n = packer.unpack(v)[0]
            return packer.pack(-(-n % 10000) if n < 0 else n % 10000)
        return int_last4
    # binary numeric
    if style == "redact":
        zero = encode_numeric(0)
        return lambda v: zero

    def numeric_rule(v: bytes) -> bytes:
        dec = decode_numeric(v)
        if dec is None:
            return encode_numeric(0)
        n, neg, dscale = dec
        if style == "hmac":
            return encode_numeric(_hmac_int(key, (b"-%d" if neg else b"%d") % n, bits))
        return encode_numeric(n % 10000, neg, dscale)
    return numeric_rule


# --------------------------------------------------------------------------
# column rules


def _text_style(style: str, key: bytes) -> Callable[[bytes], bytes]:
    if style == "last4":
        return last4_text
    if style == "first6_last4":
        return first6_last4_text
    if style == "hmac":
        return lambda v: hmac_text(key, v)
    return lambda v: REDACTED


def rule_fn(style: str, oid: int, fmt: int, key: bytes) -> ValueFn:
    """The function applying column rule ``style`` to non-NULL values of one
    column. Unknown styles raise ValueError: a policy typo must fail closed,
    not pass data through."""
    if style not in STYLES:
        raise ValueError(f"unknown mask style {style!r}; expected one of {sorted(STYLES)}")
    if style == "null":
        return lambda v: None
    if oid in NUMBER_TYPES:
        return _number_rule(style, oid, fmt, key)
    text = _text_style(style, key)
    if oid in TEXT_TYPES:
        return text
    if oid in JSON_TYPES:
        def json_rule(v: bytes) -> bytes:
            body = v[1:] if fmt == 1 and oid == Oid.JSONB else v
            out = json_string(text(body))
            return b"\x01" + out if fmt == 1 and oid == Oid.JSONB else out
        return json_rule
    if oid == Oid.BYTEA:
        if fmt == 1:
            return text

        def bytea_rule(v: bytes) -> bytes:
            raw = _bytea_decode(v)
            return b"\\x" + text(raw if raw is not None else v).hex().encode("ascii")
        return bytea_rule
    if fmt == 0:
        return _text_form_rule(style, oid, key, text)
    # Binary arrays and records are recognised structurally; any other binary
    # value of a type we cannot rewrite becomes NULL.
    return _binary_container_fn(lambda e_oid: rule_fn(style, e_oid, 1, key))


_NUMBER_TOKEN = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?")
_NUMBER_ARRAY_ELEMENT = {1005: Oid.INT2, 1007: Oid.INT4, 1016: Oid.INT8, 1231: Oid.NUMERIC}


def _text_form_rule(style: str, oid: int, key: bytes,
                    text: Callable[[bytes], bytes]) -> ValueFn:
    """A rule on a text-form value of a type without its own handling.

    Number arrays are masked number by number (``{4111...,42}`` →
    ``{1111,42}``), so they stay valid arrays. Other array literals keep the
    text masking of their digits; ``redact`` gives the empty array ``{}`` and
    ``hmac`` a one-element array. Any other type (dates, uuids, ranges...)
    gets the text masking for ``last4``/``first6_last4``/``hmac`` as the
    policy asked, but ``redact`` gives NULL: a marker like ``[redacted]`` is
    not valid input for those types and would break the client's parser."""
    elem = _NUMBER_ARRAY_ELEMENT.get(oid)
    if elem is not None:
        number = _number_rule(style, elem, 0, key)

        def number_array(v: bytes) -> bytes:
            return _NUMBER_TOKEN.sub(lambda m: number(m.group()) or b"0", v)
        return number_array

    def other(v: bytes) -> bytes | None:
        if v[:1] == b"{":
            if style == "redact":
                return b"{}"
            if style == "hmac":
                return b"{" + text(v) + b"}"
            return text(v)
        return None if style == "redact" else text(v)
    return other


# --------------------------------------------------------------------------
# content scanning


def _bytea_decode(v: bytes) -> bytes | None:
    if v[:2] == b"\\x":
        try:
            return bytes.fromhex(v[2:].decode("ascii"))
        except ValueError:
            return None
    return None


def _scan_text(v: bytes) -> bytes:
    return mask_bytes(v)[0]


def _scan_text_first6(v: bytes) -> bytes:
    return mask_bytes(v, "first6_last4")[0]


def _scan_number_text(v: bytes) -> bytes:
    if len(v) < 13:
        return v
    parts = _split_number(v)
    if parts is None or not is_pan_digits(parts[1]):
        return v
    return _last4_number_text(v)


def _scan_int8_binary(v: bytes) -> bytes:
    n = _INT8.unpack(v)[0]
    if -10**12 < n < 10**12 or not is_pan_digits(b"%d" % abs(n)):
        return v
    return _INT8.pack(-(-n % 10000) if n < 0 else n % 10000)


def _scan_numeric_binary(v: bytes) -> bytes:
    if len(v) < 12:  # fewer than 2 base-10000 groups: < 8 digits
        return v
    dec = decode_numeric(v)
    if dec is None or dec[0] < 10**12 or not is_pan_digits(b"%d" % dec[0]):
        return v
    n, neg, dscale = dec
    return encode_numeric(n % 10000, neg, dscale)


def content_fn(oid: int, fmt: int, style: str = "last4") -> ValueFn | None:
    """The content-scanning function for one column, or None when values of
    this type and format can never hold a PAN (skipped at no cost). The
    function returns the very same object when nothing was found, so the
    caller counts masked values with an identity test."""
    if oid in NO_PAN_TYPES:
        return None
    scan = _scan_text_first6 if style == "first6_last4" else _scan_text
    if oid == Oid.INT8:
        return _scan_number_text if fmt == 0 else _scan_int8_binary
    if oid == Oid.NUMERIC:
        return _scan_number_text if fmt == 0 else _scan_numeric_binary
    if oid in JSON_TYPES:
        if fmt == 1 and oid == Oid.JSONB:
            def jsonb_bin(v: bytes) -> bytes:
                out, n = mask_bytes(v[1:], style, json=True)
                return b"\x01" + out if n else v
            return jsonb_bin
        return lambda v: mask_bytes(v, style, json=True)[0]
    if oid == Oid.BYTEA and fmt == 0:
        return lambda v: mask_bytes(v, style, bytea=True)[0]
    if fmt == 0:
        if oid in NUMBER_ARRAY_TYPES:
            # {4111111111111111,...}: a 0 keeps the array parseable; a number
            # starting with 0 has no issuer prefix.
            return lambda v: mask_bytes(v, style, mask=b"0")[0]
        return scan  # text, varchar, bytea hex, arrays, records, xml, ...
    if oid in TEXT_TYPES or oid == Oid.BYTEA:
        return scan
    return _binary_container_fn(lambda e_oid: content_fn(e_oid, 1, style), fallback=scan)


def strict_fn(oid: int, fmt: int) -> ValueFn | None:
    """The strict rule for one computed column or COPY field: a value that
    could carry a card number's digits in any order or spelling is masked as
    a whole, Luhn-valid or not (a reshaped or non-Luhn PAN passes content
    detection). Text: runs of 13 or more digits, and hex that spells them,
    become X (a number becomes 0, so it still parses). Binary: an int8,
    money, float8 or numeric of 13 or more integer digits becomes 0,
    text-like values are treated as in text, arrays and records element by
    element. None for binary types that cannot hold 13 digits; the very
    same object back when nothing was masked."""
    if fmt == 0:  # any type: a float prints 15 to 17 digits of a cast PAN
        return _strict_number_text if oid in NUMBER_TYPES else _strict_text
    if oid == Oid.FLOAT8:
        return _strict_float8_binary
    if oid in NO_PAN_TYPES:
        return None
    if oid in (Oid.INT8, _MONEY):
        return _strict_int8_binary
    if oid == Oid.NUMERIC:
        return _strict_numeric_binary
    if oid == Oid.JSONB:
        return _strict_jsonb_binary
    if oid in TEXT_TYPES or oid in (Oid.BYTEA, Oid.JSON):
        return _strict_text
    return _binary_container_fn(lambda e_oid: strict_fn(e_oid, 1), fallback=_strict_text)


def strict_needs_digits(oid: int, fmt: int) -> bool:
    """True when :func:`strict_fn` can only change a value that holds 13
    ASCII digits (a cheap test skips the rest); False for binary numbers and
    containers, whose digits are not ASCII."""
    return fmt == 0 or oid in TEXT_TYPES or oid in (Oid.BYTEA, Oid.JSON, Oid.JSONB)


def _strict_text(v: bytes) -> bytes:
    masked, n = strict_mask(v)
    return masked if n else v


def _strict_number_text(v: bytes) -> bytes:
    return b"0" if strict_mask(v)[1] else v


def _strict_int8_binary(v: bytes) -> bytes:
    n = _INT8.unpack(v)[0]
    return v if -10**12 < n < 10**12 else _INT8.pack(0)


def _strict_float8_binary(v: bytes) -> bytes:
    x = _FLOAT8.unpack(v)[0]
    return _FLOAT8.pack(0.0) if math.isfinite(x) and abs(x) >= 1e12 else v


def _strict_numeric_binary(v: bytes) -> bytes:
    if len(v) < 12:  # fewer than 2 base-10000 groups: < 8 digits
        return v
    dec = decode_numeric(v)
    if dec is None or dec[0] < 10**12:
        return v
    return encode_numeric(0, False, dec[2])


def _strict_jsonb_binary(v: bytes) -> bytes:
    masked, n = strict_mask(v[1:])
    return v[:1] + masked if n else v


# --------------------------------------------------------------------------
# binary arrays and records


def _binary_container_fn(element: Callable[[int], ValueFn | None],
                         fallback: ValueFn | None = None) -> ValueFn:
    """Mask a binary array or record element by element, using the element
    or field type OIDs the format carries. A value that is neither (decoded
    structurally, every length must add up) goes to ``fallback``, or
    becomes NULL when there is none."""
    cache: dict[int, ValueFn | None] = {}

    def fn_for(e_oid: int) -> ValueFn | None:
        if e_oid not in cache:
            cache[e_oid] = element(e_oid)
        return cache[e_oid]

    def container(v: bytes) -> bytes | None:
        out = _walk_array(v, fn_for)
        if out is None:
            out = _walk_record(v, fn_for)
        if out is None:
            return fallback(v) if fallback is not None else None
        return out
    return container


def _fields(v: bytes, pos: int, count: int,
            with_oid: bool) -> list[tuple[int, bytes | None]] | None:
    items: list[tuple[int, bytes | None]] = []
    n = len(v)
    for _ in range(count):
        oid = 0
        if with_oid:
            if pos + 4 > n:
                return None
            oid = _U32.unpack_from(v, pos)[0]
            pos += 4
        if pos + 4 > n:
            return None
        length = _I32.unpack_from(v, pos)[0]
        pos += 4
        if length == -1:
            items.append((oid, None))
            continue
        if length < 0 or pos + length > n:
            return None
        items.append((oid, v[pos:pos + length]))
        pos += length
    return items if pos == n else None


def _rebuild(items: list[tuple[int, bytes | None]], fn: Callable[[int, bytes], bytes | None],
             with_oid: bool) -> tuple[list[bytes], bool, bool]:
    """Re-encode fields; returns (parts, changed, produced a NULL)."""
    parts: list[bytes] = []
    changed = False
    nulls = False
    for oid, val in items:
        if with_oid:
            parts.append(_U32.pack(oid))
        if val is None:
            parts.append(b"\xff\xff\xff\xff")
            continue
        new = fn(oid, val)
        if new is not val:
            changed = True
        if new is None:
            nulls = True
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(new)))
            parts.append(new)
    return parts, changed, nulls


def _walk_array(v: bytes, fn_for: Callable[[int], ValueFn | None]) -> bytes | None:
    if len(v) < 12:
        return None
    ndim, flags, e_oid = struct.unpack_from(">iiI", v)
    if not 0 <= ndim <= 6 or flags not in (0, 1):
        return None
    head = 12 + 8 * ndim
    if len(v) < head:
        return None
    count = 1 if ndim else 0
    for d in range(ndim):
        dim = _I32.unpack_from(v, 12 + 8 * d)[0]
        if dim < 0:
            return None
        count *= dim
    items = _fields(v, head, count, with_oid=False)
    if items is None:
        return None
    efn = fn_for(e_oid)
    if efn is None:
        return v
    parts, changed, nulls = _rebuild(items, lambda _o, val: efn(val), with_oid=False)
    if not changed:
        return v
    header = bytearray(v[:head])
    if nulls:
        header[4:8] = _I32.pack(1)  # the "has nulls" flag
    return bytes(header) + b"".join(parts)


def _walk_record(v: bytes, fn_for: Callable[[int], ValueFn | None]) -> bytes | None:
    if len(v) < 4:
        return None
    nfields = _I32.unpack_from(v)[0]
    if not 0 <= nfields <= 1664:  # MaxTupleAttributeNumber
        return None
    items = _fields(v, 4, nfields, with_oid=True)
    if items is None:
        return None

    def field(oid: int, val: bytes) -> bytes | None:
        f = fn_for(oid)
        return val if f is None else f(val)
    parts, changed, _nulls = _rebuild(items, field, with_oid=True)
    if not changed:
        return v
    return v[:4] + b"".join(parts)
