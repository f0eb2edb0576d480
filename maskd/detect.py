"""PAN detection and masking for any text form a card number can take.

This module is the single definition of "what looks like a card number" in
pgwarden: maskd uses it on result values, and the audit and log scrubbers of
the other components import :func:`scrub` / :func:`contains_pan` so that no
store downstream ever holds a raw PAN (PCI DSS 3.4.1, 3.5.1).

The rule (docs/masking.md has the long form)
--------------------------------------------
* A *group* is a maximal run of ASCII digits. A *separated run* is a maximal
  sequence of groups joined by exactly one space or one dash.
* A *candidate* is a contiguous sequence of whole groups of one separated run
  holding 13 to 19 digits in total. A group of more than 19 digits is part of
  a longer digit run and never a candidate (hashes, hex, long ids).
* A candidate is a PAN when its digits pass the Luhn check and start with a
  known issuer prefix (:data:`ISSUER_PREFIXES`). Brand lengths are *not*
  enforced: a shorter or longer number with a Visa prefix still counts. False
  positives are accepted; false negatives are not.
* Hidden forms are decoded before the rule is applied: JSON ``\\u0034``-style
  escapes of digits, spaces and dashes (with any number of backslashes, so the
  doubled backslashes of COPY text and of JSON-in-JSON are seen too), and
  bytea hex output (``\\x3431...``), whose decoded bytes are scanned and whose
  masked bytes are re-encoded so the value stays valid hex.

Masking replaces every digit of a PAN except the last four (``last4``) or
except the first six and the last four (``first6_last4``) with the mask
character, ``X`` by default; separators and all other bytes are kept. After a
pass the output is scanned again until nothing is found, so the output never
contains a Luhn-valid issuer-prefixed candidate, whatever the input.

Cost: a value shorter than 13 bytes or holding fewer than 13 ASCII digits
cannot contain any of these forms and is returned after one ``len`` and one
C-level ``bytes.translate``; only the rest meets a regular expression.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import overload

import re2

__all__ = [
    "ISSUER_PREFIXES",
    "MASK_CHAR",
    "PREFILTER_LOOSE",
    "candidate_indexes",
    "contains_pan",
    "digit_count",
    "find_pans",
    "is_pan_digits",
    "luhn_ok",
    "mask_bytes",
    "mask_pans",
    "may_contain_pan",
    "scrub",
]

MASK_CHAR = b"X"
MIN_DIGITS = 13
MAX_DIGITS = 19

# (first, last, brand) inclusive ranges over same-length prefixes. Kept as data
# so docs/masking.md and the table below cannot disagree.
ISSUER_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("4", "4", "Visa"),
    ("51", "55", "Mastercard"),
    ("2221", "2720", "Mastercard (2-series)"),
    ("34", "34", "American Express"),
    ("37", "37", "American Express"),
    ("6011", "6011", "Discover"),
    ("644", "649", "Discover"),
    ("65", "65", "Discover"),
    ("3528", "3589", "JCB"),
    ("36", "36", "Diners Club"),
    ("300", "305", "Diners Club"),
    ("38", "39", "Diners Club"),
    ("62", "62", "UnionPay"),
    ("50", "50", "Maestro"),
    ("56", "69", "Maestro"),
)


def _build_prefix4() -> frozenset[bytes]:
    """Every 4-digit prefix that starts a known issuer range: one set lookup
    per candidate instead of walking the table."""
    out: set[bytes] = set()
    for lo, hi, _brand in ISSUER_PREFIXES:
        width = len(lo)
        for p in range(int(lo), int(hi) + 1):
            base = p * 10 ** (4 - width)
            for tail in range(10 ** (4 - width)):
                out.add(b"%04d" % (base + tail))
    return frozenset(out)


_PREFIX4 = _build_prefix4()
_DIGITS = b"0123456789"
_TO_INT = bytes.maketrans(_DIGITS, bytes(range(10)))
_DOUBLED = bytes.maketrans(_DIGITS, bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))
_SEPARATORS = b" -"
_SEP_CODES = frozenset(_SEPARATORS)
# Regular expressions with only character-class repeats (one C loop each in
# CPython's engine; a repeated group costs several times more per digit).
#
# Necessary condition for a plain PAN, checked before any Python work: a
# group start (no digit before it) with an issuer's first digit (2-6) and at
# least 12 more digits-or-separators after it. Loose (double separators
# pass), so a match only means "look closer". The lookbehind sits after the
# first character so the engine keeps its fast scan for the leading class.
_PREFILTER = re.compile(rb"[2-6](?<![0-9].)[0-9 -]{12,}")
# The same without the boundary: sound on framed data (DataRow bodies),
# where a length byte may be an ASCII digit right before a value.
PREFILTER_LOOSE = re.compile(rb"[2-6][0-9 -]{12,}")
# Regions of digits and separators long enough to hold a separated run of
# 13+ digits, and the exact separated runs inside them.
_REGION = re.compile(rb"[0-9][0-9 -]{12,}")
_RUNS = re.compile(rb"[0-9]+(?:[ -][0-9]+)*")
# RE2 (linear time, no per-position backtracking) for scanning a whole
# batch joined into one buffer; RE2 has no lookbehind, so the boundary is
# consumed and group 1 is the candidate.
_BATCH = re2.compile(rb"(?:^|[^0-9])([2-6](?:[ -]?[0-9]){12,})")
_BATCH_LOOSE = re2.compile(rb"()[2-6](?:[ -]?[0-9]){12,}")
# bytea hex output, possibly behind doubled backslashes (COPY text, JSON).
_HEX = re.compile(rb"\\[xX]((?:[0-9a-fA-F]{2})+)")
# JSON \u escapes of a digit, space or dash (any number of backslashes).
_ESC = re.compile(rb"\\+u00(3[0-9]|20|2[dD])")
# A JSON number token, to quote a bare numeric PAN masked inside json/jsonb.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def digit_count(data: bytes) -> int:
    """Number of ASCII digits in ``data`` (C speed: one translate)."""
    return len(data) - len(data.translate(None, _DIGITS))


def may_contain_pan(data: bytes) -> bool:
    """Cheap necessary condition for any PAN form (plain, separated, JSON
    escaped or hex): at least 13 ASCII digits. ``False`` is definitive."""
    return len(data) >= MIN_DIGITS and len(data) - len(data.translate(None, _DIGITS)) >= MIN_DIGITS


def luhn_ok(digits: bytes) -> bool:
    """Luhn (mod 10) check of an ASCII digit string."""
    return (sum(digits[-1::-2].translate(_TO_INT))
            + sum(digits[-2::-2].translate(_DOUBLED))) % 10 == 0


def is_pan_digits(digits: bytes) -> bool:
    """True for 13 to 19 ASCII digits with an issuer prefix that pass Luhn."""
    return (MIN_DIGITS <= len(digits) <= MAX_DIGITS and digits[:4] in _PREFIX4
            and luhn_ok(digits))


# --------------------------------------------------------------------------
# candidates in plain text


def _run_candidates(run: bytes, base: int, out: list[tuple[int, int]]) -> None:
    """Append the spans (absolute offsets) of the PANs inside one separated
    run of at least 13 digits."""
    digits = run.translate(None, _SEPARATORS)
    ndigits = len(digits)
    if ndigits <= MAX_DIGITS and is_pan_digits(digits):
        # The whole run is a PAN: masking it leaves only its last four
        # digits, which any other qualifying window inside it would keep
        # too, so there is nothing more to find here.
        out.append((base, base + len(run)))
        return
    if ndigits == len(run):
        return  # one group that is not a PAN (or longer than 19 digits)
    # A proper window drops at least the first or the last group; when even
    # the larger of those leaves fewer than 13 digits there is none to check
    # (a number before a date, "523456 2026-11-05", ends here).
    cuts = [i for i in (run.find(b" "), run.find(b"-")) if i >= 0]
    last = len(run) - 1 - max(run.rfind(b" "), run.rfind(b"-"))
    if ndigits <= MAX_DIGITS and ndigits - min(min(cuts), last) < MIN_DIGITS:
        return
    groups: list[tuple[int, int]] = []
    pos = 0
    for g in run.replace(b"-", b" ").split(b" "):
        groups.append((pos, pos + len(g)))
        pos += len(g) + 1
    for i, (gs, _ge) in enumerate(groups):
        total = 0
        for j in range(i, len(groups)):
            s, e = groups[j]
            total += e - s
            if total > MAX_DIGITS:
                break
            if total >= MIN_DIGITS and is_pan_digits(run[gs:e].translate(None, _SEPARATORS)):
                out.append((base + gs, base + e))


def _plain_spans(data: bytes,
                 exclude: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for region in _REGION.finditer(data):
        for m in _RUNS.finditer(data, region.start(), region.end()):
            s, e = m.span()
            if e - s < MIN_DIGITS:
                continue
            if exclude and any(s < xe and xs < e for xs, xe in exclude):
                continue
            _run_candidates(m.group(), s, out)
    return out


def _keep_positions(data: bytes, span: tuple[int, int], style: str) -> list[int]:
    """Offsets of the digits of ``span`` that must be masked."""
    s, e = span
    pos = [i for i in range(s, e) if 48 <= data[i] <= 57]
    if style == "first6_last4" and len(pos) > 10:
        return pos[6:-4]
    return pos[:-4]


_MASK_TABLES: dict[bytes, bytes] = {}


def _mask_table(mask: bytes) -> bytes:
    table = _MASK_TABLES.get(mask)
    if table is None:
        table = _MASK_TABLES[mask] = bytes.maketrans(_DIGITS, mask * 10)
    return table


def _apply(data: bytes, spans: list[tuple[int, int]], style: str, mask: bytes) -> bytes:
    if style == "last4":
        # Fast path: disjoint spans that end in four digits are masked with
        # one C-level translate each.
        table = _mask_table(mask)
        parts: list[bytes] = []
        pos = 0
        for s, e in spans:
            if s < pos or not data[e - 4:e].isdigit():
                break
            parts.append(data[pos:s])
            parts.append(data[s:e - 4].translate(table))
            pos = e - 4
        else:
            parts.append(data[pos:])
            return b"".join(parts)
    buf = bytearray(data)
    m = mask[0]
    for span in spans:
        for i in _keep_positions(data, span, style):
            buf[i] = m
    return bytes(buf)


# --------------------------------------------------------------------------
# hidden forms


def _mask_hex(data: bytes, style: str, mask: bytes) -> tuple[bytes, int, list[tuple[int, int]]]:
    """Mask PANs inside bytea hex tokens; returns the hex token spans so that,
    for a bytea value, the plain pass leaves their digits (hex, not decimal)
    alone."""
    tokens: list[tuple[int, int]] = []
    parts: list[bytes] = []
    count = 0
    pos = 0
    for m in _HEX.finditer(data):
        tokens.append(m.span(1))
        if m.end(1) - m.start(1) < 2 * MIN_DIGITS:
            continue
        raw = bytes.fromhex(m.group(1).decode("ascii"))
        masked, n = _mask_text(raw, style, mask, False)
        if n:
            count += n
            parts.append(data[pos:m.start(1)])
            parts.append(masked.hex().encode("ascii"))
            pos = m.end(1)
    if count:
        parts.append(data[pos:])
        data = b"".join(parts)
    return data, count, tokens


def _mask_escaped(data: bytes, style: str, mask: bytes) -> tuple[bytes, int]:
    """Mask PANs written (partly) as JSON ``\\u00XX`` escapes. The value is
    decoded into a normalised view with a map back to the original bytes;
    masked digits become a plain mask character, everything else keeps its
    original spelling."""
    origin: list[tuple[int, int]] = []
    norm = bytearray()
    pos = 0
    for m in _ESC.finditer(data):
        for k in range(pos, m.start()):
            origin.append((k, k + 1))
        norm += data[pos:m.start()]
        norm.append(int(m.group(1), 16))
        origin.append(m.span())
        pos = m.end()
    if not origin and pos == 0:
        return data, 0
    for k in range(pos, len(data)):
        origin.append((k, k + 1))
    norm += data[pos:]
    view = bytes(norm)
    spans = _plain_spans(view)
    if not spans:
        return data, 0
    masked_at: set[int] = set()
    for span in spans:
        masked_at.update(_keep_positions(view, span, style))
    out = bytearray()
    for i, (s, e) in enumerate(origin):
        out += mask if i in masked_at else data[s:e]
    return bytes(out), len(spans)


def _mask_text(data: bytes, style: str, mask: bytes, bytea: bool) -> tuple[bytes, int]:
    """One full pass over every form; the caller loops to a fixed point.

    Only in a bytea value are hex digits known to be hex: elsewhere (text,
    JSON, arrays, COPY) a ``\\x...`` lookalike is scanned both decoded and
    as it stands, since ``'\\x' || pan`` must not hide a PAN."""
    count = 0
    exclude: list[tuple[int, int]] | None = None
    if b"\\" in data:
        if b"x" in data or b"X" in data:
            data, n, tokens = _mask_hex(data, style, mask)
            count += n
            if bytea:
                exclude = tokens
        if b"u00" in data:
            data, n = _mask_escaped(data, style, mask)
            count += n
    spans = _plain_spans(data, exclude)
    if spans:
        data = _apply(data, spans, style, mask)
        count += len(spans)
    return data, count


def _quote_bare_numbers(original: bytes, masked: bytes) -> bytes:
    """json/jsonb: a masked number outside a string (``{"pan": 4111...}``)
    would be invalid JSON (``XXXX``), so it becomes a JSON string. Only
    called when masking changed a value; the plain pass keeps offsets, so
    the number tokens of the original line up with the masked copy."""
    if len(original) != len(masked):
        return masked
    strings = [m.span() for m in _JSON_STRING.finditer(masked)]
    out: list[bytes] = []
    pos = 0
    for m in _JSON_NUMBER.finditer(masked.replace(b"X", b"0")):
        s, e = m.span()
        if masked[s:e] == original[s:e]:
            continue
        if any(ss <= s < se for ss, se in strings):
            continue
        if s > 0 and (masked[s - 1:s].isalnum() or masked[s - 1:s] == b"_"):
            continue
        out.append(masked[pos:s])
        out.append(b'"' + masked[s:e] + b'"')
        pos = e
    if not out:
        return masked
    out.append(masked[pos:])
    return b"".join(out)


# --------------------------------------------------------------------------
# public API


@overload
def find_pans(data: bytes) -> list[tuple[int, int]]: ...
@overload
def find_pans(data: str) -> list[tuple[int, int]]: ...


def find_pans(data: bytes | str) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of plain-text PANs in ``data``, sorted by start
    (byte offsets for bytes, character offsets for str).

    Spans cover digits and inner separators. When a whole separated run is
    one PAN, windows inside it are not reported; otherwise two spans may
    overlap when two windows of one run both qualify. Hidden forms (JSON
    escapes, bytea hex) are reported by :func:`contains_pan` and masked by
    :func:`mask_pans`, not listed here: their offsets do not map one to one.
    """
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
        spans = find_pans(raw)
        if raw.isascii():
            return spans
        def char_offset(b: int) -> int:
            return len(raw[:b].decode("utf-8", "surrogatepass"))
        return [(char_offset(s), char_offset(e)) for s, e in spans]
    if not may_contain_pan(data):
        return []
    return sorted(_plain_spans(data))


@overload
def mask_pans(data: bytes, style: str = ..., *, mask: bytes = ..., json: bool = ...,
              bytea: bool = ...) -> tuple[bytes, int]: ...
@overload
def mask_pans(data: str, style: str = ..., *, mask: bytes = ..., json: bool = ...,
              bytea: bool = ...) -> tuple[str, int]: ...


def mask_pans(data: bytes | str, style: str = "last4", *, mask: bytes = MASK_CHAR,
              json: bool = False, bytea: bool = False) -> tuple[bytes, int] | tuple[str, int]:
    """Masked copy of ``data`` and the number of PANs found (0: the very
    same object is returned). ``style`` is ``last4`` or ``first6_last4``;
    ``mask`` is one byte (``0`` keeps numbers parseable). ``json=True``
    quotes masked bare JSON numbers so json/jsonb values stay valid;
    ``bytea=True`` (a bytea value in hex output) reads hex only as hex.
    A str is masked as its UTF-8 encoding and returned as str."""
    if isinstance(data, str):
        if len(data) < MIN_DIGITS:
            return data, 0
        out, n = mask_bytes(data.encode("utf-8", "surrogatepass"), style, mask, json, bytea)
        return (out.decode("utf-8", "surrogatepass"), n) if n else (data, 0)
    return mask_bytes(data, style, mask, json, bytea)


def mask_bytes(data: bytes, style: str = "last4", mask: bytes = MASK_CHAR, json: bool = False,
               bytea: bool = False) -> tuple[bytes, int]:
    """:func:`mask_pans` for bytes only, without the type dispatch: the
    per-value hot path of the engine."""
    if len(data) < MIN_DIGITS or len(data) - len(data.translate(None, _DIGITS)) < MIN_DIGITS:
        return data, 0
    if b"\\" not in data:
        # No escapes, no hex: the prefilter is definitive.
        m = _PREFILTER.search(data)
        if m is None:
            return data, 0
        # Plain text (the common case): one pass, and a second only when
        # the output still has 13 digits.
        if not json and style == "last4":
            quick = _one_run(data, m, _mask_table(mask))
            if quick is not None:
                return (quick, 1) if quick is not data else (data, 0)
        if not json:
            spans = _plain_spans(data)
            if not spans:
                return data, 0
            out = _apply(data, spans, style, mask)
            if len(out) - len(out.translate(None, _DIGITS)) < MIN_DIGITS:
                return out, len(spans)
    original = data
    total = 0
    while True:  # fixed point: masking can split runs into new candidates
        data, n = _mask_text(data, style, mask, bytea)
        total += n
        if not n or len(data) - len(data.translate(None, _DIGITS)) < MIN_DIGITS:
            break
        style = "last4"  # a second pass never widens what is shown
    if total and json:
        data = _quote_bare_numbers(original, data)
    return (data, total) if total else (original, 0)


def _one_run(data: bytes, m: re.Match[bytes], table: bytes) -> bytes | None:
    """The common cases in one go, from the first prefilter match ``m``:

    * it is a whole separated run that is one PAN ending in four digits and
      nothing after it could be another: returns the masked value;
    * it is a whole run that is not a PAN, has no window of 13+ digits
      inside it, and nothing after it could be a PAN: returns ``data``
      itself (nothing to mask; "order 523456 2026-11-05" ends here);
    * anything else: None, the caller takes the general path.

    The match is greedy over digits and separators, so it ends where the
    run ends; it is the whole run unless a separator and a digit come right
    before it, or it holds doubled separators."""
    s = m.start()
    if s >= 2 and data[s - 1] in _SEP_CODES and 48 <= data[s - 2] <= 57:
        return None
    run = m.group().rstrip(_SEPARATORS)
    if b"  " in run or b"--" in run or b" -" in run or b"- " in run:
        return None
    e = s + len(run)
    digits = run.translate(None, _SEPARATORS)
    n = len(digits)
    if (MIN_DIGITS <= n <= MAX_DIGITS and digits[:4] in _PREFIX4
            and (sum(digits[-1::-2].translate(_TO_INT))
                 + sum(digits[-2::-2].translate(_DOUBLED))) % 10 == 0):
        if data[e - 4:e].isdigit() and _PREFILTER.search(data, e) is None:
            return data[:s] + data[s:e - 4].translate(table) + data[e - 4:]
        return None
    if n != len(run):  # separated: could a proper window reach 13 digits?
        first = min(i for i in (run.find(b" "), run.find(b"-")) if i >= 0)
        last = len(run) - 1 - max(run.rfind(b" "), run.rfind(b"-"))
        if n > MAX_DIGITS or n - min(first, last) >= MIN_DIGITS:
            return None
    if _PREFILTER.search(data, e) is not None:
        return None
    return data


def framed_candidate_offsets(data: bytes) -> list[int]:
    """Offsets in framed protocol data (a run of DataRow messages) where a
    PAN may start: one RE2 pass, sound in the sense of
    :func:`candidate_indexes` with ``framed=True`` (an offset may point at a
    length byte that happens to be a digit). Backslashes are the caller's
    to look for."""
    return [m.start() for m in _BATCH_LOOSE.finditer(data)]


def candidate_indexes(values: Sequence[bytes | None], *, framed: bool = False) -> list[int]:
    """Indexes of the values that may hold a PAN, found with one RE2 scan
    of the whole batch joined by NUL bytes (a NUL ends any digit run), so a
    PAN-free value costs no Python code at all. Values with a backslash may
    hide digits in escapes or hex and are always returned. ``framed=True``
    for values that are protocol frames (DataRow bodies): the scan then
    does not rely on the byte before a digit run. The rest is certain: a
    value not returned holds no PAN. When candidates turn out to be the
    majority, every index is returned (the caller's per-value filters are
    then cheaper than more RE2 matches)."""
    parts = [b"" if v is None else v for v in values]
    buf = b"\x00".join(parts)
    if len(buf) - len(buf.translate(None, _DIGITS)) < MIN_DIGITS:
        return []
    ends = list(accumulate(len(p) + 1 for p in parts))  # offset after each NUL
    found: set[int] = set()
    pattern = _BATCH_LOOSE if framed else _BATCH
    for m in pattern.finditer(buf):
        i = bisect_right(ends, m.start(1))
        found.add(i)
        if len(found) > 32 and len(found) * 4 > i:
            # Most values are candidates (a PAN column without a rule): each
            # RE2 match costs more Python than the per-value filters do.
            return list(range(len(parts)))
    pos = buf.find(b"\\")
    while pos >= 0:
        i = bisect_right(ends, pos)
        found.add(i)
        nxt = ends[i] if i < len(ends) else len(buf)
        pos = buf.find(b"\\", nxt)
    return sorted(found)


def contains_pan(data: bytes | str) -> bool:
    """True when ``data`` holds a PAN in any supported form."""
    return mask_pans(data)[1] > 0


def scrub(text: str) -> str:
    """``text`` with every PAN masked (last four kept): for log lines, audit
    records, SQL text and error messages before they are stored."""
    return mask_pans(text)[0]


def scrubber() -> Callable[[str], str]:
    """:func:`scrub` as a value, for structlog processors and the like."""
    return scrub


# The strict rule, for text no column rule or Luhn check can vouch for:
# computed output columns (RowDescription's table OID 0: every derived value,
# e.g. encode(card_number::bytea, 'hex'), reverse(card_number), casts) and
# error or notice text (a cast error quotes the value). A PAN transformed this
# way is no longer Luhn-valid, so any long digit run, and any hex text that
# spells digits, is masked there; false positives (long reference numbers
# in computed columns) are the price of never returning a derived PAN.
_DIGIT_RUN = re.compile(rb"\d(?:[ -]?\d){12,}")
_HEX_DIGITS = re.compile(rb"(?:3[0-9]){13,}")


def strict_mask(value: bytes) -> tuple[bytes, int]:
    """Mask long digit runs and hex-spelled digit runs as a whole (a derived
    value keeps nothing of the PAN: issue 5, "masked as a whole")."""
    if digit_count(value) < 13:
        return value, 0
    count = 0

    def whole(m: re.Match[bytes]) -> bytes:
        nonlocal count
        count += 1
        return bytes(0x58 if 48 <= c <= 57 or 97 <= c <= 102 or 65 <= c <= 70 else c
                     for c in m.group(0))

    masked = _HEX_DIGITS.sub(whole, value)
    masked = _DIGIT_RUN.sub(whole, masked)
    return masked, count
