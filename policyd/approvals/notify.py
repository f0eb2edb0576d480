"""Tell humans that a statement waits for them, and how it ended.

A webhook POST (JSON) on each new request and each resolution. The body has
a Slack-compatible ``text`` (so an incoming-webhook URL of Slack, Mattermost
or Teams' Slack-compatible endpoint works as is) plus structured fields for
anything else.

What the payload never carries: a token (we never have the approver's token
here), the parameter values, or a PAN (the statement and reasons were
redacted when stored and are scrubbed again here; digests are left out
because a hex digest can hold a digit run that a scrubber would alter).

Delivery is best effort and never on the data path: :meth:`notify` queues and
returns; a background task posts with exponential backoff (retrying
connection errors, 5xx and 429) and gives up after ``max_attempts``, logging
the approval id only (a Slack webhook URL is itself a secret: never logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from typing import Any, Protocol

import structlog

from maskd.detect import scrub
from policyd.approvals.models import ApprovalRecord

__all__ = ["Notifier", "WebhookNotifier", "webhook_payload"]

log = structlog.get_logger("pgwarden.approvals.notify")

_STATEMENT_PREVIEW = 500


class Notifier(Protocol):
    def notify(self, event: str, record: ApprovalRecord) -> None: ...


def _who(record: ApprovalRecord) -> str:
    return f"{record.subject} (via {record.actor})" if record.actor else record.subject


def _text(event: str, record: ApprovalRecord) -> str:
    rid = record.approval_id
    statement = record.statement
    if len(statement) > _STATEMENT_PREVIEW:
        statement = statement[:_STATEMENT_PREVIEW] + "…"
    statement = statement.replace("```", "'''")
    if event == "requested":
        groups = ", ".join(record.approver_groups) or "none"
        return (f"Approval {rid} requested by {_who(record)} on database "
                f"{record.database or '?'}: {record.reason or 'policy requires approval'}\n"
                f"```{statement}```\n"
                f"Approvers ({groups}): pgwarden approvals approve {rid} --reason TEXT "
                f"(or deny {rid} --reason TEXT)")
    if event in ("approved", "denied"):
        late = " (late: one retry allowed)" if record.late_grant else ""
        return (f"Approval {rid} {event}{late} by {record.approver}: "
                f"{record.approver_reason} (requested by {_who(record)})")
    if event == "expired":
        return (f"Approval {rid} expired unanswered (requested by {_who(record)}); "
                f"an approval until the late window ends lets one retry run")
    return f"Approval {rid} {event} (requested by {_who(record)})"


def webhook_payload(event: str, record: ApprovalRecord) -> dict[str, Any]:
    """The JSON body for one event (``requested``, ``approved``, ``denied``,
    ``expired``, ``cancelled``)."""
    data = record.to_json()
    approval = {k: data[k] for k in (
        "approval_id", "status", "subject", "actor", "database", "session_id", "statement",
        "fingerprint", "reason", "approver_groups", "created_at", "expires_at",
        "late_grant_until", "late_grant", "approver", "approver_reason", "decided_at")}
    for key in ("statement", "reason", "approver_reason"):
        approval[key] = scrub(approval[key])
    return {"text": scrub(_text(event, record)), "event": f"approval.{event}",
            "approval": approval}


class WebhookNotifier:
    """Background webhook delivery with exponential backoff.

    Create it inside the event loop that will run it (or call
    :meth:`start`); :meth:`aclose` delivers what is queued (up to a timeout)
    and stops.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, max_attempts: int = 6,
                 base_delay: float = 1.0, max_delay: float = 60.0,
                 headers: dict[str, str] | None = None, max_queue: int = 10_000) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError("webhook URL must be http:// or https://")
        self.url = url
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.headers = dict(headers or {})
        self.delivered = 0
        self.failed = 0
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # the URL is a secret (Slack, Teams)
        return "WebhookNotifier(url=<hidden>)"

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="approvals-webhook")

    def notify(self, event: str, record: ApprovalRecord) -> None:
        """Queue one notification; never blocks, never raises."""
        try:
            self.start()
            self._queue.put_nowait(webhook_payload(event, record))
        except asyncio.QueueFull:
            self.failed += 1
            log.error("approval_webhook_queue_full", approval_id=record.approval_id)
        except RuntimeError:  # no running loop: a synchronous caller
            self.failed += 1
            log.error("approval_webhook_no_loop", approval_id=record.approval_id)

    async def drain(self) -> None:
        """Wait until everything queued was delivered or given up."""
        await self._queue.join()

    async def aclose(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            payload = await self._queue.get()
            try:
                await self._deliver(payload)
            finally:
                self._queue.task_done()

    async def _deliver(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        approval_id = payload["approval"]["approval_id"]
        delay = self.base_delay
        for attempt in range(1, self.max_attempts + 1):
            outcome = await asyncio.to_thread(self._post, body)
            if outcome == "ok":
                self.delivered += 1
                return
            if outcome == "fatal":
                break
            if attempt < self.max_attempts:
                log.info("approval_webhook_retry", approval_id=approval_id, attempt=attempt,
                         outcome=outcome)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        self.failed += 1
        log.error("approval_webhook_failed", approval_id=approval_id, event=payload["event"])

    def _post(self, body: bytes) -> str:
        """``ok``, ``retry`` (connection error, 5xx, 429) or ``fatal`` (4xx)."""
        request = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "pgwarden-approvals",
                     **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                response.read()
                return "ok"
        except urllib.error.HTTPError as exc:
            return "retry" if exc.code >= 500 or exc.code == 429 else "fatal"
        except (urllib.error.URLError, OSError, TimeoutError):
            return "retry"
