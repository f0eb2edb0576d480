"""The sans-IO session filter, driven with byte strings only."""

from __future__ import annotations

import datetime as dt
import ssl
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tap import protocol as pg
from tap.actions import Close, Event, NeedDecision, SendDownstream, SendUpstream
from tap.cancel import CancelRegistry
from tap.hooks import ALLOW_ALL, Decision, StatementRequest, Verdict
from tap.session import Hooks, Session, SessionConfig
from tap.tls import TLSEndpoint, server_context


def msg(t: bytes, body: bytes = b"") -> bytes:
    return pg.Message(t, body).encode()


def up(actions: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(a.data for a in actions if isinstance(a, SendUpstream))


def down(actions: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(a.data for a in actions if isinstance(a, SendDownstream))


def events(actions: list, kind: str) -> list[dict]:  # type: ignore[type-arg]
    return [a.record for a in actions if isinstance(a, Event) and a.record["type"] == kind]


SERVER_HELLO = (pg.AUTH_OK + pg.parameter_status("server_version", "15.18")
                + pg.encode_backend_key(4242, b"\x01\x02\x03\x04") + pg.ready_for_query(b"I"))


def deny_drop(req: StatementRequest) -> Decision | None:
    if "drop" in req.sql.lower():
        return Decision(verdict=Verdict.DENY, reasons=("DROP is always blocked",),
                        decision_id="d-1", policy_revision="rev-1")
    return ALLOW_ALL


def answer_refused_bind(s: Session, refused: list[pg.Message]) -> list[pg.Message]:
    """A refused Bind reached the server as a Parse of a marker (then the
    Execute and Sync behind it); answer it as PostgreSQL does and return
    what the client gets."""
    assert [m.type for m in refused] == [b"P", b"E", b"S"]
    marker = pg.decode_parse(refused[0].body).query
    assert marker.startswith("pgwarden_refused_")
    return list(pg.iter_frames(down(s.on_write(
        pg.error_response("42601", f'syntax error at or near "{marker}"')
        + pg.ready_for_query(b"I")))))


def ready_session(hooks: Hooks | None = None, registry: CancelRegistry | None = None,
                  version: int = pg.PROTOCOL_3_0) -> tuple[Session, list]:  # type: ignore[type-arg]
    s = Session(SessionConfig(session_id="s1", client_addr="127.0.0.1:1"), hooks, registry)
    acts = s.on_read(pg.encode_startup({"user": "app", "database": "shop"}, version))
    assert up(acts).startswith(struct.pack("!i", len(up(acts))))
    acts = s.on_write(SERVER_HELLO)
    return s, acts


def test_startup_passthrough_and_cancel_key_rewritten() -> None:
    registry = CancelRegistry()
    _, acts = ready_session(registry=registry)
    out = list(pg.iter_frames(down(acts)))
    assert [m.type for m in out] == [b"R", b"S", b"K", b"Z"]
    gw_pid, gw_key = pg.decode_backend_key(out[2].body)
    assert (gw_pid, gw_key) != (4242, b"\x01\x02\x03\x04")
    assert registry.lookup(gw_pid, gw_key) == (4242, b"\x01\x02\x03\x04")
    assert events(acts, "session_start")[0]["database"] == "shop"


def test_cancel_request_is_rewritten_to_the_server_key() -> None:
    registry = CancelRegistry()
    _, acts = ready_session(registry=registry)
    out = list(pg.iter_frames(down(acts)))
    gw_pid, gw_key = pg.decode_backend_key(out[2].body)
    c = Session(SessionConfig(session_id="c"), None, registry)
    acts = c.on_read(pg.encode_cancel(gw_pid, gw_key))
    assert up(acts) == pg.encode_cancel(4242, b"\x01\x02\x03\x04")
    assert not any(isinstance(a, Close) for a in acts)  # wait for the server to close
    assert any(isinstance(a, Close) for a in c.on_upstream_closed())


def test_unknown_cancel_key_cancels_nothing() -> None:
    c = Session(SessionConfig(session_id="c"), None, CancelRegistry())
    acts = c.on_read(pg.encode_cancel(4242, b"\x01\x02\x03\x04"))
    assert up(acts) == b""
    assert any(isinstance(a, Close) for a in acts)


def test_protocol_32_negotiated_down_keeps_a_4_byte_key() -> None:
    s = Session(SessionConfig(session_id="s"), None, CancelRegistry())
    s.on_read(pg.encode_startup({"user": "app"}, pg.PROTOCOL_3_2))
    nego = msg(b"v", struct.pack("!ii", 0, 0))
    acts = s.on_write(pg.AUTH_OK + nego + pg.encode_backend_key(7, b"abcd") + pg.ready_for_query(b"I"))
    key = next(m for m in pg.iter_frames(down(acts)) if m.type == b"K")
    assert len(pg.decode_backend_key(key.body)[1]) == 4


def test_protocol_32_gets_a_long_gateway_key() -> None:
    s = Session(SessionConfig(session_id="s"), None, CancelRegistry())
    s.on_read(pg.encode_startup({"user": "app"}, pg.PROTOCOL_3_2))
    acts = s.on_write(pg.AUTH_OK + pg.encode_backend_key(7, b"k" * 32) + pg.ready_for_query(b"I"))
    key = next(m for m in pg.iter_frames(down(acts)) if m.type == b"K")
    assert len(pg.decode_backend_key(key.body)[1]) == 32


def test_gssenc_and_ssl_refused_without_tls() -> None:
    s = Session(SessionConfig(session_id="s"))
    assert down(s.on_read(pg.StartupPacket(pg.GSSENC_REQUEST, b"").encode())) == b"N"
    assert down(s.on_read(pg.StartupPacket(pg.SSL_REQUEST, b"").encode())) == b"N"
    assert up(s.on_read(pg.encode_startup({"user": "app"}))) != b""


def test_bytes_after_sslrequest_are_refused() -> None:
    # The class of bug behind CVE-2021-23214: plaintext smuggled behind SSLRequest.
    s = Session(SessionConfig(session_id="s"))
    acts = s.on_read(pg.StartupPacket(pg.SSL_REQUEST, b"").encode() + b"Q\0\0\0\x05x")
    fields = pg.decode_fields(next(pg.iter_frames(down(acts))).body)
    assert fields["C"] == "08P01" and fields["S"] == "FATAL"
    assert any(isinstance(a, Close) for a in acts)


def test_simple_query_passthrough_counts_rows() -> None:
    s, _ = ready_session()
    acts = s.on_read(pg.simple_query("select 1"))
    assert up(acts) == pg.simple_query("select 1")
    assert events(acts, "statement")[0]["verdict"] == "allow"
    rd = msg(b"T", b"\x00\x01a\0" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))
    reply = rd + pg.encode_data_row([b"1"]) + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I")
    assert down(s.on_write(reply)) == reply
    assert s.transaction_status == "I"


def test_refused_query_never_reaches_the_server() -> None:
    s, _ = ready_session(Hooks(decide_cached=deny_drop))
    acts = s.on_read(pg.simple_query("select 1; DROP DATABASE shop"))
    sent = up(acts)
    assert b"DROP" not in sent.upper()
    marker = pg.query_text(next(pg.iter_frames(sent)).body)
    assert marker.startswith("pgwarden_refused_")
    server_err = pg.error_response("42601", f'syntax error at or near "{marker}"')
    out = list(pg.iter_frames(down(s.on_write(server_err + pg.ready_for_query(b"I")))))
    fields = pg.decode_fields(out[0].body)
    assert fields["C"] == "42501"
    assert "DROP is always blocked" in fields["M"]
    assert "d-1" in fields["D"]
    assert out[1].type == b"Z"


def test_refusal_inside_a_transaction_block_fails_the_block_on_both_sides() -> None:
    s, _ = ready_session(Hooks(decide_cached=deny_drop))
    s.on_read(pg.simple_query("begin"))
    s.on_write(msg(b"C", b"BEGIN\0") + pg.ready_for_query(b"T"))
    marker = pg.query_text(next(pg.iter_frames(up(s.on_read(pg.simple_query("drop table t"))))).body)
    acts = s.on_write(pg.error_response("42601", f"at or near \"{marker}\"") + pg.ready_for_query(b"E"))
    out = list(pg.iter_frames(down(acts)))
    assert out[-1].body == b"E"  # the server's own failed-block status reaches the client
    assert s.transaction_status == "E"


def test_pipelined_extended_batch_skips_after_refusal_like_postgres() -> None:
    s, _ = ready_session(Hooks(decide_cached=deny_drop))
    batch = (pg.parse_message("", "select 1") + msg(b"B", b"\0\0\0\0\0\0\0\0")
             + msg(b"E", b"\0\0\0\0\0") + pg.parse_message("", "drop table payments")
             + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
    sent = list(pg.iter_frames(up(s.on_read(batch))))
    assert [m.type for m in sent] == [b"P", b"B", b"E", b"P", b"B", b"E", b"S"]
    marker = pg.decode_parse(sent[3].body).query
    assert marker.startswith("pgwarden_refused_") and b"payments" not in sent[3].body
    reply = (msg(b"1") + msg(b"2") + pg.encode_data_row([b"1"]) + msg(b"C", b"SELECT 1\0")
             + pg.error_response("42601", f'syntax error at or near "{marker}"')
             + pg.ready_for_query(b"I"))
    out = list(pg.iter_frames(down(s.on_write(reply))))
    assert [m.type for m in out] == [b"1", b"2", b"D", b"C", b"E", b"Z"]
    assert pg.decode_fields(out[4].body)["C"] == "42501"


def test_a_pipelined_batch_goes_upstream_as_one_write_after_its_records() -> None:
    # Bind/Describe/Execute/Sync of one chunk: one SendUpstream (one syscall,
    # one TLS record), and the statement's audit record comes before it.
    s, _ = ready_session()
    s.on_read(pg.parse_message("q", "select 1") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    batch = (msg(b"B", b"\0q\0\0\0\0\0\0\0") + msg(b"D", b"P\0")
             + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
    acts = s.on_read(batch)
    sends = [i for i, a in enumerate(acts) if isinstance(a, SendUpstream)]
    assert len(sends) == 1 and acts[sends[0]].data == batch
    assert all(i < sends[0] for i, a in enumerate(acts) if isinstance(a, Event))


def test_messages_before_a_malformed_one_still_go_before_the_session_ends() -> None:
    s, _ = ready_session()
    # (A frame with a broken length fails the whole chunk before any message
    # is handled; an unknown message type fails when it is reached.)
    acts = s.on_read(pg.simple_query("select 1") + msg(b"!", b"x"))
    kinds = [type(a) for a in acts]
    assert up(acts) == pg.simple_query("select 1")
    assert kinds.index(SendUpstream) < kinds.index(Close)
    assert events(acts, "protocol_error")


def test_messages_before_one_awaiting_a_decision_are_sent_first() -> None:
    s, _ = ready_session(Hooks(decide_cached=lambda r: ALLOW_ALL if r.sql == "select 1" else None))
    acts = s.on_read(pg.simple_query("select 1") + pg.simple_query("select 2"))
    kinds = [type(a) for a in acts]
    assert up(acts) == pg.simple_query("select 1")
    assert kinds.index(SendUpstream) < kinds.index(NeedDecision)


def test_decision_from_the_service_holds_later_messages_in_order() -> None:
    s, _ = ready_session(Hooks(decide_cached=lambda r: None))
    acts = s.on_read(pg.simple_query("select 1") + pg.simple_query("select 2"))
    needs = [a for a in acts if isinstance(a, NeedDecision)]
    assert len(needs) == 1 and up(acts) == b""
    acts = s.on_decision(needs[0].ticket, ALLOW_ALL)
    assert up(acts) == pg.simple_query("select 1")
    second = [a for a in acts if isinstance(a, NeedDecision)]
    assert second and second[0].request.sql == "select 2"
    assert up(s.on_decision(second[0].ticket, ALLOW_ALL)) == pg.simple_query("select 2")


def test_scram_plus_is_not_offered_through_the_gateway() -> None:
    s = Session(SessionConfig(session_id="s"))
    s.on_read(pg.encode_startup({"user": "app"}))
    acts = s.on_write(pg.encode_sasl_mechanisms(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    m = next(pg.iter_frames(down(acts)))
    assert pg.sasl_mechanisms(m.body) == ["SCRAM-SHA-256"]


def test_malformed_message_ends_only_this_session_with_08P01() -> None:
    s, _ = ready_session()
    acts = s.on_read(b"Q\x00\x00\x00\x02")
    fields = pg.decode_fields(next(pg.iter_frames(down(acts))).body)
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert any(isinstance(a, Close) for a in acts)
    assert events(acts, "protocol_error")


def test_unknown_frontend_message_type_is_refused() -> None:
    s, _ = ready_session()
    acts = s.on_read(msg(b"!", b"x"))
    assert pg.decode_fields(next(pg.iter_frames(down(acts))).body)["C"] == "08P01"


def test_replication_connections_are_refused() -> None:
    s = Session(SessionConfig(session_id="s"))
    acts = s.on_read(pg.encode_startup({"user": "app", "replication": "database"}))
    assert up(acts) == b""
    assert pg.decode_fields(next(pg.iter_frames(down(acts))).body)["C"] == "42501"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    c, k = tmp / "c.pem", tmp / "k.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def test_client_tls_is_terminated_in_memory(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    s = Session(SessionConfig(session_id="s", tls_context=server_context(cert, key),
                              require_client_tls=True))
    assert down(s.on_read(pg.StartupPacket(pg.SSL_REQUEST, b"").encode())) == b"S"
    cctx = ssl.create_default_context(cafile=str(cert))
    client = TLSEndpoint(cctx, server_side=False, server_hostname="localhost")
    to_server = client.start()
    for _ in range(10):
        acts = s.on_read(to_server)
        back = down(acts)
        if back:
            client.receive(back)
        to_server = client.outgoing()
        if client.handshake_done and not to_server:
            break
    assert client.handshake_done
    client.send(pg.encode_startup({"user": "app", "database": "shop"}))
    acts = s.on_read(client.outgoing())
    assert pg.startup_params(pg.StartupReader().feed(up(acts)).body)["user"] == "app"  # type: ignore[union-attr]
    acts = s.on_write(SERVER_HELLO)
    plain = client.receive(down(acts))
    assert [m.type for m in pg.iter_frames(plain)] == [b"R", b"S", b"K", b"Z"]


def test_plaintext_refused_when_tls_is_required(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    s = Session(SessionConfig(session_id="s", tls_context=server_context(cert, key),
                              require_client_tls=True))
    acts = s.on_read(pg.encode_startup({"user": "app"}))
    assert up(acts) == b""
    assert pg.decode_fields(next(pg.iter_frames(down(acts))).body)["C"] == "28000"


VALID_STREAM = (pg.simple_query("select 1") + pg.parse_message("s", "select $1", (23,))
                + msg(b"B", b"\0s\0\0\0\0\x01\0\0\0\x011\0\0") + msg(b"D", b"P\0")
                + msg(b"E", b"\0\0\0\0\0") + msg(b"S") + msg(b"X"))


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=600),
    st.tuples(st.integers(0, len(VALID_STREAM) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda t: VALID_STREAM[:t[0]] + t[1] + VALID_STREAM[t[0] + len(t[1]):]),
))
def test_fuzz_core_only_returns_actions(data: bytes) -> None:
    """Random and mutated bytes in either direction: actions or a protocol
    error (a FATAL to the client and a Close), never an exception."""
    for direction in ("read", "write"):
        s, _ = ready_session(Hooks(decide_cached=deny_drop))
        feed = s.on_read if direction == "read" else s.on_write
        acts = feed(data)
        assert all(isinstance(a, SendUpstream | SendDownstream | Close | Event | NeedDecision)
                   for a in acts)
    fresh = Session(SessionConfig(session_id="f"))
    acts = fresh.on_read(data)
    assert all(isinstance(a, SendUpstream | SendDownstream | Close | Event) for a in acts)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_session_output_is_independent_of_chunking(chunk: int) -> None:
    reference, _ = ready_session()
    whole = up(reference.on_read(VALID_STREAM))
    s, _ = ready_session()
    got = b"".join(up(s.on_read(VALID_STREAM[i:i + chunk]))
                   for i in range(0, len(VALID_STREAM), chunk))
    assert got == whole


def test_cancel_request_reaches_a_session_waiting_for_its_decision() -> None:
    registry = CancelRegistry()
    s, acts = ready_session(Hooks(decide_cached=lambda r: None), registry=registry)
    gw_pid, gw_key = pg.decode_backend_key(
        next(m for m in pg.iter_frames(down(acts)) if m.type == b"K").body)
    called: list[bool] = []
    s.on_cancel_requested = lambda: called.append(True)
    s.on_read(pg.simple_query("select * from payments where amount > 10000"))
    assert s.waiting_for_decision
    c = Session(SessionConfig(session_id="c"), None, registry)
    c.on_read(pg.encode_cancel(gw_pid, gw_key))
    assert called == [True]


def _set_search_path(s: Session, sql: str, path: list[str], tag_status: bytes = b"I") -> None:
    analysis = {"search_path_set": path}
    s.hooks.decide_cached = lambda r: Decision(verdict=Verdict.ALLOW, analysis=analysis)
    s.on_read(pg.simple_query(sql))
    s.on_write(msg(b"C", b"SET\0") + pg.ready_for_query(tag_status))
    s.hooks.decide_cached = lambda r: ALLOW_ALL


def test_search_path_changes_are_followed_for_later_decisions() -> None:
    seen: list[str] = []
    s, _ = ready_session(Hooks(decide_cached=lambda r: ALLOW_ALL))
    _set_search_path(s, "set search_path = shadow, public", ["shadow", "public"])
    s.hooks.decide_cached = lambda r: seen.append(r.session.search_path) or ALLOW_ALL  # type: ignore[func-returns-value]
    s.on_read(pg.simple_query("select * from payments"))
    assert seen == ['"shadow", "public"']


def test_search_path_set_in_a_rolled_back_block_is_forgotten() -> None:
    s, _ = ready_session()
    s.on_read(pg.simple_query("begin"))
    s.on_write(msg(b"C", b"BEGIN\0") + pg.ready_for_query(b"T"))
    _set_search_path(s, "set search_path = shadow", ["shadow"], b"T")
    assert s.info().search_path == '"shadow"'
    s.on_read(pg.simple_query("rollback"))
    s.on_write(msg(b"C", b"ROLLBACK\0") + pg.ready_for_query(b"I"))
    assert s.info().search_path == '"$user", public'


def test_parameter_dependent_hold_is_decided_again_at_bind_with_the_values() -> None:
    asked: list[tuple[str | None, ...] | None] = []

    def decide(r: StatementRequest) -> Decision | None:
        asked.append(r.params)
        if r.params is None:
            return Decision(verdict=Verdict.HOLD, analysis={"params_used": [1]})
        if r.params == ("5",):
            return ALLOW_ALL
        return Decision(verdict=Verdict.DENY, reasons=("too large",), decision_id="d-9")

    s, _ = ready_session(Hooks(decide_cached=decide))
    sent = up(s.on_read(pg.parse_message("s1", "select id from payments where amount < $1")
                        + msg(b"S")))
    assert [m.type for m in pg.iter_frames(sent)] == [b"P", b"S"]  # prepared, nothing runs
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))

    def bind(value: bytes) -> bytes:
        return msg(b"B", b"\0s1\0\0\0\0\x01" + struct.pack("!i", len(value)) + value + b"\0\0")

    ok = up(s.on_read(bind(b"5") + msg(b"E", b"\0\0\0\0\0") + msg(b"S")))
    assert [m.type for m in pg.iter_frames(ok)] == [b"B", b"E", b"S"]
    s.on_write(msg(b"2") + msg(b"C", b"SELECT 0\0") + pg.ready_for_query(b"I"))
    refused = list(pg.iter_frames(up(s.on_read(bind(b"20000") + msg(b"E", b"\0\0\0\0\0")
                                               + msg(b"S")))))
    out = answer_refused_bind(s, refused)
    assert pg.decode_fields(out[0].body)["C"] == "42501" and out[-1].type == b"Z"
    assert asked == [None, ("5",), ("20000",)]


def test_binary_bind_values_reach_the_policy_as_text() -> None:
    from tap.session import _param_texts

    bind = pg.Bind("", "s", (1,), (struct.pack("!q", 20000), struct.pack("!i", -5), b"\x01",
                                    b"abc"), ())
    assert _param_texts(bind, (20, 23, 16, 25)) == ("20000", "-5", "true", "abc")
    # An unknown binary type stays opaque (the policy treats it as unknown).
    assert _param_texts(bind, (0, 0, 0, 0))[0] == "\\x0000000000004e20"


@pytest.mark.parametrize(("name", "value"), [("client_encoding", "GBK"), ("client_encoding", "SJIS"),
                                             ("standard_conforming_strings", "off")])
def test_settings_that_change_how_sql_is_read_end_the_session(name: str, value: str) -> None:
    s, _ = ready_session()
    s.on_read(pg.simple_query(f"set {name} = {value}"))
    acts = s.on_write(msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")
                      + msg(b"C", b"SET\0") + pg.ready_for_query(b"I"))
    fields = pg.decode_fields(next(pg.iter_frames(down(acts))).body)
    assert (fields["S"], fields["C"]) == ("FATAL", "0A000") and name in fields["M"]
    assert any(isinstance(a, Close) for a in acts)


def test_utf8_reported_at_startup_is_fine() -> None:
    s = Session(SessionConfig(session_id="s"))
    s.on_read(pg.encode_startup({"user": "app"}))
    acts = s.on_write(pg.AUTH_OK + pg.parameter_status("client_encoding", "UTF8")
                      + pg.parameter_status("standard_conforming_strings", "on")
                      + pg.encode_backend_key(1, b"abcd") + pg.ready_for_query(b"I"))
    assert [m.type for m in pg.iter_frames(down(acts))] == [b"R", b"S", b"S", b"K", b"Z"]
