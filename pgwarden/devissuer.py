"""Development token issuer: a key pair, a JWKS and a `mint` that signs tokens
the local stack accepts, so nobody needs an OIDC provider to try pgwarden.

Not for production: the private key sits unencrypted on disk (mode 0600 in a
0700 directory). Production points :class:`policyd.identity.IdentitySettings`
at the real provider's JWKS instead (docs/identity.md).

Layout under the keys directory (``.run/identity/`` by default)::

    issuer.json        which key signs now, when retired keys stop being published
    keys/<kid>.pem     private keys (PKCS#8 PEM, 0600)
    jwks.json          public keys, what the gateway's ``jwks_file`` points at

Every write of ``jwks.json`` is atomic (write + rename) so a validator reading it
concurrently sees the old or the new set, never half of one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

if TYPE_CHECKING:
    from policyd.identity import IdentitySettings

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_KEYS_DIR",
    "DEV_ISSUER",
    "DevIssuer",
    "DevIssuerError",
    "ensure_dev_keys",
]

DEV_ISSUER = "https://dev-issuer.pgwarden.invalid"
DEFAULT_AUDIENCE = "pgwarden"
DEFAULT_KEYS_DIR = Path(".run/identity")
DEFAULT_GRACE_SECONDS = 86400.0

Algorithm = Literal["EdDSA", "ES256"]
_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class DevIssuerError(Exception):
    """The keys directory is unusable; the message says how to fix it."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_jwk(key: _PrivateKey) -> dict[str, Any]:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return ECAlgorithm.to_jwk(key.public_key(), as_dict=True)


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: a kid that names the key itself, so the same key
    always gets the same id and two keys never share one."""
    members = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _generate(algorithm: Algorithm) -> _PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what we asked for
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if fd != -1:
            os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """`make up` and `pgwarden token mint` may race on first use; one creates."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(slots=True)
class _KeyEntry:
    kid: str
    alg: str
    created: float
    retire_at: float | None = None


def _act_claim(act: str | Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``"alice"`` → ``{"sub": "alice"}``; ``"ci-bot<-alice"`` or
    ``["ci-bot", "alice"]`` → ``{"sub": "ci-bot", "act": {"sub": "alice"}}``
    (RFC 8693: the outer ``act`` is the current actor)."""
    if isinstance(act, Mapping):
        return dict(act)
    names = act.split("<-") if isinstance(act, str) else list(act)
    names = [n.strip() for n in names]
    if not names or not all(names):
        raise ValueError("act needs at least one non-empty name")
    claim: dict[str, Any] | None = None
    for name in reversed(names):
        claim = {"sub": name} if claim is None else {"sub": name, "act": claim}
    assert claim is not None
    return claim


class DevIssuer:
    """Signs development tokens with the current key of a keys directory.

    Obtain one with :func:`ensure_dev_keys`; the constructor expects the
    directory to be initialised already.
    """

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._reload()

    def _reload(self) -> None:
        """(Re)read the directory: another process may have rotated meanwhile."""
        meta = self._read_meta()
        self.issuer: str = meta["issuer"]
        self.algorithm: Algorithm = meta["algorithm"]
        self.current_kid: str = meta["current"]
        self._entries = [_KeyEntry(**e) for e in meta["keys"]]
        self._keys: dict[str, _PrivateKey] = {
            e.kid: self._load_private(e.kid) for e in self._entries
        }

    def __repr__(self) -> str:
        return f"DevIssuer(directory={str(self.directory)!r}, kid={self.current_kid!r})"

    # -- files

    @property
    def jwks_path(self) -> Path:
        """The public JWKS; point ``IdentitySettings.jwks_file`` here."""
        return self.directory / "jwks.json"

    @property
    def _meta_path(self) -> Path:
        return self.directory / "issuer.json"

    def _key_path(self, kid: str) -> Path:
        return self.directory / "keys" / f"{kid}.pem"

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self._meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DevIssuerError(
                f"cannot read {self._meta_path}; delete {self.directory} to start afresh"
            ) from exc
        if not isinstance(meta, dict) or {"issuer", "algorithm", "current", "keys"} - meta.keys():
            raise DevIssuerError(
                f"{self._meta_path} is incomplete; delete {self.directory} to start afresh"
            )
        return meta

    def _load_private(self, kid: str) -> _PrivateKey:
        path = self._key_path(kid)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise DevIssuerError(
                f"private key {path} is missing or unreadable; delete {self.directory} "
                "to start afresh"
            ) from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise DevIssuerError(f"{path} is not an Ed25519 or EC key")
        return key

    def _save(self) -> None:
        meta = {
            "issuer": self.issuer,
            "algorithm": self.algorithm,
            "current": self.current_kid,
            "keys": [
                {"kid": e.kid, "alg": e.alg, "created": e.created, "retire_at": e.retire_at}
                for e in self._entries
            ],
        }
        _write_atomic(self._meta_path, json.dumps(meta, indent=2).encode(), 0o600)
        _write_atomic(
            self.jwks_path, json.dumps(self.public_jwks(), indent=2).encode() + b"\n", 0o644
        )

    def public_jwks(self) -> dict[str, Any]:
        """The JWKS document: every key not yet past its grace period."""
        keys = []
        for entry in self._entries:
            jwk = _public_jwk(self._keys[entry.kid])
            jwk.update({"kid": entry.kid, "alg": entry.alg, "use": "sig"})
            keys.append(jwk)
        return {"keys": keys}

    # -- keys

    def _add_key(self) -> str:
        key = _generate(self.algorithm)
        kid = _thumbprint(_public_jwk(key))
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomic(self._key_path(kid), pem, 0o600)
        self._keys[kid] = key
        self._entries.append(_KeyEntry(kid=kid, alg=self.algorithm, created=self._clock()))
        return kid

    def _prune(self) -> bool:
        now = self._clock()
        gone = [e for e in self._entries if e.retire_at is not None and e.retire_at <= now]
        for entry in gone:
            self._entries.remove(entry)
            self._keys.pop(entry.kid, None)
            with contextlib.suppress(FileNotFoundError):
                self._key_path(entry.kid).unlink()
        return bool(gone)

    def rotate(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> str:
        """Sign with a fresh key from now on; the previous key stays in the JWKS
        for ``grace_seconds`` so tokens already issued keep validating. Returns
        the new kid."""
        with _locked(self.directory):
            self._reload()
            for entry in self._entries:
                if entry.kid == self.current_kid and entry.retire_at is None:
                    entry.retire_at = self._clock() + grace_seconds
            self.current_kid = self._add_key()
            self._prune()
            self._save()
        return self.current_kid

    # -- tokens

    def sign(self, claims: Mapping[str, Any], *, kid: str | None = None) -> str:
        """Sign ``claims`` exactly as given (no defaults added). Tests use it to
        build tokens with claims missing or odd."""
        kid = kid or self.current_kid
        key = self._keys[kid]
        return jwt.encode(
            dict(claims), key, algorithm=self.algorithm, headers={"kid": kid, "typ": "JWT"}
        )

    def mint(
        self,
        sub: str,
        groups: Sequence[str] = (),
        ttl: int = 900,
        act: str | Sequence[str] | Mapping[str, Any] | None = None,
        kind: str = "agent",
        audience: str | Sequence[str] = DEFAULT_AUDIENCE,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token for ``sub``, valid for ``ttl`` seconds from now.

        ``groups`` go into the ``groups`` claim, ``kind`` into ``kind``, ``act``
        into an RFC 8693 ``act`` claim (``"ci-bot<-alice"`` builds a chain).
        ``extra_claims`` are applied last: they override defaults, and a value of
        None removes that claim.
        """
        if not sub:
            raise ValueError("sub must not be empty")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if kind not in ("agent", "human"):
            raise ValueError("kind must be 'agent' or 'human'")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": audience if isinstance(audience, str) else list(audience),
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
            "groups": [g for g in groups if g],
            "kind": kind,
        }
        if act is not None:
            claims["act"] = _act_claim(act)
        for name, value in (extra_claims or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return self.sign(claims)

    def identity_settings(
        self, audience: str | list[str] = DEFAULT_AUDIENCE, **overrides: Any
    ) -> IdentitySettings:
        """Validator settings that accept this issuer's tokens."""
        from policyd.identity import IdentitySettings

        values: dict[str, Any] = {
            "issuer": self.issuer,
            "audience": audience,
            "jwks_file": self.jwks_path,
            "algorithms": [self.algorithm],
        }
        values.update(overrides)
        return IdentitySettings(**values)


def ensure_dev_keys(
    directory: Path = DEFAULT_KEYS_DIR,
    *,
    algorithm: Algorithm = "EdDSA",
    issuer: str = DEV_ISSUER,
    clock: Callable[[], float] = time.time,
) -> DevIssuer:
    """The development issuer of ``directory``, creating its key pair and JWKS
    when absent. Idempotent: an existing directory is reused (``algorithm`` and
    ``issuer`` then come from it); keys past their grace period are dropped."""
    if algorithm not in ("EdDSA", "ES256"):
        raise ValueError("algorithm must be 'EdDSA' or 'ES256'")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "keys").mkdir(mode=0o700, exist_ok=True)
    with _locked(directory):
        if not (directory / "issuer.json").exists():
            meta = {"issuer": issuer, "algorithm": algorithm, "current": "", "keys": []}
            _write_atomic(directory / "issuer.json", json.dumps(meta).encode(), 0o600)
            fresh = DevIssuer(directory, clock=clock)
            fresh.current_kid = fresh._add_key()
            fresh._save()
            return fresh
        existing = DevIssuer(directory, clock=clock)
        if existing._prune() or not existing.jwks_path.exists():
            existing._save()
        return existing
