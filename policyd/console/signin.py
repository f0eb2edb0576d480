"""Console sessions: an HMAC-signed cookie that says who signed in, and the
CSRF token bound to it.

Why a home-made signed cookie rather than a server-side session table: the
console keeps no state of its own beyond the audit and approvals stores, and a
cookie holding only the validated identity (subject, groups, issuer, kind,
actor) and an expiry is enough. The OIDC token itself is never put in the
cookie, a page or a log: it is validated once at sign-in and dropped.

The cookie is short-lived (15 minutes by default, PCI DSS 8.2.8, and never
beyond the token's own ``exp``), ``HttpOnly`` (no script can read it),
``SameSite=Strict`` (no cross-site request carries it) and ``Secure`` unless
the console listens on loopback only. The signing key lives in memory: a
restart signs everybody out, which is the safe direction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from tap.hooks import Identity

COOKIE_NAME = "pgw_console"
_SESSION_LABEL = b"pgwarden-console-session\x00"
_CSRF_LABEL = b"pgwarden-console-csrf\x00"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """Who is signed in, as the token said at sign-in time."""

    subject: str
    groups: tuple[str, ...]
    issuer: str
    kind: str
    actor: str | None
    expires_at: float
    session_nonce: str

    def identity(self) -> Identity:
        """The identity handed to the approvals store as the approver."""
        return Identity(
            subject=self.subject,
            groups=self.groups,
            issuer=self.issuer,
            kind=self.kind,
            actor=self.actor,
            expires_at=self.expires_at,
        )

    def in_any(self, groups: frozenset[str]) -> bool:
        return bool(groups.intersection(self.groups))


class SessionCodec:
    """Issues and checks session cookies and CSRF tokens with one HMAC key."""

    def __init__(
        self,
        key: bytes | None = None,
        *,
        ttl_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        if len(self._key) < 32:
            raise ValueError("the console session key must be at least 32 bytes")
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def _mac(self, label: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, label + data, hashlib.sha256).digest()

    def issue(self, identity: Identity) -> tuple[str, ConsoleUser]:
        """A cookie value for ``identity``; expires after the TTL or with the
        token, whichever comes first."""
        expires = self._clock() + self.ttl_seconds
        if identity.expires_at is not None:
            expires = min(expires, float(identity.expires_at))
        user = ConsoleUser(
            subject=identity.subject,
            groups=tuple(identity.groups),
            issuer=identity.issuer,
            kind=identity.kind,
            actor=identity.actor,
            expires_at=expires,
            session_nonce=secrets.token_hex(16),
        )
        body = json.dumps(
            {
                "sub": user.subject,
                "grp": list(user.groups),
                "iss": user.issuer,
                "knd": user.kind,
                "act": user.actor,
                "exp": user.expires_at,
                "sid": user.session_nonce,
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        return f"{_b64(body)}.{_b64(self._mac(_SESSION_LABEL, body))}", user

    def read(self, cookie: str | None) -> ConsoleUser | None:
        """The user of a valid, unexpired cookie; None for anything else."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 8192:
            return None
        body_b64, mac_b64 = cookie.split(".")
        try:
            body = _unb64(body_b64)
            mac = _unb64(mac_b64)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(mac, self._mac(_SESSION_LABEL, body)):
            return None
        try:
            data = json.loads(body)
            user = ConsoleUser(
                subject=str(data["sub"]),
                groups=tuple(str(g) for g in data["grp"]),
                issuer=str(data["iss"]),
                kind=str(data["knd"]),
                actor=None if data["act"] is None else str(data["act"]),
                expires_at=float(data["exp"]),
                session_nonce=str(data["sid"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if user.expires_at <= self._clock():
            return None
        return user

    def csrf_token(self, user: ConsoleUser) -> str:
        """The token every state-changing form of ``user``'s session carries.

        Derived from the session nonce, so it changes with each sign-in and a
        page from another session (or another site) cannot supply it."""
        return _b64(self._mac(_CSRF_LABEL, user.session_nonce.encode()))

    def check_csrf(self, user: ConsoleUser, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode(), self.csrf_token(user).encode())
