"""The result hook: how a statement's rows, notices and COPY data get masked.

The session creates one :class:`ResultMasker` per result set (from the
statement's decision and the RowDescription, when one is known) and passes
each DataRow body through it. ``None`` from the factory means "nothing to do".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tap.hooks import Decision
from tap.protocol import Field


class ResultMasker(Protocol):
    def data_row(self, body: bytes) -> bytes:
        """Return the complete encoded DataRow message to send on."""
        ...

    def data_rows(self, block: bytes, frames: list[tuple[int, int, int]],
                  lo: int, hi: int) -> bytes:
        """The DataRow messages ``frames[lo:hi]`` of ``block`` (``(type,
        start, end)``, start at the type byte), masked and encoded: what
        :meth:`data_row` gives for each, in one call per run of rows."""
        ...

    def other_message(self, kind: bytes, body: bytes) -> bytes | None:
        """NoticeResponse, ErrorResponse, NotificationResponse, CopyData:
        the encoded message to send on, or None to keep it unchanged."""
        ...

    def copy_out_started(self, body: bytes) -> None:
        """CopyOutResponse body: the overall format of the COPY data."""
        ...

    def copy_data(self, body: bytes) -> bytes:
        """Encoded CopyData message(s) to send for this server CopyData."""
        ...

    def copy_done(self) -> bytes:
        """Encoded CopyData of whatever was held back, sent before CopyDone."""
        ...

    def stats_dict(self) -> dict[str, Any]:
        """Counts of masked values (values, by_column, by_rule): never values."""
        ...


# (decision, RowDescription fields if known, database) -> masker or None
ResultMaskerFactory = Callable[[Decision, "tuple[Field, ...] | None", str], "ResultMasker | None"]
