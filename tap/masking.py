"""Masking on every path a result can take, in the tap process.

The session asks a :class:`MaskingFactory` for a :class:`ResultMasker` per
result set. Rows are masked in-process by maskd's engine (column rules,
derived columns, content detection of Luhn-valid PANs), so the data path
never waits on a network hop per batch; see docs/masking.md for why maskd's
gRPC service is kept for batch callers and not put on the tap's hot path.

Paths covered: DataRow (text and binary, rules by column identity from the
catalog), NoticeResponse and ErrorResponse fields, NotificationResponse
payloads, COPY TO STDOUT data (text, CSV, binary). If masking fails the
message is replaced by an ErrorResponse: never delivered raw.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from maskd.detect import digit_count, mask_pans, may_contain_pan, strict_mask
from maskd.engine import (
    MALFORMED,
    ColumnMeta,
    CopyState,
    Masker,
    MaskError,
    MaskStats,
    RowMasker,
)
from maskd.styles import ValueFn, strict_fn, strict_needs_digits
from tap import protocol as pg
from tap.hooks import Decision, MaskPlan

# (database) -> resolver of (table OID, attribute number) -> "schema.table.column"
ColumnResolver = Callable[[int, int], str | None]
CatalogLookup = Callable[[str], ColumnResolver]

_MASK_FAILED = pg.error_response(
    "58000", "pgwarden: a result could not be masked and was withheld; the session continues",
    hint="retry; if it persists, tell the gateway operators (the event is recorded)")


def _no_catalog(_database: str) -> ColumnResolver:
    return lambda _table, _column: None


@dataclass(slots=True)
class MaskingFactory:
    """Builds per-result maskers for one tap process."""

    key: bytes
    catalog: CatalogLookup = _no_catalog
    # The plan used for messages outside a statement's result (notices,
    # notifications, errors): content detection always on.
    ambient: MaskPlan = field(default_factory=lambda: MaskPlan(scan_content=True))
    _maskers: dict[MaskPlan, Masker] = field(default_factory=dict)
    # The prepared shape of a result, per (plan, fields, resolved column
    # names): a re-executed statement gets fresh counters on it, not a new
    # resolution. Plans and field tuples are the same objects from one
    # execution to the next (cached decision, memoised RowDescription), so
    # they are keyed by identity (held in the entry, so an id cannot be
    # reused) rather than hashed field by field on every execution.
    _shapes: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)

    def masker(self, plan: MaskPlan) -> Masker:
        m = self._maskers.get(plan)
        if m is None:
            m = Masker(plan, self.key)
            if len(self._maskers) < 1024:
                self._maskers[plan] = m
        return m

    def __call__(self, decision: Decision, fields: tuple[pg.Field, ...] | None,
                 database: str) -> ResultMasker | None:
        plan = decision.mask
        if plan.unmasked:
            return None  # the policy grants raw data; the decision is recorded
        if fields is None:
            return ResultMasker(self.masker(plan if plan.active else self.ambient), None, None)
        resolve = self.catalog(database)
        # The names are looked up every time (the catalog reloads), so a
        # cached shape is only ever reused for the same column identities.
        names = tuple(resolve(f.table_oid, f.column) if f.table_oid else None for f in fields)
        key = (id(plan), id(fields), names)
        shape = self._shapes.get(key)
        if shape is None or shape[0] is not plan or shape[1] is not fields:
            masker = self.masker(plan if plan.active else self.ambient)
            columns = [ColumnMeta(name=f.name, table_column=name, type_oid=f.type_oid,
                                  format=f.format) for f, name in zip(fields, names, strict=True)]
            strict: list[tuple[int, ValueFn]] = []
            strict_binary = False
            if plan.scan_content or not plan.active:
                for i, f in enumerate(fields):
                    fn = strict_fn(f.type_oid, f.format) if f.table_oid == 0 else None
                    if fn is not None:
                        strict.append((i, fn))
                        # a binary number or container holds no ASCII
                        # digits, so no cheap test can skip its rows
                        strict_binary |= not strict_needs_digits(f.type_oid, f.format)
            shape = (plan, fields, masker, masker.prepare(columns), tuple(strict), strict_binary)
            if len(self._shapes) >= 1024:
                self._shapes.clear()
            self._shapes[key] = shape
        return ResultMasker(shape[2], shape[3].fresh(), fields, shape[4], shape[5])


class ResultMasker:
    """Masks one result set and the messages around it."""

    __slots__ = ("_copy", "_fields", "_masker", "_rows", "_strict", "_strict_binary", "stats")

    def __init__(self, masker: Masker, rows: RowMasker | None,
                 fields: tuple[pg.Field, ...] | None,
                 strict: tuple[tuple[int, ValueFn], ...] = (),
                 strict_binary: bool = False) -> None:
        self._masker = masker
        self._rows = rows
        self._fields = fields
        self._strict = strict  # (index, strict rule) of computed columns
        self._strict_binary = strict_binary
        self._copy: CopyState | None = None
        self.stats = MaskStats()

    def stats_dict(self) -> dict[str, Any]:
        total = MaskStats()
        total.merge(self.stats)
        if self._rows is not None:
            total.merge(self._rows.stats)
        if self._copy is not None:
            total.merge(self._copy.stats)
        return total.as_dict()

    def data_row(self, body: bytes) -> bytes:
        masked = self._row_body(body)
        if masked is None:
            return _MASK_FAILED
        return b"D" + struct.pack("!i", len(masked) + 4) + masked

    def _row_body(self, body: bytes) -> bytes | None:
        """The masked body (``body`` itself when nothing changed), or None
        when the row could not be masked."""
        try:
            if self._rows is not None:
                masked = self._rows.mask_datarow(body)
            else:
                masked = self._unknown_shape(body)
            if self._strict and (digit_count(masked) >= 13 or self._strict_binary):
                masked = self._strict_pass(masked)
        except (MaskError, ValueError):
            return None
        return masked

    def data_rows(self, block: bytes, frames: list[tuple[int, int, int]],
                  lo: int, hi: int) -> bytes:
        """The DataRow messages ``frames[lo:hi]`` of ``block`` masked, as the
        bytes to send on: a run of rows in one call (the per-row path is the
        same as :meth:`data_row`, but keeps unchanged messages as they came)."""
        if self._rows is not None and not self._strict and hi - lo > 1:
            out = self._rows.mask_frames(block, frames, lo, hi)
            if out is not None:
                return out
        pieces: list[bytes] = []
        for i in range(lo, hi):
            _, s, e = frames[i]
            body = block[s + 5:e]
            masked = self._row_body(body)
            if masked is None:
                pieces.append(_MASK_FAILED)
            elif masked is body:
                pieces.append(block[s:e])
            else:
                pieces.append(b"D" + struct.pack("!i", len(masked) + 4) + masked)
        return b"".join(pieces)

    def _strict_pass(self, body: bytes) -> bytes:
        values = pg.decode_data_row(body)
        changed = False
        for index, fn in self._strict:
            if index >= len(values):
                continue
            v = values[index]
            if v is None:
                continue
            try:
                masked = fn(v)
            except MALFORMED as exc:
                raise MaskError("malformed binary value in a computed column") from exc
            if masked is not v:
                values[index] = masked
                self.stats.add("(computed column)", "strict", 1)
                changed = True
        return pg.encode_data_row(values)[5:] if changed else body

    def _unknown_shape(self, body: bytes) -> bytes:
        """No RowDescription known for this row. The session asks the server
        to describe any portal it executes without a known shape, so this is
        only reached for rows outside an Execute or a simple Query with a
        RowDescription (not produced by PostgreSQL). Values are
        content-scanned as text."""
        values = pg.decode_data_row(body)
        changed = False
        out: list[bytes | None] = []
        for v in values:
            if v is None or not may_contain_pan(v):
                out.append(v)
                continue
            masked, n = mask_pans(v)
            self.stats.add("(unknown column)", "content", n)
            changed = changed or n > 0
            out.append(masked)
        return pg.encode_data_row(out)[5:] if changed else body

    def copy_data(self, body: bytes) -> bytes:
        try:
            if self._copy is None:
                self._copy = self._masker.copy_state("text")
            masked = self._masker.mask_stream(body, self._copy)
            if not self._copy.binary and not self._masker.plan.unmasked:
                # COPY data says nothing about which columns are computed: the
                # strict rule applies to all of it (derived PANs included).
                masked, n = strict_mask(masked)
                self.stats.add("copy", "strict", n)
        except MaskError:
            return _MASK_FAILED
        return pg.Message(b"d", masked).encode() if masked else b""

    def copy_out_started(self, body: bytes) -> None:
        """CopyOutResponse: overall format 0 text/CSV, 1 binary."""
        fmt = body[0] if body else 0
        self._copy = self._masker.copy_state(fmt, strict=not self._masker.plan.unmasked)

    def copy_done(self) -> bytes:
        if self._copy is None:
            return b""
        try:
            rest = self._masker.finish_stream(self._copy)
        except MaskError:
            return _MASK_FAILED
        return pg.Message(b"d", rest).encode() if rest else b""

    def other_message(self, kind: bytes, body: bytes) -> bytes | None:
        if kind in (b"N", b"E"):
            fields = pg.decode_fields(body)
            changed = False
            for code, value in fields.items():
                if code in ("S", "V", "C"):
                    continue
                raw = value.encode()
                if may_contain_pan(raw):
                    masked, n = mask_pans(raw)
                    strict, m = strict_mask(masked)
                    if n or m:
                        fields[code] = strict.decode()
                        self.stats.add("(message)", "content", n + m)
                        changed = True
            return pg.encode_fields(kind, fields) if changed else None
        if kind == b"A":
            pid, channel, payload = pg.decode_notification(body)
            raw = payload.encode()
            if not may_contain_pan(raw):
                return None
            masked, n = mask_pans(raw)
            return pg.encode_notification(pid, channel, masked.decode()) if n else None
        if kind == b"d":
            return self.copy_data(body)
        return None
