"""What the sans-IO session asks its driver to do, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
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
class NeedAuth:
    """Validate a token presented as the password; answer with
    ``Session.on_auth(ticket, result)``. The token is only ever in this action
    and in the driver's call to the identity service, never in an event."""

    ticket: int
    token: str = field(repr=False)
    user: str
    database: str
    client_addr: str
    tls: bool


@dataclass(frozen=True, slots=True)
class Event:
    """An audit event (a JSON-able dict with ``type`` and ``session_id``)."""

    record: dict[str, Any]


Action = SendUpstream | SendDownstream | Close | NeedDecision | NeedAuth | Event
