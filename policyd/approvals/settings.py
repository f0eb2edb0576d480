"""Approval settings (a pydantic model for the one YAML configuration) and
the factory that turns them into what :func:`policyd.approvals.service.add_to_server`
takes. Every default is the safe one: no webhook, a 15-minute late window,
bounded holds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policyd.approvals.notify import WebhookNotifier
from policyd.approvals.store import DEFAULT_LATE_GRANT_SECONDS, ApprovalStore

__all__ = ["ApprovalSettings", "WebhookSettings"]


class WebhookSettings(BaseModel):
    """Where new requests and resolutions are announced. The URL is a
    secret for most chat services: keep it out of logs (the notifier does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=8)
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    max_attempts: int = Field(default=6, ge=1, le=20)
    base_delay_seconds: float = Field(default=1.0, gt=0)
    max_delay_seconds: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("webhook url must be http:// or https://")
        return value


class ApprovalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    late_grant_seconds: float = Field(default=DEFAULT_LATE_GRANT_SECONDS, ge=0, le=86400)
    poll_interval_seconds: float = Field(default=0.2, gt=0, le=10,
                                         description="SQLite: how often a hold re-reads")
    recheck_interval_seconds: float = Field(
        default=5.0, gt=0, le=300,
        description="PostgreSQL: re-read besides NOTIFY (covers a lost listen connection)")
    webhook: WebhookSettings | None = None

    def store(self, url: str | None = None) -> ApprovalStore:
        """The store in the audit database at ``url`` (default: the audit URL)."""
        return ApprovalStore(url, late_grant_seconds=self.late_grant_seconds,
                             poll_interval=self.poll_interval_seconds,
                             recheck_interval=self.recheck_interval_seconds)

    def notifier(self) -> WebhookNotifier | None:
        w = self.webhook
        if w is None:
            return None
        return WebhookNotifier(w.url, timeout=w.timeout_seconds, max_attempts=w.max_attempts,
                               base_delay=w.base_delay_seconds, max_delay=w.max_delay_seconds)
