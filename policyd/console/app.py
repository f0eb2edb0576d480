"""The console's pages and forms (FastAPI, rendered on the server).

Rules every route follows, and why:

* Nothing is shown before the reader is signed in and before the read is
  recorded as an ``evidence_access`` event (PCI DSS 10.2.1.3); a read that
  cannot be recorded is refused with 503.
* Everything a template prints passes through the audit scrubber once more
  (PANs, JWTs): the store is already scrubbed, this is defence in depth so a
  page can never become the place a card number or a token leaks.
* State changes (approve, deny, sign out) are POST forms carrying the
  session's CSRF token; a POST from another origin is refused outright.
* Approve/deny buttons are rendered only for members of an approver group,
  and the POST handler checks again (the store checks a third time:
  self-approval, the request's own approver groups).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

import structlog
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from policyd.approvals.store import (
    ApprovalError,
    ApprovalNotFound,
    ApprovalStore,
    NotAnApprover,
    NotPending,
    SelfApproval,
)
from policyd.audit.chain import parse_since
from policyd.audit.events import ApprovalAction, ApprovalEvent
from policyd.audit.scrub import scrub_text
from policyd.audit.store import AuditStore
from policyd.console.evidence import (
    AccessNotRecorded,
    record_access,
    record_sign_in,
    replay,
    verify_chain,
)
from policyd.console.settings import ConsoleSettings
from policyd.console.signin import COOKIE_NAME, ConsoleUser, SessionCodec
from policyd.identity import FailureThrottle, TokenRejected, TokenValidator

log = structlog.get_logger("pgwarden.console")

_HERE = Path(__file__).resolve().parent
_DECISIONS = {"denied": "deny", "held": "hold", "allowed": "allow"}

_SECURITY_HEADERS = {
    # No script at all, styles from ourselves only, forms post back to us only.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": with it browsers send "Origin: null" on our own form
    # posts, which the cross-origin check must refuse. Other sites still see nothing.
    "Referrer-Policy": "same-origin",
    # Evidence must not linger in browser or proxy caches.
    "Cache-Control": "no-store",
}


def _finalize(value: Any) -> Any:
    """Every printed value is scrubbed again (PANs, JWTs) before escaping."""
    if isinstance(value, str):
        return scrub_text(value)
    return value


def _epoch(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(str(_HERE / "templates")),
        autoescape=select_autoescape(["html"]),
        finalize=_finalize,
    )
    env.filters["epoch"] = _epoch
    return Jinja2Templates(env=env)


def _cross_origin(request: Request) -> bool:
    """True when a browser says the request comes from another site.

    Hosts are compared without the scheme: behind a TLS-terminating proxy the
    console sees http while the browser says https. ``Origin: null`` (sandboxed
    frames, privacy-stripped requests) counts as foreign. No header at all is
    a non-browser client; the CSRF token still guards those."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return False
    if origin == "null":
        return True
    return urlsplit(origin).netloc != urlsplit(str(request.base_url)).netloc


class _Hardening(BaseHTTPMiddleware):
    """Security headers on every answer; cross-origin POSTs refused."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response: Response
        if request.method not in ("GET", "HEAD") and _cross_origin(request):
            response = PlainTextResponse("cross-origin request refused", status_code=403)
        else:
            response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


class Console:
    """The state one console process shares between requests."""

    def __init__(
        self,
        settings: ConsoleSettings,
        *,
        validator: TokenValidator | None = None,
        codec: SessionCodec | None = None,
    ) -> None:
        self.settings = settings
        self.audit = AuditStore(settings.store_url)
        self.approvals = ApprovalStore(settings.approvals_url or settings.store_url)
        self.validator = validator or TokenValidator(settings.identity)
        self.codec = codec or SessionCodec(ttl_seconds=settings.session_seconds)
        self.throttle = FailureThrottle()
        self.templates = _templates()

    def close(self) -> None:
        self.approvals.close()
        self.audit.close()

    # -- helpers ----------------------------------------------------------------

    def user(self, request: Request) -> ConsoleUser | None:
        user = self.codec.read(request.cookies.get(COOKIE_NAME))
        if user is None or not user.in_any(self.settings.console_groups):
            return None
        return user

    def is_approver(self, user: ConsoleUser) -> bool:
        return user.in_any(self.settings.approver_groups)

    def render(
        self,
        request: Request,
        name: str,
        user: ConsoleUser | None,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        context.update(
            user=user,
            approver=user is not None and self.is_approver(user),
            csrf=self.codec.csrf_token(user) if user is not None else "",
            path=request.url.path,
        )
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    def record(self, request: Request, user: ConsoleUser, action: Any, target: str,
               **detail: Any) -> None:
        record_access(
            self.audit, user, action, target, client_addr=_client(request), **detail
        )


FLASH_COOKIE = "pgw_flash"


def _back_to_queue(outcome: str, message: str, *, secure: bool) -> RedirectResponse:
    """Redirect to the queue with a one-shot message in a cookie, not in the
    URL: a crafted link cannot put words of its choosing on the page."""
    response = RedirectResponse("/approvals", status_code=303)
    response.set_cookie(
        FLASH_COOKIE, quote(f"{outcome}:{message[:300]}"), max_age=60, httponly=True,
        samesite="strict", secure=secure, path="/approvals",
    )
    return response


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _to_signin(request: Request) -> RedirectResponse:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303)


def _safe_next(value: str | None) -> str:
    """Only a local path may be the target after sign-in (no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/sessions"
    return value


def create_app(
    settings: ConsoleSettings,
    *,
    validator: TokenValidator | None = None,
    codec: SessionCodec | None = None,
) -> FastAPI:
    """The console application; the caller runs it (``pgwarden console
    serve`` with uvicorn, tests with TestClient or a real server)."""
    console = Console(settings, validator=validator, codec=codec)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            console.close()

    app = FastAPI(
        title="pgwarden console",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.console = console
    app.add_middleware(_Hardening)
    app.mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static")

    @app.exception_handler(AccessNotRecorded)
    async def _unrecorded(request: Request, exc: AccessNotRecorded) -> Response:
        log.error("console_access_not_recorded", error=str(exc), path=request.url.path)
        return console.render(
            request,
            "error.html",
            console.user(request),
            status_code=503,
            title="Evidence not shown",
            message=(
                "This read of the audit trail could not be recorded, so nothing is shown "
                "(PCI DSS 10.2.1.3). Check that the audit store is reachable and try again."
            ),
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        if console.user(request) is None:
            return RedirectResponse("/signin", status_code=303)
        return RedirectResponse("/sessions", status_code=303)

    # -- sign-in ------------------------------------------------------------------

    @app.get("/signin", response_class=HTMLResponse)
    def signin_form(request: Request, next: str | None = None) -> Response:
        return console.render(request, "signin.html", None, next=_safe_next(next), error="")

    @app.post("/signin")
    async def signin(
        request: Request,
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/sessions",
    ) -> Response:
        addr = _client(request)
        delay = console.throttle.delay_for(addr)
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            identity = await console.validator.validate_async(token)
        except TokenRejected as exc:
            # The reason goes to the audit trail; the page says only that it failed.
            await asyncio.to_thread(
                record_sign_in, console.audit, ok=False, reason=exc.reason_code.value,
                client_addr=addr,
            )
            console.throttle.record_failure(addr)
            log.info("console_signin_rejected", reason=exc.reason_code.value, client_addr=addr)
            return console.render(
                request, "signin.html", None, status_code=401, next=_safe_next(next),
                error="The token was not accepted. Get a fresh token from your identity "
                "provider and paste it again.",
            )
        if not set(identity.groups) & settings.console_groups:
            await asyncio.to_thread(
                record_sign_in, console.audit, ok=False, reason="console_no_group",
                subject=identity.subject, issuer=identity.issuer, client_addr=addr,
            )
            console.throttle.record_failure(addr)
            wanted = ", ".join(sorted(settings.console_groups))
            return console.render(
                request, "signin.html", None, status_code=403, next=_safe_next(next),
                error=f"{identity.subject} is signed by a trusted issuer but is in none of "
                f"the console's groups ({wanted}). Ask for membership of one of them.",
            )
        cookie, user = console.codec.issue(identity)
        await asyncio.to_thread(
            record_sign_in, console.audit, ok=True, reason="console_signin",
            subject=identity.subject, issuer=identity.issuer, client_addr=addr,
        )
        console.throttle.record_success(addr)
        log.info("console_signin", subject=user.subject, client_addr=addr)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            cookie,
            max_age=max(1, int(user.expires_at - console.codec.now())),
            httponly=True,
            samesite="strict",
            secure=settings.cookie_secure,
            path="/",
        )
        return response

    @app.post("/signout")
    def signout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        user = console.user(request)
        if user is not None and not console.codec.check_csrf(user, csrf):
            return PlainTextResponse("missing or invalid CSRF token", status_code=403)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(
            COOKIE_NAME, path="/", httponly=True, samesite="strict",
            secure=settings.cookie_secure,
        )
        return response

    # -- sessions -----------------------------------------------------------------

    @app.get("/sessions", response_class=HTMLResponse)
    def sessions(
        request: Request,
        since: str = "",
        subject: str = "",
        group: str = "",
        decision: str = "",
    ) -> Response:
        user = console.user(request)
        if user is None:
            return _to_signin(request)
        filters = {"since": since.strip(), "subject": subject.strip(), "group": group.strip(),
                   "decision": decision.strip()}
        problem = ""
        since_ts: str | None = None
        if filters["since"]:
            try:
                since_ts = parse_since(filters["since"])
            except ValueError:
                problem = "Since: use an ISO date/time (2026-01-31, 2026-01-31T08:00) or 7d, 12h, 30m."
        verdict = _DECISIONS.get(filters["decision"]) if filters["decision"] else None
        if filters["decision"] and verdict is None:
            problem = "Decision: choose denied, held or allowed."
        rows: list[dict[str, Any]] = []
        shown = 0
        if not problem:
            console.record(
                request, user, "list", "sessions", since=since_ts,
                subject=filters["subject"], group=filters["group"], decision=verdict,
            )
            rows = console.audit.list_sessions(
                since=since_ts, subject=filters["subject"] or None,
                group=filters["group"] or None, decision=verdict,
            )
            shown = min(len(rows), settings.max_sessions_listed)
        newest = list(reversed(rows))[: settings.max_sessions_listed]
        return console.render(
            request, "sessions.html", user, status_code=400 if problem else 200,
            rows=newest, total=len(rows), shown=shown, filters=filters, problem=problem,
        )

    @app.get("/sessions/{session_id}", response_class=HTMLResponse)
    def session_page(request: Request, session_id: str) -> Response:
        user = console.user(request)
        if user is None:
            return _to_signin(request)
        console.record(request, user, "replay", session_id)
        found = replay(console.audit, session_id)
        if found is None:
            return console.render(
                request, "error.html", user, status_code=404, title="No such session",
                message=f"No records for session {session_id}.",
            )
        return console.render(request, "session.html", user, replay=found)

    # -- approvals ----------------------------------------------------------------

    @app.get("/approvals", response_class=HTMLResponse)
    def approvals(request: Request) -> Response:
        user = console.user(request)
        if user is None:
            return _to_signin(request)
        console.record(request, user, "console", "approvals", status="pending")
        pending = console.approvals.list(status="pending", limit=200)
        recent = [
            r for r in console.approvals.list(limit=50) if r.status.value != "pending"
        ][:20]
        ident = user.identity()
        can_decide = {
            r.approval_id: console.is_approver(user)
            and bool(set(user.groups) & set(r.approver_groups))
            and not _same_chain(ident.subject, ident.actor, r.subject, r.actor)
            for r in pending
        }
        outcome, _, message = unquote(request.cookies.get(FLASH_COOKIE, "")).partition(":")
        flash = {outcome: message} if outcome in ("done", "failed") else {}
        page = console.render(
            request, "approvals.html", user, pending=pending, recent=recent,
            can_decide=can_decide, done=flash.get("done", ""), failed=flash.get("failed", ""),
        )
        if FLASH_COOKIE in request.cookies:
            page.delete_cookie(FLASH_COOKIE, path="/approvals", httponly=True, samesite="strict",
                               secure=settings.cookie_secure)
        return page

    @app.post("/approvals/{approval_id}")
    def decide(
        request: Request,
        approval_id: str,
        csrf: Annotated[str, Form()] = "",
        decision: Annotated[str, Form()] = "",
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        user = console.user(request)
        if user is None:
            return PlainTextResponse("sign in first", status_code=401)
        if not console.codec.check_csrf(user, csrf):
            log.warning("console_csrf_refused", subject=user.subject, client_addr=_client(request))
            return PlainTextResponse("missing or invalid CSRF token", status_code=403)
        if not console.is_approver(user):
            wanted = ", ".join(sorted(settings.approver_groups))
            return PlainTextResponse(
                f"{user.subject} may only read: deciding needs membership of {wanted}",
                status_code=403,
            )
        if decision not in ("approve", "deny"):
            return PlainTextResponse("decision must be approve or deny", status_code=400)
        reason = reason.strip()
        if not reason:
            return _back_to_queue(
                "failed", f"{approval_id}: give a reason for the decision",
                secure=settings.cookie_secure,
            )
        try:
            rec = console.approvals.decide(
                approval_id, user.identity(), decision == "approve", reason
            )
        except (SelfApproval, NotAnApprover, NotPending, ApprovalNotFound, ApprovalError) as exc:
            # 10.2.1.4: refused attempts are worth an operator's attention.
            log.warning("console_decision_refused", approval_id=approval_id[:40],
                        approver=user.subject, refusal=type(exc).__name__)
            return _back_to_queue("failed", str(exc), secure=settings.cookie_secure)
        # The same evidence ApprovalManager records for the CLI and HTTP API; the
        # console decides through the store directly because it keeps no token.
        action: ApprovalAction = "approved" if decision == "approve" else "denied"
        try:
            console.audit.append(
                [
                    ApprovalEvent(
                        session_id=rec.session_id,
                        approval_id=rec.approval_id,
                        action=action,
                        statement_seq=rec.statement_seq,
                        approver=user.subject,
                        reason=rec.approver_reason,
                    )
                ]
            )
        except Exception as exc:  # the decision stands; say loudly that it is unrecorded
            log.error("console_decision_not_recorded", approval_id=rec.approval_id,
                      error=type(exc).__name__)
            return _back_to_queue(
                "failed",
                f"{rec.approval_id} {rec.status.value}, but the audit record of the decision "
                "could not be written: tell the audit store's operator",
                secure=settings.cookie_secure,
            )
        log.info("console_decision", approval_id=rec.approval_id, status=rec.status.value,
                 approver=user.subject)
        return _back_to_queue(
            "done", f"{rec.approval_id} {rec.status.value}", secure=settings.cookie_secure
        )

    # -- verification -------------------------------------------------------------

    @app.get("/verify", response_class=HTMLResponse)
    def verify_page(request: Request) -> Response:
        user = console.user(request)
        if user is None:
            return _to_signin(request)
        console.record(request, user, "verify", "all")
        status = verify_chain(console.audit, settings.signing_key, settings.checkpoints)
        return console.render(request, "verify.html", user, status=status)

    return app


def _same_chain(a_sub: str, a_act: str | None, b_sub: str, b_act: str | None) -> bool:
    def chain(sub: str, act: str | None) -> set[str]:
        return {sub, *(x for x in (act or "").split("<-") if x)}

    return bool(chain(a_sub, a_act) & chain(b_sub, b_act))


__all__ = ["Console", "create_app"]
