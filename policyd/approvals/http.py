"""The approvals HTTP API (JSON), for consoles, chat bots and curl.

Authenticated by ``Authorization: Bearer <OIDC token>``: the token is passed
to the approval service, which validates it (``TokenValidator``) and applies
the approver rules; this module only translates HTTP to calls and
exceptions to status codes. It never logs or echoes the token.

=======  ==============================  ============================================
GET      /approvals?status=&limit=       requests you made or may decide, newest first
GET      /approvals/{id}                 one request
POST     /approvals/{id}/approve         body ``{"reason": "..."}``
POST     /approvals/{id}/deny            body ``{"reason": "..."}``
=======  ==============================  ============================================

Errors: ``{"error": "<text>", "code": "<Exception>"}`` with 401 (token),
403 (self-approval, not an approver), 404, 409 (not pending), 422 (input),
503 (policyd unreachable).

Embedding: :func:`create_router` gives a FastAPI ``APIRouter`` over any
backend (the in-process :class:`~policyd.approvals.service.ApprovalManager`
or :class:`~policyd.approvals.client.RemoteApprovals`) to ``include_router``
in a console app; :func:`create_app` a complete ASGI app
(``pgwarden approvals serve-http`` runs it with uvicorn).
"""

from __future__ import annotations

import builtins
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from policyd.approvals.models import ApprovalRecord
from policyd.approvals.store import (
    ApprovalError,
    ApprovalNotFound,
    InvalidRequest,
    NotAnApprover,
    NotPending,
    SelfApproval,
    Unauthenticated,
)

__all__ = ["ApprovalsBackend", "DecideBody", "bearer_token", "create_app", "create_router",
           "install_error_handler"]


class ApprovalsBackend(Protocol):
    async def list(self, token: str, status: str | None = None,
                   limit: int = 100) -> builtins.list[ApprovalRecord]: ...

    async def get(self, token: str, approval_id: str) -> ApprovalRecord: ...

    async def decide(self, token: str, approval_id: str, approve: bool,
                     reason: str) -> ApprovalRecord: ...


class DecideBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="why (kept as evidence)")


_STATUS: tuple[tuple[type[ApprovalError], int], ...] = (
    (Unauthenticated, 401),
    (SelfApproval, 403),
    (NotAnApprover, 403),
    (ApprovalNotFound, 404),
    (NotPending, 409),
    (InvalidRequest, 422),
)


def _error_response(exc: ApprovalError) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 503)
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
    return JSONResponse({"error": str(exc), "code": type(exc).__name__}, status_code=status,
                        headers=headers)


def bearer_token(authorization: Annotated[str | None, Header()] = None) -> str:
    """The token of an ``Authorization: Bearer`` header (401 without one)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send the approver's OIDC token as 'Authorization: Bearer <token>'")
    return token.strip()


Token = Annotated[str, Depends(bearer_token)]


def create_router(backend: ApprovalsBackend, *, prefix: str = "/approvals") -> APIRouter:
    """The four endpoints over ``backend``. The including app must install
    :func:`install_error_handler` (``create_app`` does) so refusals become
    JSON errors rather than 500s."""
    router = APIRouter(prefix=prefix, tags=["approvals"])

    @router.get("")
    async def list_approvals(token: Token, status: str | None = None,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                             ) -> dict[str, Any]:
        records = await backend.list(token, status, limit)
        return {"approvals": [r.to_json() for r in records]}

    @router.get("/{approval_id}")
    async def get_approval(approval_id: str, token: Token) -> dict[str, Any]:
        return (await backend.get(token, approval_id)).to_json()

    @router.post("/{approval_id}/approve")
    async def approve(approval_id: str, body: DecideBody, token: Token) -> dict[str, Any]:
        return (await backend.decide(token, approval_id, True, body.reason)).to_json()

    @router.post("/{approval_id}/deny")
    async def deny(approval_id: str, body: DecideBody, token: Token) -> dict[str, Any]:
        return (await backend.decide(token, approval_id, False, body.reason)).to_json()

    return router


def install_error_handler(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApprovalError)
        return _error_response(exc)

    async def invalid(_request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's default echoes the input back; a reason may hold a PAN.
        assert isinstance(exc, RequestValidationError)
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                          for e in exc.errors())
        return JSONResponse({"error": f"invalid request ({where})", "code": "InvalidRequest"},
                            status_code=422)

    app.add_exception_handler(ApprovalError, handle)
    app.add_exception_handler(RequestValidationError, invalid)


def create_app(backend: ApprovalsBackend, *, prefix: str = "/approvals") -> FastAPI:
    """A complete ASGI app: the router, JSON errors, and ``/healthz``."""
    app = FastAPI(title="pgwarden approvals", version="1", docs_url=None, redoc_url=None,
                  openapi_url=f"{prefix}/openapi.json")
    app.include_router(create_router(backend, prefix=prefix))
    install_error_handler(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
