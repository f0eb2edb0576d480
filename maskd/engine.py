"""The masking engine: what the tap calls in-process, and what maskd serves.

Typical use by the tap, per result set::

    masker = Masker(decision.mask, key)          # once per statement
    rows = masker.prepare(columns)               # once per RowDescription
    if rows.needs_work:
        body = rows.mask_datarow(body)           # per DataRow body (fast path)
    stats = rows.stats                           # at CommandComplete

``prepare`` resolves every column once (rule by ``schema.table.column``,
derived position, content scanning by type and format) into a list of
per-column functions, so the per-row cost is a loop over the columns that
need work and nothing else. Columns that need nothing cost nothing; text
values that cannot hold a PAN cost one ``len`` and one ``translate``.

Fail closed: every error (bad value, unknown style) propagates as an
exception; the caller must turn it into an ErrorResponse, never forward.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import numpy.typing as npt

from maskd.detect import (
    PREFILTER_LOOSE,
    candidate_indexes,
    digit_count,
    framed_candidate_offsets,
    mask_pans,
)
from maskd.styles import (
    DIGITS_TO_X,
    Oid,
    ValueFn,
    content_fn,
    decode_numeric,
    first6_last4_text,
    last4_text,
    rule_fn,
    strict_fn,
)
from maskd.wire import build_datarow
from tap.hooks import MaskPlan

try:  # the rule walk in C (tap/_wire.c); _rules_loop and _rules_vectorized are its twins
    from tap import _wire as _native
except ImportError:  # pragma: no cover - a source tree without the build
    _native = None  # type: ignore[assignment]

__all__ = [
    "ColumnMeta",
    "CopyState",
    "MaskError",
    "MaskStats",
    "Masker",
    "ResultDigest",
    "RowMasker",
    "derive_key",
]

DERIVED_STYLE = "redact"  # a derived column is masked as a whole
CONTENT_RULE = "content"
DERIVED_RULE = "derived"
MAX_COPY_CARRY = 16 * 1024 * 1024
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_NULL = b"\xff\xff\xff\xff"
# Rule functions that keep a value's length, so a run of DataRows can be
# masked in place in one buffer without re-framing (RowMasker.mask_frames).
_SAME_LENGTH_RULES = (last4_text, first6_last4_text)
# A run is masked in place only while every message is below this size: a
# length header then starts with a zero byte, so no digit run of the content
# prefilter can span a header into the next value (see mask_frames).
_RUN_MAX_MESSAGE = 1 << 24
# Runs at least this long take the numpy path (below it, array set-up costs
# more than a Python loop over the rows).
VECTOR_MIN_ROWS = 100
_TWO = np.arange(5, 7, dtype=np.int64)  # a DataRow's field count, after type and length
_FOUR = np.arange(4, dtype=np.int64)
_DIGITS_TO_X_TABLE = np.frombuffer(bytes(range(256)).translate(DIGITS_TO_X), dtype=np.uint8)
# What a value that does not match its declared type can raise while being
# decoded; reported as ValueError (the row is refused, never forwarded).
# What decoding a malformed binary value raises (the caller refuses the value).
MALFORMED = (struct.error, IndexError, OverflowError)


class MaskError(Exception):
    """Masking could not be done; the result must not be delivered.

    The message never contains a value (it may hold a PAN)."""


def derive_key(key: bytes, purpose: str) -> bytes:
    """Separate subkeys per use of the gateway key, so a column ``hmac`` can
    never be confused with a result digest made with the same key."""
    return hmac.digest(key, b"pgwarden/maskd/" + purpose.encode("ascii"), hashlib.sha256)


@dataclass(frozen=True, slots=True)
class ColumnMeta:
    """One result column as the tap knows it from RowDescription.

    ``table_column`` is ``schema.table.column`` when the column is a plain
    reference to a table column (resolved from table OID and attribute
    number), else None. ``style`` and ``derived`` may be set by the caller
    when it resolved the plan itself; otherwise the plan decides."""

    name: str
    table_column: str | None = None
    type_oid: int = Oid.TEXT
    format: int = 0
    style: str | None = None
    derived: bool = False


@dataclass(slots=True)
class MaskStats:
    """What was masked, for the audit event: never values, only counts."""

    rows: int = 0
    values: int = 0
    by_column: dict[str, int] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)

    def add(self, column: str, rule: str, n: int) -> None:
        if n:
            self.values += n
            self.by_column[column] = self.by_column.get(column, 0) + n
            self.by_rule[rule] = self.by_rule.get(rule, 0) + n

    def merge(self, other: MaskStats) -> None:
        self.rows += other.rows
        for (col, n) in other.by_column.items():
            self.by_column[col] = self.by_column.get(col, 0) + n
        for (rule, n) in other.by_rule.items():
            self.by_rule[rule] = self.by_rule.get(rule, 0) + n
        self.values += other.values

    def as_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "values": self.values,
                "by_column": dict(self.by_column), "by_rule": dict(self.by_rule)}


@dataclass(frozen=True, slots=True)
class _Op:
    index: int
    fn: ValueFn
    always: bool  # a rule: every non-NULL value counts as masked
    column: str
    rule: str
    batch: bool = False  # content scan of a text form: candidates found per batch


class RowMasker:
    """A Masker bound to one result shape. Not thread-safe; one per result."""

    __slots__ = ("_by_index", "_counts", "_digit_skip", "_ops", "_run_kinds", "_run_rules",
                 "_run_scan", "columns", "needs_work", "rows")

    def __init__(self, ops: list[_Op], columns: tuple[ColumnMeta, ...], digit_skip: bool) -> None:
        self._ops = ops
        self.columns = columns
        self._counts = [0] * len(ops)
        # Only content scanning of text-form values: a row with fewer than
        # 13 ASCII digits in its whole body needs nothing (the body's length
        # bytes can only add digits, so the test stays conservative).
        self._digit_skip = digit_skip
        by_index: list[tuple[int, _Op] | None] = [None] * len(columns)
        for k, op in enumerate(ops):
            by_index[op.index] = (k, op)
        self._by_index = tuple(by_index)
        self.needs_work = bool(ops)
        self.rows = 0
        # mask_frames applies when every rule keeps the value's length and
        # every content scan is of a text form (the prefilter is sound for it).
        runnable = all(op.fn in _SAME_LENGTH_RULES if op.always else op.batch for op in ops)
        self._run_rules: tuple[tuple[int, ValueFn] | None, ...] | None = (
            tuple(None if e is None or not e[1].always else (e[0], e[1].fn) for e in by_index)
            if runnable else None)
        # The same per column for tap/_wire.c's walk_rules: 0 nothing, 1
        # last4 on text (applied there), 2 a rule applied here, 3 a content
        # scan of text (rows that may hold a PAN are flagged there).
        self._run_kinds = b"" if self._run_rules is None else bytes(
            (3 if e is not None and not e[1].always else 0) if r is None
            else 1 if r[1] is last4_text else 2
            for r, e in zip(self._run_rules, by_index, strict=True))
        self._run_scan = any(not op.always for op in ops)

    @property
    def stats(self) -> MaskStats:
        """Counts accumulated since prepare (or the last :meth:`reset`)."""
        st = MaskStats(rows=self.rows)
        for op, n in zip(self._ops, self._counts, strict=True):
            st.add(op.column, op.rule, n)
        return st

    def fresh(self) -> RowMasker:
        """The same resolved columns with zeroed counters (the derived
        tables are shared: only the counters change after construction)."""
        new = RowMasker.__new__(RowMasker)
        for name in RowMasker.__slots__:
            setattr(new, name, getattr(self, name))
        new.reset()
        return new

    def reset(self) -> None:
        self._counts = [0] * len(self._ops)
        self.rows = 0

    def mask_row(self, values: Sequence[bytes | None]) -> list[bytes | None]:
        """Masked copy of one row's field values (None = NULL)."""
        out = list(values)
        if len(out) != len(self._by_index):
            raise ValueError("row field count differs from RowDescription")
        self.rows += 1
        counts = self._counts
        k = 0
        try:
            for op in self._ops:
                v = out[op.index]
                if v is not None:
                    new = op.fn(v)
                    if op.always or new is not v:
                        out[op.index] = new
                        counts[k] += 1
                k += 1
        except MALFORMED as exc:
            raise ValueError("malformed binary value") from exc
        return out

    def mask_rows(self, rows: Sequence[Sequence[bytes | None]]) -> list[list[bytes | None]]:
        """Masked copies of many rows, processed column by column: a rule
        is one list comprehension, a content scan one RE2 pass over the
        whole column (only candidate values meet Python code)."""
        if not rows:
            return []
        if any(len(r) != len(self._by_index) for r in rows):
            raise ValueError("row field count differs from RowDescription")
        cols = [list(c) for c in zip(*rows, strict=True)]
        self.rows += len(rows)
        for k, op in enumerate(self._ops):
            cols[op.index] = self._column(k, op, cols[op.index])
        return [list(r) for r in zip(*cols, strict=True)]

    def mask_column(self, index: int, values: list[bytes | None]) -> list[bytes | None]:
        """Masked copy of one column's values (for column-oriented callers)."""
        for k, op in enumerate(self._ops):
            if op.index == index:
                return self._column(k, op, values)
        return values

    def _column(self, k: int, op: _Op, col: list[bytes | None]) -> list[bytes | None]:
        try:
            return self._column_unchecked(k, op, col)
        except MALFORMED as exc:
            raise ValueError("malformed binary value") from exc

    def _column_unchecked(self, k: int, op: _Op, col: list[bytes | None]) -> list[bytes | None]:
        fn = op.fn
        if op.always:
            self._counts[k] += len(col) - col.count(None)
            return [v if v is None else fn(v) for v in col]
        if op.batch:
            new = col
            for i in candidate_indexes(col):
                v = col[i]
                if v is not None:
                    out = fn(v)
                    if out is not v:
                        if new is col:
                            new = list(col)
                        new[i] = out
                        self._counts[k] += 1
            return new
        new = [v if v is None else fn(v) for v in col]
        self._counts[k] += sum(1 for a, b in zip(col, new, strict=True) if a is not b)
        return new

    def mask_datarows(self, bodies: Sequence[bytes]) -> list[bytes]:
        """Masked DataRow bodies of one batch; unchanged bodies are returned
        as the same objects. When only text-form content scanning is asked,
        one RE2 pass over the batch finds the rows worth parsing."""
        if not self._ops:
            self.rows += len(bodies)
            return list(bodies)
        if not self._digit_skip:
            return [self._datarow(b) for b in bodies]
        out = list(bodies)
        self.rows += len(bodies)
        for i in candidate_indexes(bodies, framed=True):
            self.rows -= 1  # _datarow counts it again
            out[i] = self._datarow(bodies[i])
        return out

    def mask_frames(self, block: bytes, frames: Sequence[tuple[int, int, int]],
                    lo: int, hi: int) -> bytes | None:
        """The DataRow messages ``frames[lo:hi]`` of ``block`` (each frame is
        ``(type, start, end)`` with ``start`` at the type byte), masked and
        framed as one bytes object; the result is the same as
        :meth:`mask_datarow` per row. ``None`` when this shape or this run
        needs the per-row path (nothing is counted then).

        Rule columns are rewritten in place in one copy of the run (their
        rules keep the length, so no message is re-framed). Content
        scanning then runs one prefilter pass over the whole run; only rows
        it flags are parsed again, from their original bytes, by
        :meth:`_datarow`. The prefilter cannot miss a value: a length header
        of a message under 16 MiB starts with a zero byte, which ends any
        digit run, so a candidate value always yields a match inside its own
        row. With the C walk the prefilter is per scanned value instead
        (13 ASCII digits or a backslash, see ``tap/_wire.c``), which flags
        every row the RE2 pass would flag for a scanned column."""
        rules = self._run_rules
        if rules is None or hi <= lo:
            return None
        first = frames[lo][1]
        found = [0] * len(self._ops)
        saved = (list(self._counts), self.rows)
        try:
            candidates: list[int] | None = None
            if _native is not None:
                walked = self._rules_native(block, frames, lo, hi, found)
                rewritten, candidates = walked if walked is not None else (None, None)
            elif hi - lo >= VECTOR_MIN_ROWS:
                rewritten = self._rules_vectorized(block, frames, lo, hi, found)
            else:
                rewritten = self._rules_loop(block, frames, lo, hi, found)
            if rewritten is None:
                return None
            scanned = rewritten
            flagged: set[int] = set()
            if candidates is not None:
                flagged.update(candidates)
            elif self._run_scan:
                hits = framed_candidate_offsets(scanned)
                at = scanned.find(b"\\")
                if hits or at >= 0:
                    starts = [frames[i][1] - first for i in range(lo, hi)]
                    flagged.update(bisect_right(starts, h) - 1 for h in hits)
                    while at >= 0:
                        row = bisect_right(starts, at) - 1
                        flagged.add(row)
                        at = scanned.find(b"\\", frames[lo + row][2] - first)
            if not flagged:
                for k, n in enumerate(found):
                    self._counts[k] += n
                self.rows += hi - lo
                return scanned
            pieces: list[bytes] = []
            done = 0
            for row in sorted(flagged):
                _, s, e = frames[lo + row]
                for k in self._rule_values(block, s):
                    found[k] -= 1  # _datarow counts this row itself
                body = self._datarow(block[s + 5:e])
                pieces.append(scanned[done:s - first])
                pieces.append(b"D" + _I32.pack(len(body) + 4) + body)
                done = e - first
            pieces.append(scanned[done:])
            for k, n in enumerate(found):
                self._counts[k] += n
            self.rows += hi - lo - len(flagged)
            return b"".join(pieces)
        except (ValueError, *MALFORMED):
            self._counts, self.rows = saved
            return None

    def _rules_native(self, block: bytes, frames: Sequence[tuple[int, int, int]],
                      lo: int, hi: int, found: list[int]) -> tuple[bytes, list[int]] | None:
        """:meth:`_rules_loop` with the walk and ``last4``'s common case in C
        (``tap/_wire.c``); any other rule value is handled here. Also the
        rows (offsets from ``lo``) whose scanned values may hold a PAN."""
        assert self._run_rules is not None and _native is not None
        rules = self._run_rules
        walked = _native.walk_rules(block, frames, lo, hi, self._run_kinds, _RUN_MAX_MESSAGE)
        if walked is None:
            return None
        rewritten, counts, pending, candidates = walked
        for rule, n in zip(rules, counts, strict=True):
            if rule is not None:
                found[rule[0]] += n
        first = frames[lo][1]
        if rewritten is None:
            return block[first:frames[hi - 1][2]], candidates
        if not pending:
            return rewritten, candidates
        buf = bytearray(rewritten)
        for column, pos, length in pending:
            rule = rules[column]
            assert rule is not None
            new = rule[1](block[pos:pos + length])
            if new is None or len(new) != length:
                return None
            buf[pos - first:pos - first + length] = new
        return bytes(buf), candidates

    def _rules_loop(self, block: bytes, frames: Sequence[tuple[int, int, int]],
                    lo: int, hi: int, found: list[int]) -> bytes | None:
        """The run with its rule columns rewritten, one row at a time (short
        runs); None when a row is malformed or a rule changes a length."""
        assert self._run_rules is not None
        rules = self._run_rules
        ncols = len(rules)
        first = frames[lo][1]
        last = frames[hi - 1][2]
        has_rules = any(r is not None for r in rules)
        buf = bytearray(block[first:last]) if has_rules else None
        # Writes go through a memoryview: half the cost of bytearray slice
        # assignment per value.
        view = memoryview(buf) if buf is not None else None
        unpack = _I32.unpack_from
        count = _I16.unpack_from
        for i in range(lo, hi):
            _, s, e = frames[i]
            if count(block, s + 5)[0] != ncols or e - s >= _RUN_MAX_MESSAGE:
                return None
            pos = s + 7
            for rule in rules:
                length = unpack(block, pos)[0]
                pos += 4
                if rule is not None and length >= 0:
                    end = pos + length
                    if end > e:
                        return None
                    if rule[1] is last4_text and length > 4 and block[end - 4:end].isdigit():
                        # last4_text's common case, inlined: the value
                        # ends with its last four digits.
                        assert view is not None
                        view[pos - first:end - first - 4] = block[pos:end - 4].translate(
                            DIGITS_TO_X)
                    else:
                        new = rule[1](block[pos:end])
                        if new is None or len(new) != length:
                            return None
                        assert view is not None
                        view[pos - first:end - first] = new
                    found[rule[0]] += 1
                if length > 0:
                    pos += length
            if pos != e:
                return None  # malformed: the per-row path reports it
        if view is None or buf is None:
            return block[first:last]
        view.release()
        return bytes(buf)

    def _rules_vectorized(self, block: bytes, frames: Sequence[tuple[int, int, int]],
                          lo: int, hi: int, found: list[int]) -> bytes | None:
        """:meth:`_rules_loop` for long runs, column by column over all rows
        at once with numpy: the field walk, the checks and ``last4`` on
        values that end with four digits (the common case) are array
        operations; any other rule value is handled per value in Python.

        The walk gathers each field's 4-byte length for every row at once;
        positions only grow, so a row whose walk ends exactly at its
        message's end had every header inside it (one check at the end; a
        walk that strays outside the run raises IndexError instead)."""
        assert self._run_rules is not None
        rules = self._run_rules
        first = frames[lo][1]
        last = frames[hi - 1][2]
        run = np.frombuffer(block, dtype=np.uint8, count=last - first, offset=first)
        ends = np.fromiter((f[2] for f in islice(frames, lo, hi)), dtype=np.int64,
                           count=hi - lo) - first
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1]
        if int((ends - starts).max()) >= _RUN_MAX_MESSAGE:
            return None
        if bool((run[starts[:, None] + _TWO].view(">i2").ravel() != len(rules)).any()):
            return None
        walked: list[tuple[tuple[int, ValueFn], npt.NDArray[np.int64],
                           npt.NDArray[np.int64]]] = []
        pos = starts + 7
        for rule in rules:
            length = run[pos[:, None] + _FOUR].view(">i4").ravel().astype(np.int64)
            pos = pos + 4
            if rule is not None:
                walked.append((rule, pos, length))
            pos = pos + np.maximum(length, 0)
        if not np.array_equal(pos, ends):
            return None
        out = run.copy()
        for (k, fn), at, length in walked:
            present = length >= 0
            found[k] += int(np.count_nonzero(present))
            rest = present
            if fn is last4_text:
                tail = at + length
                common = present & (length > 4)
                tail4 = run[np.where(common, tail - 4, 0)[:, None] + _FOUR]
                common &= ((tail4 >= 48) & (tail4 <= 57)).all(axis=1)
                rest = present & ~common
                width = np.where(common, length - 4, 0)
                total = int(width.sum())
                if total:
                    index = (np.repeat(at - (np.cumsum(width) - width), width)
                             + np.arange(total, dtype=np.int64))
                    out[index] = _DIGITS_TO_X_TABLE[out[index]]
            for r in np.flatnonzero(rest).tolist():
                p = int(at[r])
                n = int(length[r])
                new = fn(block[first + p:first + p + n])
                if new is None or len(new) != n:
                    return None
                out[p:p + n] = np.frombuffer(new, dtype=np.uint8)
        return out.tobytes()

    def _rule_values(self, block: bytes, start: int) -> list[int]:
        """Op indexes of the non-NULL rule values of the DataRow at ``start``."""
        assert self._run_rules is not None
        out = []
        pos = start + 7
        for rule in self._run_rules:
            length = _I32.unpack_from(block, pos)[0]
            pos += 4 + max(length, 0)
            if length >= 0 and rule is not None:
                out.append(rule[0])
        return out

    def mask_datarow(self, body: bytes) -> bytes:
        """Masked DataRow body (after the 'D' and length). Returns ``body``
        itself when nothing changed, so the tap can forward the original
        message bytes. Raises ValueError on a malformed body."""
        if not self._ops:
            self.rows += 1
            return body
        if self._digit_skip and (len(body) < 13 or digit_count(body) < 13 or (
                b"\\" not in body and PREFILTER_LOOSE.search(body) is None)):
            self.rows += 1
            return body
        return self._datarow(body)

    def _datarow(self, body: bytes) -> bytes:
        """Walk the field lengths once and splice only the fields that
        change: no list of values, no re-framing of untouched fields. A
        text-form content column skips values shorter than 13 bytes without
        slicing them. Bounds are checked once at the end (a bad length makes
        the final offset wrong); work done on a bad body is thrown away."""
        by_index = self._by_index
        counts = self._counts
        pos = 2
        pieces: list[bytes] | None = None
        done = 0  # body[:done] is already in pieces
        unpack = _I32.unpack_from
        try:
            if _I16.unpack_from(body)[0] != len(by_index):
                raise ValueError("DataRow field count differs from RowDescription")
            for entry in by_index:
                length = unpack(body, pos)[0]
                start = pos
                pos += 4
                if length > 0:
                    pos += length
                if entry is None or length < 0:
                    continue
                k, op = entry
                if op.batch and length < 13:
                    continue
                v = body[start + 4:pos]
                new = op.fn(v)
                if new is v:
                    if op.always:
                        counts[k] += 1
                    continue
                counts[k] += 1
                if pieces is None:
                    pieces = []
                pieces.append(body[done:start])
                if new is None:
                    pieces.append(_NULL)
                else:
                    pieces.append(_I32.pack(len(new)))
                    pieces.append(new)
                done = pos
        except MALFORMED as exc:
            raise ValueError("truncated DataRow or malformed binary value") from exc
        if pos != len(body):
            raise ValueError("DataRow length mismatch")
        self.rows += 1
        if pieces is None:
            return body
        pieces.append(body[done:])
        return b"".join(pieces)


class Masker:
    """Masking for one statement's decision (a MaskPlan) with the gateway key.

    Cheap to build; ``prepare`` results are cached per column shape so that
    :meth:`mask_row` (the convenience form) is fast too."""

    def __init__(self, plan: MaskPlan, key: bytes, *, content_style: str = "last4") -> None:
        if not key:
            raise ValueError("a gateway key is required for hmac masking and digests")
        self.plan = plan
        self.key = key
        self.content_style = content_style
        self._column_key = derive_key(key, "column-hmac/v1")
        self._digest_key = derive_key(key, "result-digest/v1")
        self._rules = {r.column: r.style for r in plan.rules}
        for style in self._rules.values():
            rule_fn(style, Oid.TEXT, 0, self._column_key)  # unknown style: fail now
        self._resolved: dict[tuple[ColumnMeta, ...], tuple[list[_Op], bool]] = {}
        self._scratch: dict[tuple[ColumnMeta, ...], RowMasker] = {}

    def prepare(self, columns: Sequence[ColumnMeta]) -> RowMasker:
        """A RowMasker for rows of this shape, with its own counters (one per
        result set). Column resolution is cached per shape, so preparing
        the same shape again (a re-executed statement) costs a dict lookup."""
        key = tuple(columns)
        resolved = self._resolved.get(key)
        if resolved is None:
            resolved = self._resolve(key)
            if len(self._resolved) < 256:
                self._resolved[key] = resolved
        return RowMasker(resolved[0], key, resolved[1])

    def _resolve(self, columns: tuple[ColumnMeta, ...]) -> tuple[list[_Op], bool]:
        ops: list[_Op] = []
        digit_skip = True
        derived = set(self.plan.derived_columns)
        if self.plan.unmasked:
            return ops, digit_skip
        for i, col in enumerate(columns):
            style = col.style or (self._rules.get(col.table_column) if col.table_column else None)
            if col.derived or i in derived:
                ops.append(_Op(i, rule_fn(DERIVED_STYLE, col.type_oid, col.format,
                                          self._column_key), True, col.name, DERIVED_RULE))
                digit_skip = False
            elif style:
                ops.append(_Op(i, rule_fn(style, col.type_oid, col.format, self._column_key),
                               True, col.name, style))
                digit_skip = False
            elif self.plan.scan_content:
                fn = content_fn(col.type_oid, col.format, self.content_style)
                if fn is not None:
                    textual = col.format == 0 or col.type_oid in _BINARY_TEXTLIKE
                    ops.append(_Op(i, fn, False, col.name, CONTENT_RULE, textual))
                    if col.format == 1 and col.type_oid not in _BINARY_TEXTLIKE:
                        digit_skip = False
        return ops, digit_skip

    def mask_row(self, values: Sequence[bytes | None],
                 columns: Sequence[ColumnMeta]) -> tuple[list[bytes | None], MaskStats]:
        """Masked copy of one row and what was masked in it (convenience
        form; a caller with many rows should keep a :meth:`prepare` result)."""
        key = tuple(columns)
        rm = self._scratch.get(key)
        if rm is None:
            rm = self.prepare(key)
            if len(self._scratch) < 64:
                self._scratch[key] = rm
        before = list(rm._counts)
        out = rm.mask_row(values)
        st = MaskStats(rows=1)
        for op, n0, n1 in zip(rm._ops, before, rm._counts, strict=True):
            st.add(op.column, op.rule, n1 - n0)
        return out, st

    # ---------------------------------------------------------------- COPY

    def copy_state(self, fmt: int | str = "text",
                   column_types: Sequence[int] | None = None, *,
                   strict: bool = False) -> CopyState:
        """State for one COPY TO STDOUT; ``fmt`` is text/csv (0) or binary
        (1). ``column_types`` (type OIDs) sharpen binary COPY; without them
        an 8-byte field is checked as an int8 and a structurally valid
        numeric as a numeric (a false positive corrupts, never leaks).
        ``strict``: binary fields also get the strict rule
        (:func:`maskd.styles.strict_fn`), as the caller applies it to text
        COPY data; without column types an 8-byte field is left to content
        detection (a timestamp is 8 bytes too)."""
        binary = fmt in (1, "binary")
        state = CopyState(binary=binary, column_types=tuple(column_types or ()), strict=strict)
        if binary and not self.plan.unmasked:
            # Binary fields have positions: the plan's positional rules apply
            # (a derived column masked as a whole, a PAN column by its rule).
            for position, column in self.plan.column_positions:
                state.styles[position] = self._rules.get(column, DERIVED_STYLE)
            for position in self.plan.derived_columns:
                state.styles[position] = DERIVED_STYLE
        return state

    def mask_stream(self, chunk: bytes, state: CopyState) -> bytes:
        """Masked bytes of a COPY data stream that can be sent now.

        Text/CSV: any trailing bytes that could belong to a PAN continuing
        in the next chunk (digits, separators, escape and hex characters)
        are held back in ``state`` and prefixed to the next chunk; a chunk
        ending in a newline (PostgreSQL sends one row per CopyData) holds
        nothing back. Binary: complete tuples are masked field by field.
        Call :meth:`finish_stream` at CopyDone for what is held back."""
        if self.plan.unmasked or not (self.plan.scan_content or self.plan.rules
                                      or self.plan.derived_columns
                                      or self.plan.column_positions):
            return chunk
        if state.binary:
            return self._binary_stream(chunk, state)
        buf = state.carry + chunk if state.carry else chunk
        cut = len(buf.rstrip(_CARRY_CHARS))
        if len(buf) - cut > MAX_COPY_CARRY:
            raise MaskError("COPY data holds a run of digits too long to scan safely")
        state.carry = buf[cut:]
        out = buf[:cut]
        if not out:
            return b""
        masked, n = mask_pans(out, self.content_style)
        state.stats.add("copy", CONTENT_RULE, n)
        return masked

    def finish_stream(self, state: CopyState) -> bytes:
        """Whatever ``state`` still holds, masked (call at CopyDone)."""
        if state.binary:
            if state.carry:
                raise MaskError("COPY binary data ended inside a tuple")
            return b""
        rest, state.carry = state.carry, b""
        masked, n = mask_pans(rest, self.content_style)
        state.stats.add("copy", CONTENT_RULE, n)
        return masked

    def _binary_stream(self, chunk: bytes, state: CopyState) -> bytes:
        buf = state.carry + chunk
        pos = 0
        out: list[bytes] = []
        if not state.header_done:
            if len(buf) < 19:
                state.carry = buf
                return b""
            ext = struct.unpack_from(">i", buf, 15)[0]
            if len(buf) < 19 + ext:
                state.carry = buf
                return b""
            out.append(buf[:19 + ext])
            pos = 19 + ext
            state.header_done = True
        n = len(buf)
        while pos + 2 <= n:
            nfields = struct.unpack_from(">h", buf, pos)[0]
            if nfields == -1:  # trailer
                out.append(buf[pos:pos + 2])
                pos += 2
                continue
            p = pos + 2
            values: list[bytes | None] = []
            complete = True
            for _ in range(nfields):
                if p + 4 > n:
                    complete = False
                    break
                length = struct.unpack_from(">i", buf, p)[0]
                p += 4
                if length < 0:
                    values.append(None)
                    continue
                if p + length > n:
                    complete = False
                    break
                values.append(buf[p:p + length])
                p += length
            if not complete:
                break
            masked = [None if v is None else self._copy_field(state, i, v)
                      for i, v in enumerate(values)]
            if any(a is not b for a, b in zip(values, masked, strict=True)):
                out.append(build_datarow(masked))
            else:
                out.append(buf[pos:p])
            pos = p
        state.carry = buf[pos:]
        if len(state.carry) > MAX_COPY_CARRY:
            raise MaskError("COPY binary tuple too large to mask")
        return b"".join(out)

    def _copy_field(self, state: CopyState, i: int, v: bytes) -> bytes:
        oid = state.column_types[i] if i < len(state.column_types) else 0
        style = state.styles.get(i)
        if style is not None:
            return self._copy_rule(state, style, oid or _guess_binary_type(v), v)
        fn = state.fns.get(oid)
        if fn is None and oid not in state.fns:
            fn = content_fn(oid, 1, self.content_style) if oid else _guess_binary
            state.fns[oid] = fn
        new = v
        try:
            if fn is not None:
                scanned = fn(v)
                if scanned is not v:
                    state.stats.add("copy", CONTENT_RULE, 1)
                # COPY fields are never turned into NULL by content
                new = v if scanned is None else scanned
            if state.strict:
                sfn = state.strict_fns.get(oid)
                if sfn is None and oid not in state.strict_fns:
                    sfn = strict_fn(oid, 1) if oid else _strict_guess_binary
                    state.strict_fns[oid] = sfn
                if sfn is not None:
                    after = sfn(new)
                    if after is not new and after is not None:
                        state.stats.add("copy", "strict", 1)
                        new = after
        except MALFORMED as exc:
            raise MaskError("malformed binary value in COPY data") from exc
        return new

    def _copy_rule(self, state: CopyState, style: str, oid: int, v: bytes) -> bytes:
        fn = state.rule_fns.get((style, oid))
        if fn is None:
            # the null style: a NULL cannot take a field's place here
            fn = rule_fn(DERIVED_STYLE if style == "null" else style, oid, 1, self._column_key)
            state.rule_fns[(style, oid)] = fn
        try:
            new = fn(v)
        except MALFORMED as exc:
            raise MaskError("malformed binary value in COPY data") from exc
        if new is None:
            raise MaskError("a COPY field could not be masked")
        if new is not v:
            state.stats.add("copy", DERIVED_RULE if style == DERIVED_STYLE else style, 1)
        return new

    def digest(self) -> ResultDigest:
        """A fresh keyed digest pair for one result."""
        return ResultDigest(self._digest_key)


_BINARY_TEXTLIKE = frozenset({Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR, Oid.NAME, Oid.UNKNOWN,
                              Oid.XML, Oid.BYTEA, Oid.JSON, Oid.JSONB})
# Bytes that may continue a PAN into the next chunk: digits, separators,
# and what JSON escapes (\u0034) and bytea hex (\x34) are written with.
_CARRY_CHARS = b"0123456789 -\\uUxXabcdefABCDEF"


def _guess_binary(v: bytes) -> bytes:
    """Binary COPY field of unknown type: int8-sized, numeric-shaped, or
    scanned as text (containers are walked by the generic content fn)."""
    oid = _guess_binary_type(v)
    fn = _int8_fn if oid == Oid.INT8 else _numeric_fn if oid == Oid.NUMERIC else _unknown_fn
    return fn(v) or v


_strict_u = strict_fn(0, 1)
_strict_n = strict_fn(Oid.NUMERIC, 1)
assert _strict_u is not None and _strict_n is not None
_strict_unknown: ValueFn = _strict_u
_strict_numeric: ValueFn = _strict_n


def _guess_binary_type(v: bytes) -> int:
    """The type a binary COPY field of a known card number column most
    likely has: an int8 by its size, a numeric by its structure, else text."""
    if len(v) == 8:
        return Oid.INT8
    if len(v) >= 12 and (len(v) - 8) % 2 == 0:
        ndigits = struct.unpack_from(">h", v)[0]
        if ndigits * 2 + 8 == len(v) and _decode_numeric_safe(v):
            return Oid.NUMERIC
    return Oid.TEXT


def _strict_guess_binary(v: bytes) -> bytes | None:
    """The strict rule for a binary COPY field of unknown type: a
    numeric-shaped value as a numeric, an 8-byte one not at all (int8,
    float8, timestamp and money look alike; the policy refuses a binary
    COPY of a card number column), anything else as text or a container."""
    oid = _guess_binary_type(v)
    if oid == Oid.INT8:
        return v
    return _strict_numeric(v) if oid == Oid.NUMERIC else _strict_unknown(v)


def _decode_numeric_safe(v: bytes) -> bool:
    try:
        return decode_numeric(v) is not None
    except struct.error:
        return False


_int8 = content_fn(Oid.INT8, 1)
_numeric = content_fn(Oid.NUMERIC, 1)
_unknown = content_fn(0, 1)
assert _int8 is not None and _numeric is not None and _unknown is not None
_int8_fn: ValueFn = _int8
_numeric_fn: ValueFn = _numeric
_unknown_fn: ValueFn = _unknown


@dataclass(slots=True)
class CopyState:
    """Per-COPY carry-over between chunks (see :meth:`Masker.mask_stream`)."""

    binary: bool = False
    column_types: tuple[int, ...] = ()
    carry: bytes = b""
    header_done: bool = False
    stats: MaskStats = field(default_factory=MaskStats)
    fns: dict[int, ValueFn | None] = field(default_factory=dict)
    strict: bool = False
    strict_fns: dict[int, ValueFn | None] = field(default_factory=dict)
    styles: dict[int, str] = field(default_factory=dict)  # field position -> rule
    rule_fns: dict[tuple[str, int], ValueFn] = field(default_factory=dict)


class ResultDigest:
    """Keyed digests (HMAC-SHA-256) of a result before and after masking.

    Each row is fed in DataRow body encoding (field count, then length-
    prefixed values, -1 for NULL), so feeding parsed rows with
    :meth:`update` and raw DataRow bodies with :meth:`update_raw` give the
    same digest. An auditor holding the key can later check that a claimed
    result is the one returned, without anyone storing card numbers."""

    __slots__ = ("_after", "_before", "rows")

    def __init__(self, key: bytes) -> None:
        self._before = hmac.new(key, digestmod=hashlib.sha256)
        self._after = hmac.new(key, digestmod=hashlib.sha256)
        self.rows = 0

    def update(self, before: Sequence[bytes | None], after: Sequence[bytes | None]) -> None:
        self.update_raw(build_datarow(before), build_datarow(after))

    def update_raw(self, before: bytes, after: bytes) -> None:
        """Feed one row as DataRow bodies (``after is before`` is cheap)."""
        frame = struct.pack(">I", len(before))
        self._before.update(frame)
        self._before.update(before)
        if after is not before:
            frame = struct.pack(">I", len(after))
        self._after.update(frame)
        self._after.update(after)
        self.rows += 1

    def hexdigests(self) -> tuple[str, str]:
        """(before, after) as hex; the pair is the same for equal results."""
        return self._before.hexdigest(), self._after.hexdigest()

