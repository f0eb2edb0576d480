"""OIDC token validation: the token a client sends as its password becomes an
:class:`tap.hooks.Identity`, or a :class:`TokenRejected` with a precise reason.

Why this module is careful about what it trusts:

* The signature is checked by PyJWT against keys from a JWKS (file or HTTPS URL)
  that the operator configured. The token's header only *selects* a key (``kid``)
  and names an algorithm; the algorithm must be in the configured allow-list and
  must fit the selected key's type (``kty``/``crv``) and its own ``alg``, so a
  token can never make us verify an RSA public key as an HMAC secret (the classic
  key-confusion attack) or skip verification with ``alg: none``.
* A reason code goes to the audit record (PCI DSS 10.2.1.4, invalid access
  attempts); the client only ever sees the generic :data:`CLIENT_MESSAGE` with
  SQLSTATE 28P01, so a prober learns nothing about which check failed.
* Nothing derived from the token's text goes into messages: details are our own
  words plus claim *names*, and :func:`_scrub` removes any token fragment that a
  library message might have echoed.
* Unknown ``kid`` values trigger a JWKS refresh (that is how key rotation is
  followed without a restart), but at most once per ``jwks_refresh_interval``, so
  random kids from an attacker cannot turn the gateway into a JWKS-endpoint
  hammer.

:class:`FailureThrottle` lives here too because it is the other half of
authentication: it slows a source address down after repeated failures
(brute force, credential stuffing) without any I/O of its own.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import jwt
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tap.hooks import AuthResult, Identity

__all__ = [
    "CLIENT_MESSAGE",
    "CLIENT_SQLSTATE",
    "ConnectDecider",
    "ConnectGrant",
    "FailureThrottle",
    "IdentitySettings",
    "JwksCache",
    "JwksChange",
    "RejectReason",
    "ThrottleSettings",
    "TokenAuthenticator",
    "TokenRejected",
    "TokenValidator",
    "ValidatedToken",
    "render_actor_chain",
    "source_key",
]

_log = structlog.get_logger("pgwarden.identity")

#: What the client is told whatever the reason (FATAL, SQLSTATE 28P01).
CLIENT_MESSAGE = "authentication failed"
CLIENT_SQLSTATE = "28P01"

# Asymmetric algorithms only. HMAC (HS*) is excluded on purpose: a JWKS is a
# public document, so any "secret" it could hold is not one; accepting HS* next
# to public keys is exactly what key-confusion attacks exploit.
_KTY_FOR_ALG: dict[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(_KTY_FOR_ALG)

_MAX_JWKS_BYTES = 1 << 20  # a JWKS is a few KiB; refuse to buffer a hostile giant
_MAX_ACT_DEPTH = 8
_MAX_GROUPS = 512
_MAX_NAME_LEN = 512


class RejectReason(enum.StrEnum):
    """Why a token was refused; recorded in the audit trail, never sent to the client."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    DISALLOWED_ALG = "disallowed_alg"
    MISSING_CLAIM = "missing_claim"
    JWKS_UNAVAILABLE = "jwks_unavailable"


class TokenRejected(Exception):
    """A token was refused. ``reason_code`` and ``detail`` are for the audit
    record; the client gets :data:`CLIENT_MESSAGE` / :data:`CLIENT_SQLSTATE`.

    ``detail`` never contains the token or any part of it.
    """

    client_message = CLIENT_MESSAGE
    sqlstate = CLIENT_SQLSTATE

    def __init__(self, reason_code: RejectReason, detail: str) -> None:
        self.reason_code = RejectReason(reason_code)
        self.detail = detail
        super().__init__(f"{self.reason_code.value}: {detail}")

    def __repr__(self) -> str:
        return f"TokenRejected({self.reason_code.value!r}, {self.detail!r})"

    def auth_result(self) -> AuthResult:
        """The tap's failure answer (``Session.on_auth``): reason for the audit
        record, 28P01 and the generic message for the client."""
        return AuthResult(ok=False, reason=self.reason_code.value, sqlstate=self.sqlstate)


# --------------------------------------------------------------------------- settings


class IdentitySettings(BaseModel):
    """How tokens are validated. Every default is the safe choice.

    Exactly one of ``jwks_file`` and ``jwks_url`` must be set. ``jwks_url`` must be
    HTTPS; ``jwks_ca_file`` pins the CA bundle used to verify it (system trust
    store otherwise).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(min_length=1)
    audience: str | list[str]
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_ca_file: Path | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    required_claims: list[str] = Field(
        default_factory=lambda: ["exp", "iat", "sub", "iss", "aud"]
    )
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    groups_required: bool = False
    kind_claim: str = "kind"
    kind_default: Literal["agent", "human"] = "agent"
    # Maps claim values to a kind, for providers that cannot emit a custom claim:
    # e.g. kind_claim="azp", kind_values={"ci-pipeline": "agent", "console": "human"}.
    kind_values: dict[str, Literal["agent", "human"]] = Field(default_factory=dict)
    jwks_refresh_interval: float = Field(default=30.0, ge=0)
    jwks_max_age: float = Field(default=3600.0, gt=0)
    jwks_timeout: float = Field(default=5.0, gt=0)
    max_token_bytes: int = Field(default=16384, ge=256)

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm must be allowed")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' can never be allowed: it means unsigned tokens")
            if alg.upper().startswith("HS"):
                raise ValueError(
                    f"{alg} is an HMAC algorithm; only asymmetric algorithms are accepted "
                    "because JWKS keys are public (key-confusion risk)"
                )
            if alg not in _KTY_FOR_ALG:
                raise ValueError(
                    f"unsupported algorithm {alg!r}; choose from {', '.join(SUPPORTED_ALGORITHMS)}"
                )
        return value

    @field_validator("required_claims")
    @classmethod
    def _exp_required(cls, value: list[str]) -> list[str]:
        if "exp" not in value:
            raise ValueError(
                "'exp' must stay required: the gateway ends a session when its token expires"
            )
        return value

    @field_validator("jwks_url")
    @classmethod
    def _https_only(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith("https://"):
            raise ValueError(
                "jwks_url must be an https:// URL (keys fetched in clear can be forged)"
            )
        return value

    @field_validator("audience")
    @classmethod
    def _audience_nonempty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("audience must be a non-empty string or list of non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_jwks_source(self) -> IdentitySettings:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        if self.jwks_ca_file is not None and self.jwks_url is None:
            raise ValueError("jwks_ca_file only applies to jwks_url")
        return self


# --------------------------------------------------------------------------- JWKS


class JwksUnavailable(Exception):
    """The JWKS could not be read or parsed (message safe to log)."""


class JwksSource(Protocol):
    """Where key sets come from. ``changed`` must be cheap: it runs per validation."""

    @property
    def description(self) -> str: ...

    @property
    def needs_network(self) -> bool: ...

    def changed(self) -> bool: ...

    def fetch(self) -> dict[str, Any]: ...


def _parse_jwks(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise JwksUnavailable(f"{where} is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksUnavailable(f"{where} is not a JWKS (no 'keys' list)")
    return doc


class FileJwksSource:
    """A JWKS file; re-read whenever its inode, size or mtime changes, so writing
    a new file (atomically, with rename) rotates keys without a restart."""

    needs_network = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None

    @property
    def description(self) -> str:
        return f"JWKS file {self.path}"

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        return self._stat() != self._signature

    def fetch(self) -> dict[str, Any]:
        # Remember what we tried even when it fails: a missing or broken file is
        # then retried when it changes, not on every validation.
        self._signature = self._stat()
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise JwksUnavailable(f"cannot read {self.description}: {exc.strerror}") from exc
        if len(raw) > _MAX_JWKS_BYTES:
            raise JwksUnavailable(f"{self.description} is larger than {_MAX_JWKS_BYTES} bytes")
        return _parse_jwks(raw, self.description)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A JWKS must come from the configured URL: a redirect could downgrade to
    plain HTTP or hand key selection to another host."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(
            req.full_url, code, "redirect refused; configure the final JWKS URL", headers, fp
        )


class UrlJwksSource:
    """A JWKS fetched over HTTPS with certificate verification (urllib: no extra
    dependency). Blocking; :meth:`TokenValidator.validate_async` runs it in a thread."""

    needs_network = True

    def __init__(self, url: str, *, ca_file: Path | None = None, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _NoRedirect()
        )

    @property
    def description(self) -> str:
        return f"JWKS URL {self.url}"

    def changed(self) -> bool:
        return False

    def fetch(self) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked to be https in settings
            self.url, headers={"Accept": "application/json", "User-Agent": "pgwarden"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(_MAX_JWKS_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise JwksUnavailable(f"{self.description} answered HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise JwksUnavailable(f"cannot fetch {self.description}: {exc.reason}") from exc
        except (OSError, ValueError) as exc:
            raise JwksUnavailable(f"cannot fetch {self.description}: {exc}") from exc
        if len(raw) > _MAX_JWKS_BYTES:
            raise JwksUnavailable(f"{self.description} is larger than {_MAX_JWKS_BYTES} bytes")
        return _parse_jwks(raw, self.description)


@dataclass(frozen=True, slots=True)
class JwksChange:
    """The set of key ids changed (first load, rotation, removal). Worth an audit
    event: PCI DSS 10.2.1.5 asks for changes to authentication credentials."""

    source: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    key_count: int


def _short(value: str, limit: int = 64) -> str:
    """An attacker-chosen header value made fit for an audit detail: quoted
    (control characters escaped) and bounded."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))


def _kid_label(kid: str | None) -> str:
    return _short(kid) if kid is not None else "<no kid>"


class JwksCache:
    """Keys by ``kid``, loaded once and refreshed when needed.

    A refresh happens (a) on first use, (b) when a file source changed on disk,
    (c) when a URL source's copy is older than ``max_age`` and (d) when a token
    names a ``kid`` we do not hold, but (d) at most once per ``refresh_interval``
    seconds. A failed refresh keeps the keys we have (the provider being briefly
    down must not lock everyone out), but a key we do not have cannot be used.
    Thread-safe: validation may run in worker threads.
    """

    def __init__(
        self,
        source: JwksSource,
        *,
        refresh_interval: float = 30.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[JwksChange], None] | None = None,
    ) -> None:
        self.source = source
        self.refresh_interval = refresh_interval
        self.max_age = max_age
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._keys: dict[str | None, list[dict[str, Any]]] = {}
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self.fetch_count = 0

    @property
    def kids(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(k for k in self._keys if k is not None))

    def _refresh(self) -> None:
        """Fetch and swap the key set. Caller holds the lock."""
        now = self._clock()
        self._last_attempt = now
        self.fetch_count += 1
        try:
            doc = self.source.fetch()
        except JwksUnavailable as exc:
            self._last_error = str(exc)
            _log.warning("jwks_refresh_failed", source=self.source.description, error=str(exc))
            raise
        keys: dict[str | None, list[dict[str, Any]]] = {}
        for entry in doc["keys"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("kty"), str):
                continue  # one odd entry must not take the others down
            kid = entry.get("kid")
            if kid is not None and not isinstance(kid, str):
                continue
            keys.setdefault(kid, []).append(entry)
        before = {k for k in self._keys if k is not None}
        after = {k for k in keys if k is not None}
        first = self._loaded_at is None
        self._keys = keys
        self._loaded_at = now
        self._last_error = None
        if first or before != after:
            change = JwksChange(
                source=self.source.description,
                added=tuple(sorted(after - before)),
                removed=tuple(sorted(before - after)),
                key_count=sum(len(v) for v in keys.values()),
            )
            _log.info(
                "jwks_loaded",
                source=change.source,
                added=list(change.added),
                removed=list(change.removed),
                key_count=change.key_count,
            )
            if self._on_change is not None:
                try:
                    self._on_change(change)
                except Exception:  # an audit hook failing must not break logins
                    _log.exception("jwks_change_hook_failed", source=change.source)

    def _may_refetch(self) -> bool:
        if self._last_attempt is None:
            return True
        return self._clock() - self._last_attempt >= self.refresh_interval

    def candidates(self, kid: str | None) -> list[dict[str, Any]]:
        """The JWK dicts a token with this ``kid`` may be checked against.

        Raises :class:`TokenRejected` with ``jwks_unavailable`` or ``unknown_key``.
        """
        with self._lock:
            if self._loaded_at is None:
                if not self._may_refetch() and not self.source.changed():
                    raise TokenRejected(
                        RejectReason.JWKS_UNAVAILABLE,
                        f"no keys loaded yet; last attempt failed: {self._last_error}",
                    )
                try:
                    self._refresh()
                except JwksUnavailable as exc:
                    raise TokenRejected(RejectReason.JWKS_UNAVAILABLE, str(exc)) from None
            elif self.source.changed() or (
                self._clock() - self._loaded_at >= self.max_age and self._may_refetch()
            ):
                try:
                    self._refresh()
                except JwksUnavailable:
                    pass  # keep serving the keys we have; logged in _refresh

            found = self._pick(kid)
            if found:
                return found
            if self._may_refetch():
                try:
                    self._refresh()
                except JwksUnavailable as exc:
                    raise TokenRejected(
                        RejectReason.JWKS_UNAVAILABLE,
                        f"key {_kid_label(kid)} not cached and refresh failed: {exc}",
                    ) from None
                found = self._pick(kid)
                if found:
                    return found
            raise TokenRejected(
                RejectReason.UNKNOWN_KEY,
                f"key {_kid_label(kid)} is not in {self.source.description}",
            )

    def _pick(self, kid: str | None) -> list[dict[str, Any]]:
        if kid is not None:
            return list(self._keys.get(kid, ()))
        # No kid in the header: acceptable only when the choice is unambiguous.
        every = [k for group in self._keys.values() for k in group]
        return every if len(every) == 1 else []


# --------------------------------------------------------------------------- validator


@dataclass(frozen=True, slots=True)
class ValidatedToken:
    """What a successful validation yields. ``claims`` is the verified payload
    (useful for audit fields such as ``jti``); it contains no secret."""

    identity: Identity
    claims: Mapping[str, Any]
    kid: str | None
    algorithm: str


def render_actor_chain(act: Any) -> str | None:
    """Render an RFC 8693 ``act`` claim as ``"ci-bot<-alice"``.

    The outermost ``act`` is the current actor; each nested ``act`` is the one
    before it, so the chain reads left to right from the most recent actor.
    Returns None when there is no ``act``; raises ValueError when it is malformed.
    """
    if act is None:
        return None
    names: list[str] = []
    node = act
    while node is not None:
        if len(names) >= _MAX_ACT_DEPTH:
            raise ValueError(f"act claim nested deeper than {_MAX_ACT_DEPTH}")
        if not isinstance(node, dict):
            raise ValueError("act claim must be an object")
        sub = node.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ValueError("act claim has no string 'sub'")
        _check_name(sub, "act.sub")
        names.append(sub)
        node = node.get("act")
    return "<-".join(names)


def _check_name(value: str, what: str) -> None:
    if len(value) > _MAX_NAME_LEN:
        raise ValueError(f"{what} longer than {_MAX_NAME_LEN} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{what} contains control characters")


_MISSING = object()


def _claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path (``realm_access.roles``).

    The literal name wins: namespaced claims such as
    ``https://example.com/groups`` contain dots themselves.
    """
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _groups_from(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = value.replace(",", " ").split()
    elif isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ValueError("groups claim list holds non-string values")
        items = [v.strip() for v in value]
    else:
        raise ValueError("groups claim is neither a list nor a string")
    if len(items) > _MAX_GROUPS:
        raise ValueError(f"groups claim has more than {_MAX_GROUPS} entries")
    seen: dict[str, None] = {}
    for item in items:
        if item:
            _check_name(item, "group")
            seen.setdefault(item, None)
    return tuple(seen)


def _scrub(text: str, token: str) -> str:
    """Remove anything that looks like part of the token from a message."""
    if token and token in text:
        text = text.replace(token, "<token>")
    for part in token.split("."):
        if len(part) >= 8 and part in text:
            text = text.replace(part, "<token-part>")
    return text


class TokenValidator:
    """Validates tokens against :class:`IdentitySettings`.

    ``validate`` is synchronous and may block on a JWKS fetch when the source is
    a URL; in an event loop use ``await validate_async(token)``. ``clock`` is the
    monotonic clock used for JWKS refresh pacing (injectable for tests); token
    times (``exp``/``nbf``/``iat``) are checked by PyJWT against wall-clock time.
    """

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_jwks_change: Callable[[JwksChange], None] | None = None,
        source: JwksSource | None = None,
    ) -> None:
        self.settings = settings
        if source is None:
            if settings.jwks_file is not None:
                source = FileJwksSource(settings.jwks_file)
            else:
                assert settings.jwks_url is not None
                source = UrlJwksSource(
                    settings.jwks_url,
                    ca_file=settings.jwks_ca_file,
                    timeout=settings.jwks_timeout,
                )
        self.jwks = JwksCache(
            source,
            refresh_interval=settings.jwks_refresh_interval,
            max_age=settings.jwks_max_age,
            clock=clock,
            on_change=on_jwks_change,
        )
        self._allowed = frozenset(settings.algorithms)
        self._audience: str | list[str] = settings.audience

    def __repr__(self) -> str:
        return (
            f"TokenValidator(issuer={self.settings.issuer!r}, "
            f"source={self.jwks.source.description!r})"
        )

    def validate(self, token: str) -> Identity:
        """The identity behind ``token``, or :class:`TokenRejected`."""
        return self.validate_detailed(token).identity

    async def validate_async(self, token: str) -> Identity:
        """Like :meth:`validate`; a JWKS fetch over HTTPS runs in a worker thread
        so the event loop keeps serving other sessions meanwhile."""
        if self.jwks.source.needs_network:
            return await asyncio.to_thread(self.validate, token)
        return self.validate(token)

    def validate_detailed(self, token: str) -> ValidatedToken:
        """Like :meth:`validate`, also returning the verified claims, ``kid`` and
        algorithm for the audit record."""
        try:
            return self._validate(token)
        except TokenRejected as exc:
            # Defence in depth: whatever a library said, no token text leaves.
            clean = _scrub(exc.detail, token) if isinstance(token, str) else exc.detail
            if clean != exc.detail:
                raise TokenRejected(exc.reason_code, clean) from None
            raise

    # The steps, in the order an attacker would probe them.
    def _validate(self, token: str) -> ValidatedToken:
        s = self.settings
        if not isinstance(token, str) or not token.strip():
            raise TokenRejected(RejectReason.MALFORMED, "empty password where a token was expected")
        token = token.strip()
        if len(token) > s.max_token_bytes:
            raise TokenRejected(
                RejectReason.MALFORMED, f"token longer than {s.max_token_bytes} bytes"
            )
        if token.count(".") != 2:
            raise TokenRejected(
                RejectReason.MALFORMED, "not a compact JWS (expected three dot-separated parts)"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenRejected(RejectReason.MALFORMED, f"unreadable header: {exc}") from None

        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise TokenRejected(RejectReason.MALFORMED, "header has no 'alg'")
        if alg.lower() == "none":
            raise TokenRejected(RejectReason.UNSIGNED, "token is unsigned (alg 'none')")
        if alg not in self._allowed:
            raise TokenRejected(
                RejectReason.DISALLOWED_ALG,
                f"algorithm {_short(alg, 16)} is not in the allow-list {sorted(self._allowed)}",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected(RejectReason.MALFORMED, "header 'kid' is not a string")

        key = self._key_for(kid, alg)

        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                issuer=s.issuer,
                leeway=s.leeway_seconds,
                options={"require": list(s.required_claims), "strict_aud": False},
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected(
                RejectReason.BAD_SIGNATURE,
                f"signature does not verify with key {_kid_label(kid)} ({alg})",
            ) from None
        except jwt.ExpiredSignatureError:
            raise TokenRejected(RejectReason.EXPIRED, "token 'exp' has passed") from None
        except jwt.ImmatureSignatureError as exc:
            which = "nbf" if "nbf" in str(exc) else "iat"
            raise TokenRejected(
                RejectReason.NOT_YET_VALID, f"token '{which}' is in the future"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenRejected(
                RejectReason.WRONG_ISSUER, f"issuer is not {s.issuer!r}"
            ) from None
        except jwt.InvalidAudienceError:
            raise TokenRejected(
                RejectReason.WRONG_AUDIENCE, f"audience does not include {self._audience!r}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(
                RejectReason.MISSING_CLAIM, f"required claim {exc.claim!r} is missing"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected(
                RejectReason.DISALLOWED_ALG, f"algorithm {alg!r} refused for this key"
            ) from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(
                RejectReason.MALFORMED, f"{type(exc).__name__}: {exc}"
            ) from None

        identity = self._identity_from(claims)
        return ValidatedToken(identity=identity, claims=claims, kid=kid, algorithm=alg)

    def _key_for(self, kid: str | None, alg: str) -> Any:
        """The verification key for (kid, alg), refusing any key whose type or
        declared algorithm does not fit ``alg`` (no key confusion)."""
        want_kty, want_crv = _KTY_FOR_ALG[alg]
        problems: list[str] = []
        for jwk_dict in self.jwks.candidates(kid):
            kty = jwk_dict.get("kty")
            if kty != want_kty:
                problems.append(f"key type {kty} cannot verify {alg}")
                continue
            if want_crv is not None and jwk_dict.get("crv") not in want_crv:
                problems.append(f"curve {jwk_dict.get('crv')} cannot verify {alg}")
                continue
            declared = jwk_dict.get("alg")
            if declared is not None and declared != alg:
                problems.append(f"key declares alg {declared}, token uses {alg}")
                continue
            use = jwk_dict.get("use")
            if use is not None and use != "sig":
                problems.append(f"key use is {use!r}, not 'sig'")
                continue
            ops = jwk_dict.get("key_ops")
            if isinstance(ops, list) and "verify" not in ops:
                problems.append("key_ops does not allow 'verify'")
                continue
            if any(p in jwk_dict for p in ("d", "p", "q", "k")):
                # A private or symmetric key in a JWKS is a publishing mistake;
                # refusing it keeps us from ever treating key material as a secret.
                problems.append("JWKS entry holds private or symmetric key material")
                continue
            try:
                return jwt.PyJWK(jwk_dict, algorithm=alg).key
            except jwt.PyJWTError as exc:
                problems.append(f"unusable JWK: {type(exc).__name__}")
                continue
        raise TokenRejected(
            RejectReason.DISALLOWED_ALG,
            f"key {_kid_label(kid)} does not fit algorithm {alg}: {'; '.join(problems)}",
        )

    def _identity_from(self, claims: Mapping[str, Any]) -> Identity:
        s = self.settings
        subject = _claim_at(claims, s.subject_claim)
        if subject is _MISSING or subject is None or subject == "":
            raise TokenRejected(
                RejectReason.MISSING_CLAIM, f"subject claim {s.subject_claim!r} is missing"
            )
        if not isinstance(subject, str):
            raise TokenRejected(
                RejectReason.MALFORMED, f"subject claim {s.subject_claim!r} is not a string"
            )
        try:
            _check_name(subject, "subject")
        except ValueError as exc:
            raise TokenRejected(RejectReason.MALFORMED, str(exc)) from None

        raw_groups = _claim_at(claims, s.groups_claim)
        if raw_groups is _MISSING or raw_groups is None:
            if s.groups_required:
                raise TokenRejected(
                    RejectReason.MISSING_CLAIM, f"groups claim {s.groups_claim!r} is missing"
                )
            groups: tuple[str, ...] = ()
        else:
            try:
                groups = _groups_from(raw_groups)
            except ValueError as exc:
                raise TokenRejected(
                    RejectReason.MALFORMED, f"claim {s.groups_claim!r}: {exc}"
                ) from None

        kind = self._kind_from(claims)

        try:
            actor = render_actor_chain(claims.get("act"))
        except ValueError as exc:
            raise TokenRejected(RejectReason.MALFORMED, str(exc)) from None

        exp = claims.get("exp")
        issuer = claims.get("iss")
        return Identity(
            subject=subject,
            groups=groups,
            issuer=issuer if isinstance(issuer, str) else s.issuer,
            kind=kind,
            actor=actor,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )

    def _kind_from(self, claims: Mapping[str, Any]) -> str:
        s = self.settings
        value = _claim_at(claims, s.kind_claim)
        if value is _MISSING or value is None:
            return s.kind_default
        if isinstance(value, str):
            if value in s.kind_values:
                return s.kind_values[value]
            if value in ("agent", "human"):
                return value
        # Fail closed: an identity type we cannot place would make policy guess.
        raise TokenRejected(
            RejectReason.MISSING_CLAIM,
            f"claim {s.kind_claim!r} is not 'agent' or 'human' and not mapped by kind_values",
        )


# --------------------------------------------------------------------------- throttle


class ThrottleSettings(BaseModel):
    """Slow-down after repeated authentication failures from one source.

    The first ``free_failures`` failures cost nothing (typos, a token that just
    expired); after that each failure doubles the delay from ``base_delay`` up to
    ``max_delay``. A source that stays quiet for ``window_seconds`` starts afresh.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_delay: float = Field(default=0.5, ge=0)
    max_delay: float = Field(default=10.0, ge=0)
    window_seconds: float = Field(default=300.0, gt=0)
    free_failures: int = Field(default=2, ge=0)
    max_tracked: int = Field(default=10000, ge=1)


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


def source_key(addr: str) -> str:
    """The bucket an address is counted in: the host without port, and for IPv6
    the /64 (one client typically owns a whole /64, so counting single addresses
    would be trivially evaded)."""
    host = addr.strip()
    if not host:
        return "local"
    if host.startswith("["):  # [v6]:port
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # v4:port or name:port
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass
class FailureThrottle:
    """Per-source exponential delay after failed authentications. Pure logic:
    the caller sleeps, e.g.::

        throttle.record_failure(addr)
        await asyncio.sleep(throttle.delay_for(addr))
        # then send FATAL 28P01

    Memory is bounded by ``max_tracked`` sources (least recently failing first
    out). The delay applies per connection, so it is paired with connection
    limits in Envoy against many parallel attempts.
    """

    settings: ThrottleSettings = field(default_factory=ThrottleSettings)
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[str, _Failures] = field(default_factory=OrderedDict, repr=False)

    def _live(self, key: str) -> _Failures | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry.last > self.settings.window_seconds:
            del self._entries[key]
            return None
        return entry

    def failures(self, addr: str) -> int:
        """Failures from ``addr``'s bucket within the current window."""
        entry = self._live(source_key(addr))
        return entry.count if entry else 0

    def delay_for(self, addr: str) -> float:
        """Seconds to wait before answering ``addr`` (0.0 when not throttled)."""
        n = self.failures(addr) - self.settings.free_failures
        if n <= 0:
            return 0.0
        # Cap the exponent before computing so a long attack cannot overflow.
        return min(self.settings.max_delay, self.settings.base_delay * 2.0 ** min(n - 1, 64))

    def record_failure(self, addr: str) -> float:
        """Count a failure; returns the delay that now applies to ``addr``."""
        key = source_key(addr)
        now = self.clock()
        entry = self._live(key)
        if entry is None:
            entry = _Failures(count=0, last=now)
            self._entries[key] = entry
        entry.count += 1
        entry.last = now
        self._entries.move_to_end(key)
        self._evict()
        return self.delay_for(addr)

    def record_success(self, addr: str) -> None:
        """A successful login from the source clears its record."""
        self._entries.pop(source_key(addr), None)

    def _evict(self) -> None:
        while len(self._entries) > self.settings.max_tracked:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)



# --------------------------------------------------------------------------- composition


@dataclass(frozen=True, slots=True)
class ConnectGrant:
    """The connect decision (Rego, in policyd): the upstream role this identity
    may use for this database, or ``role=None`` with the reason it may not."""

    role: str | None
    reason: str = ""
    decision_id: str = ""


ConnectDecider = Callable[[Identity, str, str], Awaitable[ConnectGrant]]
"""``(identity, database, client_user) -> ConnectGrant``."""


class CredentialSource(Protocol):
    """What :class:`TokenAuthenticator` needs from ``policyd.secrets.SecretStore``."""

    def for_role(self, role: str) -> Any: ...


class AuthRequest(Protocol):
    """The fields of ``tap.actions.NeedAuth`` the authenticator reads."""

    @property
    def token(self) -> str: ...

    @property
    def client_addr(self) -> str: ...

    @property
    def database(self) -> str: ...

    @property
    def user(self) -> str: ...


class TokenAuthenticator:
    """Token in, ``tap.hooks.AuthResult`` out: validation, the connect
    decision, the upstream credential and the failure slowdown in one call, so
    a driver answering ``NeedAuth`` does one ``await``::

        result = await authenticator.authenticate(need.token, need.client_addr,
                                                  need.database, need.user)
        actions = session.on_auth(need.ticket, result)

    Failures of the token are answered after the throttle's delay with 28P01;
    a refused connect decision or a role without credentials with 28000. The
    precise reason is in ``AuthResult.reason`` for the audit record.
    """

    def __init__(
        self,
        validator: TokenValidator,
        credentials: CredentialSource,
        decide_connect: ConnectDecider,
        *,
        throttle: FailureThrottle | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.validator = validator
        self.credentials = credentials
        self.decide_connect = decide_connect
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self._sleep = sleep

    async def __call__(self, need: AuthRequest) -> AuthResult:
        """Fits ``tap.runtime.Runtime.authenticator`` as is."""
        return await self.authenticate(need.token, need.client_addr, need.database, need.user)

    async def authenticate(
        self, token: str, client_addr: str, database: str, user: str
    ) -> AuthResult:
        try:
            identity = await self.validator.validate_async(token)
        except TokenRejected as exc:
            _log.info(
                "token_rejected",
                reason=exc.reason_code.value,
                detail=exc.detail,
                client_addr=client_addr,
                database=database,
                user=user,
            )
            delay = self.throttle.record_failure(client_addr)
            if delay > 0:
                await self._sleep(delay)
            return exc.auth_result()

        grant = await self.decide_connect(identity, database, user)
        if grant.role is None:
            return AuthResult(
                ok=False,
                identity=identity,
                reason=f"connect_denied: {grant.reason}" if grant.reason else "connect_denied",
                sqlstate="28000",
                decision_id=grant.decision_id,
            )
        try:
            login = self.credentials.for_role(grant.role).as_login()
        except KeyError:
            _log.error("no_upstream_credential", role=grant.role, database=database)
            return AuthResult(
                ok=False,
                identity=identity,
                reason=f"no_upstream_credential: role {grant.role!r}",
                sqlstate="28000",
                decision_id=grant.decision_id,
            )
        self.throttle.record_success(client_addr)
        return AuthResult(ok=True, identity=identity, login=login, decision_id=grant.decision_id)
