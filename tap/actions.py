"""What the sans-IO session asks its driver to do, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tap.hooks import StatementRequest


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Bytes for PostgreSQL (ext_proc: a ``read_data`` response)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendDownstream:
    """Bytes for the client (ext_proc: a ``write_data`` response)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Flush what was sent, then close both sides."""

    reason: str


@dataclass(frozen=True, slots=True)
class NeedDecision:
    """Ask the policy; answer with ``Session.on_decision(ticket, decision)``.
    Client messages after this one are held, in order, until then."""

    ticket: int
    request: StatementRequest


@dataclass(frozen=True, slots=True)
class Event:
    """An audit event (a JSON-able dict with ``type`` and ``session_id``)."""

    record: dict[str, Any]


Action = SendUpstream | SendDownstream | Close | NeedDecision | Event
