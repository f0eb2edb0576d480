"""Token validation: what a client's token-as-password turns into, and every way
a bad token is refused with the reason the audit record will carry."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pgwarden.devissuer import DevIssuer, ensure_dev_keys
from policyd.identity import (
    IdentitySettings,
    JwksChange,
    RejectReason,
    TokenRejected,
    TokenValidator,
    ValidatedToken,
    render_actor_chain,
)

# --------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def assert_rejected(validator: TokenValidator, token: str, code: RejectReason) -> TokenRejected:
    """The token is refused with ``code``, and nothing of it leaks into the error."""
    with pytest.raises(TokenRejected) as info:
        validator.validate(token)
    exc = info.value
    assert exc.reason_code is code, f"expected {code}, got {exc.reason_code}: {exc.detail}"
    assert_no_token_text(token, str(exc), repr(exc), exc.detail)
    assert exc.client_message == "authentication failed"
    assert exc.sqlstate == "28P01"
    result = exc.auth_result()
    assert (result.ok, result.reason, result.sqlstate) == (False, code.value, "28P01")
    return exc


def assert_no_token_text(token: str, *texts: str) -> None:
    pieces = [p for p in (token.strip(), *token.split(".")) if len(p.strip()) >= 8]
    for text in texts:
        for piece in pieces:
            assert piece not in text, "token text leaked into an error message"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local HTTPS JWKS server must be reached directly, whatever the CI's proxy."""
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    return ensure_dev_keys(tmp_path / "identity")


@pytest.fixture
def validator(issuer: DevIssuer) -> TokenValidator:
    return TokenValidator(issuer.identity_settings())


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- accepted


def test_valid_token_gives_identity(issuer: DevIssuer, validator: TokenValidator) -> None:
    token = issuer.mint("ci-bot", ["analysts", "fraud"], ttl=600, act="alice", kind="human")
    identity = validator.validate(token)
    assert identity.subject == "ci-bot"
    assert identity.groups == ("analysts", "fraud")
    assert identity.issuer == issuer.issuer
    assert identity.kind == "human"
    assert identity.actor == "alice"
    assert identity.expires_at is not None
    assert abs(identity.expires_at - (now() + 600)) < 60


def test_defaults_kind_agent_no_actor_no_groups(
    issuer: DevIssuer, validator: TokenValidator
) -> None:
    token = issuer.mint("nightly", extra_claims={"kind": None, "groups": None})
    identity = validator.validate(token)
    assert (identity.kind, identity.actor, identity.groups) == ("agent", None, ())


def test_actor_chain_is_rendered_outermost_first(
    issuer: DevIssuer, validator: TokenValidator
) -> None:
    token = issuer.mint("payments-db", act="ci-bot<-alice")
    assert validator.validate(token).actor == "ci-bot<-alice"
    nested = {"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}
    assert render_actor_chain(nested) == "a<-b<-c"
    with pytest.raises(ValueError):
        render_actor_chain({"act": {"sub": "b"}})


def test_detailed_result_names_key_and_algorithm(
    issuer: DevIssuer, validator: TokenValidator
) -> None:
    token = issuer.mint("ci-bot")
    result = validator.validate_detailed(token)
    assert isinstance(result, ValidatedToken)
    assert result.kid == issuer.current_kid
    assert result.algorithm == "EdDSA"
    assert result.claims["jti"]


def test_es256_issuer(tmp_path: Path) -> None:
    es = ensure_dev_keys(tmp_path / "es", algorithm="ES256")
    v = TokenValidator(es.identity_settings())
    assert v.validate(es.mint("svc")).subject == "svc"


def test_leeway_accepts_just_expired(issuer: DevIssuer, validator: TokenValidator) -> None:
    t = now()
    token = issuer.mint("ci-bot", extra_claims={"iat": t - 900, "nbf": t - 900, "exp": t - 5})
    assert validator.validate(token).subject == "ci-bot"


def test_audience_list_and_token_audience_list(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.identity_settings(audience=["pgwarden", "other"]))
    assert v.validate(issuer.mint("a", audience="other")).subject == "a"
    v2 = TokenValidator(issuer.identity_settings())
    assert v2.validate(issuer.mint("b", audience=["account", "pgwarden"])).subject == "b"


# --------------------------------------------------------------------------- groups & kind


def test_keycloak_realm_roles(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.identity_settings(groups_claim="realm_access.roles"))
    token = issuer.mint(
        "service-account-ci",
        extra_claims={
            "groups": None,
            "realm_access": {"roles": ["offline_access", "pci-analysts"]},
            "resource_access": {"pgwarden": {"roles": ["reader"]}},
        },
    )
    assert v.validate(token).groups == ("offline_access", "pci-analysts")
    v2 = TokenValidator(issuer.identity_settings(groups_claim="resource_access.pgwarden.roles"))
    assert v2.validate(token).groups == ("reader",)


def test_groups_as_separated_string(issuer: DevIssuer, validator: TokenValidator) -> None:
    token = issuer.mint("a", extra_claims={"groups": "analysts fraud,ops, analysts"})
    assert validator.validate(token).groups == ("analysts", "fraud", "ops")


def test_namespaced_claim_with_dots_in_its_name(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.identity_settings(groups_claim="https://example.com/groups"))
    token = issuer.mint("a", extra_claims={"https://example.com/groups": ["dba"]})
    assert v.validate(token).groups == ("dba",)


def test_groups_required(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.identity_settings(groups_required=True))
    assert_rejected(v, issuer.mint("a", extra_claims={"groups": None}), RejectReason.MISSING_CLAIM)


def test_groups_of_wrong_type(issuer: DevIssuer, validator: TokenValidator) -> None:
    assert_rejected(
        validator, issuer.mint("a", extra_claims={"groups": [1, 2]}), RejectReason.MALFORMED
    )
    assert_rejected(
        validator, issuer.mint("a", extra_claims={"groups": {"x": 1}}), RejectReason.MALFORMED
    )


def test_kind_from_azp_mapping(issuer: DevIssuer) -> None:
    v = TokenValidator(
        issuer.identity_settings(
            kind_claim="azp", kind_values={"ci-pipeline": "agent", "console": "human"}
        )
    )
    assert v.validate(issuer.mint("a", extra_claims={"azp": "console"})).kind == "human"
    assert v.validate(issuer.mint("a", extra_claims={"azp": "ci-pipeline"})).kind == "agent"
    unknown = issuer.mint("a", extra_claims={"azp": "unknown"})
    assert_rejected(v, unknown, RejectReason.MISSING_CLAIM)


def test_unknown_kind_value_refused(issuer: DevIssuer, validator: TokenValidator) -> None:
    assert_rejected(
        validator, issuer.mint("a", extra_claims={"kind": "root"}), RejectReason.MISSING_CLAIM
    )


def test_subject_with_control_characters_refused(
    issuer: DevIssuer, validator: TokenValidator
) -> None:
    assert_rejected(validator, issuer.mint("bot\nforged-line"), RejectReason.MALFORMED)


# --------------------------------------------------------------------------- refused


def test_expired(issuer: DevIssuer, validator: TokenValidator) -> None:
    t = now()
    token = issuer.mint("a", extra_claims={"iat": t - 3600, "nbf": t - 3600, "exp": t - 120})
    assert_rejected(validator, token, RejectReason.EXPIRED)


def test_not_yet_valid(issuer: DevIssuer, validator: TokenValidator) -> None:
    t = now()
    token = issuer.mint("a", extra_claims={"nbf": t + 600, "exp": t + 1200})
    exc = assert_rejected(validator, token, RejectReason.NOT_YET_VALID)
    assert "nbf" in exc.detail
    token = issuer.mint("a", extra_claims={"iat": t + 600, "nbf": None, "exp": t + 1200})
    assert_rejected(validator, token, RejectReason.NOT_YET_VALID)


def test_wrong_issuer(issuer: DevIssuer, validator: TokenValidator) -> None:
    token = issuer.mint("a", extra_claims={"iss": "https://evil.example"})
    assert_rejected(validator, token, RejectReason.WRONG_ISSUER)


def test_wrong_audience(issuer: DevIssuer, validator: TokenValidator) -> None:
    assert_rejected(validator, issuer.mint("a", audience="grafana"), RejectReason.WRONG_AUDIENCE)


def test_tampered_payload(issuer: DevIssuer, validator: TokenValidator) -> None:
    header, payload, sig = issuer.mint("a", ["readers"]).split(".")
    claims = json.loads(b64url_decode(payload))
    claims["groups"] = ["dba"]
    forged = ".".join([header, b64url(json.dumps(claims).encode()), sig])
    assert_rejected(validator, forged, RejectReason.BAD_SIGNATURE)


def test_tampered_signature(issuer: DevIssuer, validator: TokenValidator) -> None:
    header, payload, sig = issuer.mint("a").split(".")
    raw = bytearray(b64url_decode(sig))
    raw[10] ^= 0x01
    forged = f"{header}.{payload}.{b64url(bytes(raw))}"
    assert_rejected(validator, forged, RejectReason.BAD_SIGNATURE)
    assert_rejected(validator, f"{header}.{payload}.", RejectReason.BAD_SIGNATURE)


def _claims(issuer: DevIssuer, **extra: Any) -> dict[str, Any]:
    t = now()
    claims = {"iss": issuer.issuer, "sub": "a", "aud": "pgwarden", "iat": t, "exp": t + 600}
    claims.update(extra)
    return claims


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_unsigned_alg_none(issuer: DevIssuer, validator: TokenValidator, alg: str) -> None:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": issuer.current_kid}).encode())
    payload = b64url(json.dumps(_claims(issuer)).encode())
    assert_rejected(validator, f"{header}.{payload}.", RejectReason.UNSIGNED)


def test_hs256_with_public_key_as_secret(issuer: DevIssuer, validator: TokenValidator) -> None:
    """Key confusion: an attacker signs with HMAC using the published public key."""
    jwk = next(k for k in issuer.public_jwks()["keys"] if k["kid"] == issuer.current_kid)
    public_pem = (
        jwt.PyJWK(jwk).key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for secret in (public_pem, json.dumps(jwk).encode(), b64url_decode(jwk["x"])):
        header = b64url(json.dumps({"alg": "HS256", "kid": issuer.current_kid}).encode())
        payload = b64url(json.dumps(_claims(issuer, groups=["dba"])).encode())
        mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        assert_rejected(validator, f"{header}.{payload}.{b64url(mac)}", RejectReason.DISALLOWED_ALG)


def test_alg_that_does_not_fit_the_key_type(issuer: DevIssuer) -> None:
    """RS256 allowed, but the kid names an Ed25519 key: refused before verifying."""
    v = TokenValidator(issuer.identity_settings(algorithms=["RS256", "EdDSA"]))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(
        _claims(issuer), rsa_key, algorithm="RS256", headers={"kid": issuer.current_kid}
    )
    exc = assert_rejected(v, token, RejectReason.DISALLOWED_ALG)
    assert "OKP" in exc.detail


def test_alg_outside_allow_list(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.identity_settings(algorithms=["ES256"]))
    assert_rejected(v, issuer.mint("a"), RejectReason.DISALLOWED_ALG)


def test_unknown_kid(issuer: DevIssuer, validator: TokenValidator, tmp_path: Path) -> None:
    stranger = ensure_dev_keys(tmp_path / "stranger")  # same issuer name, other key
    assert_rejected(validator, stranger.mint("a"), RejectReason.UNKNOWN_KEY)


def test_missing_kid_is_fine_only_with_a_single_key(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.identity_settings(), clock=FakeClock())
    token = jwt.encode(_claims(issuer), issuer._keys[issuer.current_kid], algorithm="EdDSA")
    assert v.validate(token).subject == "a"
    issuer.rotate()
    v2 = TokenValidator(issuer.identity_settings(), clock=FakeClock())
    assert_rejected(v2, token, RejectReason.UNKNOWN_KEY)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "iss", "aud"])
def test_missing_required_claim(
    issuer: DevIssuer, validator: TokenValidator, claim: str
) -> None:
    claims = _claims(issuer)
    del claims[claim]
    assert_rejected(validator, issuer.sign(claims), RejectReason.MISSING_CLAIM)


@pytest.mark.parametrize(
    "token",
    ["", "   ", "not-a-token", "a.b", "a.b.c", "bm90anNvbg.bm90anNvbg.c2ln", "x" * 20000],
)
def test_malformed(validator: TokenValidator, token: str) -> None:
    assert_rejected(validator, token, RejectReason.MALFORMED)


def test_malformed_payload_json_is_not_a_signature_problem(
    issuer: DevIssuer, validator: TokenValidator
) -> None:
    # Correctly signed, but the payload is not JSON.
    key = issuer._keys[issuer.current_kid]
    header = b64url(json.dumps({"alg": "EdDSA", "kid": issuer.current_kid}).encode())
    payload = b64url(b"[not json")
    sig = key.sign(f"{header}.{payload}".encode())  # type: ignore[call-arg]
    assert_rejected(validator, f"{header}.{payload}.{b64url(sig)}", RejectReason.MALFORMED)


# --------------------------------------------------------------------------- rotation


def test_rotation_followed_without_restart(issuer: DevIssuer) -> None:
    changes: list[JwksChange] = []
    v = TokenValidator(issuer.identity_settings(), on_jwks_change=changes.append)
    old_token = issuer.mint("a")
    assert v.validate(old_token).subject == "a"
    old_kid = issuer.current_kid
    new_kid = issuer.rotate(grace_seconds=3600)
    assert new_kid != old_kid
    assert v.validate(issuer.mint("b")).subject == "b"
    assert v.validate(old_token).subject == "a"  # old key kept for the grace period
    assert changes[0].added == (old_kid,)
    assert changes[-1].added == (new_kid,) and changes[-1].removed == ()


def test_retired_key_dropped_after_grace(tmp_path: Path) -> None:
    clock = FakeClock()
    clock.now = time.time()
    iss = ensure_dev_keys(tmp_path / "id", clock=clock)
    old_token = iss.mint("a")
    iss.rotate(grace_seconds=60)
    clock.now += 61
    iss = ensure_dev_keys(tmp_path / "id", clock=clock)  # prunes
    v = TokenValidator(iss.identity_settings())
    assert [k["kid"] for k in iss.public_jwks()["keys"]] == [iss.current_kid]
    assert_rejected(v, old_token, RejectReason.UNKNOWN_KEY)


# --------------------------------------------------------------------------- settings


def test_settings_refuse_dangerous_choices(tmp_path: Path) -> None:
    base: dict[str, Any] = {"issuer": "https://i", "audience": "pgwarden"}
    jwks = tmp_path / "jwks.json"
    for algs in (["none"], ["HS256"], ["RS256", "HS512"], [], ["XYZ1"]):
        with pytest.raises(ValidationError):
            IdentitySettings(**base, jwks_file=jwks, algorithms=algs)
    with pytest.raises(ValidationError):
        IdentitySettings(**base, jwks_url="http://idp.example/jwks")
    with pytest.raises(ValidationError):
        IdentitySettings(**base, jwks_file=jwks, jwks_url="https://idp.example/jwks")
    with pytest.raises(ValidationError):
        IdentitySettings(**base)
    with pytest.raises(ValidationError):
        IdentitySettings(**base, jwks_file=jwks, required_claims=["sub"])
    s = IdentitySettings(**base, jwks_file=jwks)
    assert s.algorithms == ["RS256", "ES256", "EdDSA"]
    assert s.leeway_seconds == 30


def test_missing_jwks_file_is_jwks_unavailable_until_it_appears(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    path = tmp_path / "later.json"
    v = TokenValidator(issuer.identity_settings(jwks_file=path), clock=FakeClock())
    assert_rejected(v, issuer.mint("a"), RejectReason.JWKS_UNAVAILABLE)
    assert_rejected(v, issuer.mint("a"), RejectReason.JWKS_UNAVAILABLE)
    assert v.jwks.fetch_count == 1  # not re-read on every attempt
    path.write_bytes(issuer.jwks_path.read_bytes())
    assert v.validate(issuer.mint("a")).subject == "a"  # no restart, no waiting


def test_broken_jwks_file_keeps_the_keys_we_had(tmp_path: Path, issuer: DevIssuer) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(issuer.jwks_path.read_bytes())
    v = TokenValidator(issuer.identity_settings(jwks_file=path), clock=FakeClock())
    assert v.validate(issuer.mint("a")).subject == "a"
    path.write_text("{ half written")
    assert v.validate(issuer.mint("b")).subject == "b"
    assert v.validate(issuer.mint("c")).subject == "c"
    assert v.jwks.fetch_count == 2


def test_validator_repr_has_no_secrets(validator: TokenValidator) -> None:
    assert "TokenValidator(" in repr(validator)


# --------------------------------------------------------------------------- HTTPS JWKS


class _Tls:
    def __init__(self, tmp: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgwarden test CA")])
        start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        end = start + dt.timedelta(hours=2)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = tmp / "ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file = tmp / "server.pem"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = tmp / "server.key"
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


class _JwksServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    jwks_path: Path
    hits: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _JwksServer

    def do_GET(self) -> None:
        self.server.hits += 1
        if self.path != "/jwks.json":
            self.send_response(404)
            self.end_headers()
            return
        body = self.server.jwks_path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def https_jwks(tmp_path: Path, issuer: DevIssuer) -> Iterator[tuple[_JwksServer, str, Path]]:
    tls = _Tls(tmp_path)
    server = _JwksServer(("127.0.0.1", 0), _Handler)
    server.jwks_path = issuer.jwks_path
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/jwks.json"
    try:
        yield server, url, tls.ca_file
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_jwks_over_https(
    issuer: DevIssuer, https_jwks: tuple[_JwksServer, str, Path]
) -> None:
    server, url, ca = https_jwks
    settings = issuer.identity_settings(jwks_file=None, jwks_url=url, jwks_ca_file=ca)
    v = TokenValidator(settings)
    identity = await v.validate_async(issuer.mint("ci-bot", ["analysts"]))
    assert identity.groups == ("analysts",)
    await v.validate_async(issuer.mint("again"))
    assert server.hits == 1  # cached


def test_https_rotation_refresh_is_rate_limited(
    issuer: DevIssuer, https_jwks: tuple[_JwksServer, str, Path], tmp_path: Path
) -> None:
    server, url, ca = https_jwks
    clock = FakeClock()
    settings = issuer.identity_settings(
        jwks_file=None, jwks_url=url, jwks_ca_file=ca, jwks_refresh_interval=30
    )
    v = TokenValidator(settings, clock=clock)
    assert v.validate(issuer.mint("a")).subject == "a"
    assert server.hits == 1

    # Random kids from an attacker: at most one refetch per interval.
    stranger = ensure_dev_keys(tmp_path / "stranger")
    clock.now += 31
    assert_rejected(v, stranger.mint("x"), RejectReason.UNKNOWN_KEY)
    assert_rejected(v, stranger.mint("y"), RejectReason.UNKNOWN_KEY)
    assert_rejected(v, stranger.mint("z"), RejectReason.UNKNOWN_KEY)
    assert server.hits == 2

    # The provider rotates; once the interval has passed the new kid is fetched.
    issuer.rotate()
    new_token = issuer.mint("rotated")
    assert_rejected(v, new_token, RejectReason.UNKNOWN_KEY)  # still rate limited
    clock.now += 31
    assert v.validate(new_token).subject == "rotated"
    assert server.hits == 3


def test_https_untrusted_certificate_is_unavailable(
    issuer: DevIssuer, https_jwks: tuple[_JwksServer, str, Path]
) -> None:
    _, url, _ = https_jwks
    v = TokenValidator(issuer.identity_settings(jwks_file=None, jwks_url=url))
    exc = assert_rejected(v, issuer.mint("a"), RejectReason.JWKS_UNAVAILABLE)
    assert "CERTIFICATE" in exc.detail.upper()


def test_https_not_found_is_unavailable(
    issuer: DevIssuer, https_jwks: tuple[_JwksServer, str, Path]
) -> None:
    _, url, ca = https_jwks
    settings = issuer.identity_settings(
        jwks_file=None, jwks_url=url.replace("jwks.json", "nope"), jwks_ca_file=ca
    )
    exc = assert_rejected(TokenValidator(settings), issuer.mint("a"), RejectReason.JWKS_UNAVAILABLE)
    assert "404" in exc.detail


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_jwks_endpoint_down(issuer: DevIssuer, tmp_path: Path) -> None:
    clock = FakeClock()
    url = f"https://127.0.0.1:{_closed_port()}/jwks.json"
    v = TokenValidator(
        issuer.identity_settings(jwks_file=None, jwks_url=url, jwks_timeout=2), clock=clock
    )
    token = issuer.mint("a")
    with pytest.raises(TokenRejected) as info:
        await v.validate_async(token)
    assert info.value.reason_code is RejectReason.JWKS_UNAVAILABLE
    assert_no_token_text(token, str(info.value), repr(info.value))
    # Within the retry interval we do not hammer the endpoint again.
    assert_rejected(v, token, RejectReason.JWKS_UNAVAILABLE)
    assert v.jwks.fetch_count == 1


def test_cached_keys_survive_an_outage(
    issuer: DevIssuer, https_jwks: tuple[_JwksServer, str, Path]
) -> None:
    server, url, ca = https_jwks
    clock = FakeClock()
    settings = issuer.identity_settings(
        jwks_file=None, jwks_url=url, jwks_ca_file=ca, jwks_max_age=60
    )
    v = TokenValidator(settings, clock=clock)
    assert v.validate(issuer.mint("a")).subject == "a"
    server.jwks_path = Path("/nonexistent/jwks.json")  # handler now fails -> no answer
    clock.now += 120
    assert v.validate(issuer.mint("b")).subject == "b"


def test_attacker_chosen_kid_is_bounded_and_escaped(
    issuer: DevIssuer, validator: TokenValidator
) -> None:
    kid = "x\n" + "k" * 5000
    token = jwt.encode(_claims(issuer), issuer._keys[issuer.current_kid], algorithm="EdDSA",
                       headers={"kid": kid})
    exc = assert_rejected(validator, token, RejectReason.UNKNOWN_KEY)
    assert "\n" not in exc.detail
    assert len(exc.detail) < 300


# --------------------------------------------------------------------------- properties

_JWS_SHAPED = r"[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,40}"

_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(st.text(max_size=300) | st.from_regex(_JWS_SHAPED, fullmatch=True))
def test_arbitrary_input_only_ever_raises_token_rejected(
    validator: TokenValidator, text: str
) -> None:
    try:
        validator.validate(text)
    except TokenRejected as exc:
        assert_no_token_text(text, str(exc), repr(exc))
    else:  # pragma: no cover - a random string forging an EdDSA signature
        raise AssertionError("random input accepted")


@_FUZZ
@given(data=st.data())
def test_any_single_character_change_is_refused_or_harmless(
    issuer: DevIssuer, validator: TokenValidator, data: st.DataObject
) -> None:
    token = issuer.mint("ci-bot", ["analysts"], act="alice")
    original = validator.validate_detailed(token).claims
    pos = data.draw(st.integers(0, len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    char = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[pos]))
    mutated = token[:pos] + char + token[pos + 1 :]
    try:
        result = validator.validate_detailed(mutated)
    except TokenRejected as exc:
        assert_no_token_text(mutated, str(exc), repr(exc))
    else:
        # Only base64 padding bits of the signature can change without effect.
        assert result.claims == original
        assert pos > token.rindex(".")
