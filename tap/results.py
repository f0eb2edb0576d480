"""The result hook: how a statement's rows, notices and COPY data get masked.

The session creates one :class:`ResultMasker` per result set (from the
statement's decision and the RowDescription, when one is known) and passes
each DataRow body through it. ``None`` from the factory means "nothing to do".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tap.hooks import Decision
from tap.protocol import Field


class ResultMasker(Protocol):
    def data_row(self, body: bytes) -> bytes:
        """Return the complete encoded DataRow message to send on."""
        ...

    def other_message(self, kind: bytes, body: bytes) -> bytes | None:
        """NoticeResponse, ErrorResponse, NotificationResponse, CopyData:
        the encoded message to send on, or None to keep it unchanged."""
        ...


ResultMaskerFactory = Callable[[Decision, "tuple[Field, ...] | None"], "ResultMasker | None"]
