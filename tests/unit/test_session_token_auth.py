"""Token-as-password and the gateway's own upstream login, bytes only."""

from __future__ import annotations

import hashlib
import json
import struct

from scramp import ScramMechanism

from tap import protocol as pg
from tap.actions import Close, Event, NeedAuth, SendDownstream, SendUpstream
from tap.hooks import AuthResult, Identity, UpstreamLogin
from tap.session import Session, SessionConfig

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJmcmF1ZC1ib3QifQ.c2lnbmF0dXJlLWJ5dGVz"
SECRET = "gateway-only-secret-9f2c"


def up(acts: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(a.data for a in acts if isinstance(a, SendUpstream))


def down(acts: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(a.data for a in acts if isinstance(a, SendDownstream))


def all_events(acts: list) -> str:  # type: ignore[type-arg]
    return json.dumps([a.record for a in acts if isinstance(a, Event)])


def token_session() -> tuple[Session, NeedAuth]:
    s = Session(SessionConfig(session_id="t", auth_mode="token", allow_plaintext_tokens=True))
    acts = s.on_read(pg.encode_startup({"user": "fraud-bot", "database": "shop",
                                        "options": "-c role=postgres",
                                        "application_name": "nightly"}))
    assert up(acts) == b""
    assert down(acts) == pg.AUTH_CLEARTEXT
    acts = s.on_read(pg.Message(b"p", TOKEN.encode() + b"\0").encode())
    need = next(a for a in acts if isinstance(a, NeedAuth))
    assert need.token == TOKEN and TOKEN not in repr(need)
    assert up(acts) == b""
    return s, need


def test_tokens_need_tls_unless_allowed() -> None:
    s = Session(SessionConfig(session_id="t", auth_mode="token"))
    acts = s.on_read(pg.encode_startup({"user": "x"}))
    fields = pg.decode_fields(next(pg.iter_frames(down(acts))).body)
    assert fields["C"] == "28000" and "TLS" in fields["M"]
    assert any(isinstance(a, Close) for a in acts)


def test_bad_token_gets_a_generic_28P01_and_the_reason_is_recorded() -> None:
    s, need = token_session()
    acts = s.on_auth(need.ticket, AuthResult(ok=False, reason="expired: exp in the past"))
    fields = pg.decode_fields(next(pg.iter_frames(down(acts))).body)
    assert (fields["S"], fields["C"]) == ("FATAL", "28P01")
    assert "expired" not in fields["M"]
    assert "expired: exp in the past" in all_events(acts)
    assert TOKEN not in all_events(acts) and TOKEN not in fields["M"]
    assert any(isinstance(a, Close) for a in acts)


def test_scram_login_with_gateway_credentials() -> None:
    s, need = token_session()
    login = UpstreamLogin(role="fraud_reader", method="scram-sha-256", password=SECRET)
    ident = Identity(subject="fraud-bot", groups=("fraud-readers",), issuer="dev")
    acts = s.on_auth(need.ticket, AuthResult(ok=True, identity=ident, login=login))
    startup = pg.StartupReader().feed(up(acts))
    assert startup is not None
    params = pg.startup_params(startup.body)
    assert params == {"user": "fraud_reader", "database": "shop", "application_name": "nightly"}
    assert SECRET not in all_events(acts) and SECRET not in repr(login)

    mech = ScramMechanism()
    salt, stored, server_key, iters = mech.make_auth_info(SECRET)
    server = mech.make_server(lambda _u: (salt, stored, server_key, iters))
    acts = s.on_write(pg.encode_sasl_mechanisms(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    assert down(acts) == b""  # the client never sees the upstream exchange
    first = next(pg.iter_frames(up(acts))).body
    assert first.startswith(b"SCRAM-SHA-256\0")
    server.set_client_first(first[len(b"SCRAM-SHA-256\0") + 4:].decode())
    acts = s.on_write(pg.auth_request(11, server.get_server_first().encode()))
    server.set_client_final(next(pg.iter_frames(up(acts))).body.decode())
    acts = s.on_write(pg.auth_request(12, server.get_server_final().encode()))
    assert up(acts) == b"" and down(acts) == b""
    acts = s.on_write(pg.AUTH_OK + pg.encode_backend_key(9, b"abcd") + pg.ready_for_query(b"I"))
    types = [m.type for m in pg.iter_frames(down(acts))]
    assert types == [b"R", b"K", b"Z"]
    start = [a.record for a in acts if isinstance(a, Event) and a.record["type"] == "session_start"]
    assert start[0]["subject"] == "fraud-bot" and start[0]["upstream_role"] == "fraud_reader"
    assert s.info().upstream_role == "fraud_reader"


def test_md5_login() -> None:
    s, need = token_session()
    login = UpstreamLogin(role="r", method="md5", password=SECRET)
    s.on_auth(need.ticket, AuthResult(ok=True, login=login))
    acts = s.on_write(pg.auth_request(5, b"salt"))
    inner = hashlib.md5((SECRET + "r").encode()).hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + b"salt").hexdigest().encode() + b"\0"
    assert next(pg.iter_frames(up(acts))).body == expected


def test_upstream_refusal_is_reported_without_secrets() -> None:
    s, need = token_session()
    s.on_auth(need.ticket, AuthResult(ok=True, login=UpstreamLogin(role="r", password=SECRET)))
    acts = s.on_write(pg.error_response("28P01", 'password authentication failed for user "r"',
                                        severity="FATAL"))
    fields = pg.decode_fields(next(pg.iter_frames(down(acts))).body)
    assert fields["C"] == "28000" and SECRET not in fields["M"]
    assert "upstream_login_failed" in all_events(acts)


def test_client_cannot_talk_while_the_token_is_checked() -> None:
    s, _ = token_session()
    acts = s.on_read(pg.simple_query("select 1"))
    assert up(acts) == b""
    assert pg.decode_fields(next(pg.iter_frames(down(acts))).body)["C"] == "08P01"


def test_unsupported_upstream_method_fails_closed() -> None:
    s, need = token_session()
    s.on_auth(need.ticket, AuthResult(ok=True, login=UpstreamLogin(role="r", password=SECRET)))
    acts = s.on_write(pg.auth_request(7))  # GSSAPI
    assert pg.decode_fields(next(pg.iter_frames(down(acts))).body)["C"] == "28000"
    assert struct.pack("!i", 7) not in up(acts)
