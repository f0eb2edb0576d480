"""Masking through the sans-IO session: every server path, bytes only."""

from __future__ import annotations

import struct

from maskd.styles import encode_numeric
from tap import protocol as pg
from tap.actions import Event, SendDownstream, SendUpstream
from tap.hooks import ALLOW_ALL, ColumnRule, Decision, MaskPlan, Verdict
from tap.masking import MaskingFactory
from tap.session import Hooks, Session, SessionConfig

PAN = b"4111111111111111"
AMEX = b"378282246310005"


def down(acts: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(a.data for a in acts if isinstance(a, SendDownstream))


def msg(t: bytes, body: bytes = b"") -> bytes:
    return pg.Message(t, body).encode()


def row_description(*cols: tuple[str, int, int, int]) -> bytes:
    body = struct.pack("!h", len(cols))
    for name, table, attnum, typ in cols:
        body += name.encode() + b"\0" + struct.pack("!IhIhih", table, attnum, typ, -1, -1, 0)
    return msg(b"T", body)


def session(decision: Decision = ALLOW_ALL, catalog: dict | None = None) -> Session:  # type: ignore[type-arg]
    names = catalog or {}
    factory = MaskingFactory(key=b"k" * 32,
                             catalog=lambda _db: lambda t, c: names.get((t, c)))
    s = Session(SessionConfig(session_id="m"),
                Hooks(decide_cached=lambda _r: decision, masker_factory=factory))
    s.on_read(pg.encode_startup({"user": "app", "database": "shop"}))
    s.on_write(pg.AUTH_OK + pg.encode_backend_key(1, b"abcd") + pg.ready_for_query(b"I"))
    return s


def test_pan_in_a_text_column_is_masked_keeping_last_four() -> None:
    s = session()
    s.on_read(pg.simple_query("select card_number from payments"))
    acts = s.on_write(row_description(("card_number", 0, 0, 25))
                      + pg.encode_data_row([PAN]) + msg(b"C", b"SELECT 1\0")
                      + pg.ready_for_query(b"I"))
    out = down(acts)
    assert PAN not in out and b"1111" in out
    end = [a.record for a in acts if isinstance(a, Event) and a.record["type"] == "statement_end"]
    assert end[0]["rows"] == 1 and end[0]["masked"]["values"] == 1


def test_column_rule_by_catalog_identity_masks_even_non_luhn_values() -> None:
    plan = MaskPlan(rules=(ColumnRule("public.payments.card_number", "redact"),), scan_content=True)
    s = session(Decision(verdict=Verdict.ALLOW, mask=plan), {(16384, 2): "public.payments.card_number"})
    s.on_read(pg.simple_query("select card_number from payments"))
    out = down(s.on_write(row_description(("card_number", 16384, 2, 25))
                          + pg.encode_data_row([b"1234"]) + msg(b"C", b"SELECT 1\0")
                          + pg.ready_for_query(b"I")))
    assert b"1234" not in out


def test_notice_error_and_notification_payloads_are_masked() -> None:
    s = session()
    notice = pg.notice_response(f"card {PAN.decode()} seen")
    err = pg.encode_fields(b"E", {"S": "ERROR", "C": "23505", "M": "duplicate key",
                                  "D": f"Key (card_number)=({AMEX.decode()}) already exists."})
    note = pg.encode_notification(7, "cards", f"new {PAN.decode()}")
    out = down(s.on_write(notice + err + note))
    assert PAN not in out and AMEX not in out
    assert out.count(b"1111") >= 2 and b"0005" in out


def test_copy_out_is_masked_across_chunks() -> None:
    s = session()
    s.on_read(pg.simple_query("copy payments to stdout"))
    head = msg(b"H", b"\x00\x00\x01\x00\x00")
    data = msg(b"d", b"1\t" + PAN + b"\n") + msg(b"d", b"2\t" + AMEX + b"\n")
    tail = msg(b"c") + msg(b"C", b"COPY 2\0") + pg.ready_for_query(b"I")
    stream = head + data + tail
    out = b"".join(down(s.on_write(stream[i:i + 7])) for i in range(0, len(stream), 7))
    assert PAN not in out and AMEX not in out
    assert [m.type for m in pg.iter_frames(out)][-3:] == [b"c", b"C", b"Z"]


def test_unmasked_decision_delivers_raw_data() -> None:
    s = session(Decision(verdict=Verdict.ALLOW, mask=MaskPlan(unmasked=True)))
    s.on_read(pg.simple_query("select card_number from payments"))
    out = down(s.on_write(row_description(("card_number", 0, 0, 25)) + pg.encode_data_row([PAN])
                          + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I")))
    assert PAN in out


def test_extended_execute_without_describe_is_still_masked() -> None:
    s = session()
    # The statement is described once, then executed twice without Describe.
    s.on_read(pg.parse_message("s1", "select card_number from payments") + msg(b"D", b"Ss1\0")
              + msg(b"S"))
    s.on_write(msg(b"1") + msg(b"t", b"\x00\x00") + row_description(("card_number", 0, 0, 25))
               + pg.ready_for_query(b"I"))
    bind = msg(b"B", b"\0s1\0\0\0\0\0\0\0")
    acts = s.on_read(bind + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
    assert any(isinstance(a, SendUpstream) for a in acts)
    out = down(s.on_write(msg(b"2") + pg.encode_data_row([PAN]) + msg(b"C", b"SELECT 1\0")
                          + pg.ready_for_query(b"I")))
    assert PAN not in out and b"1111" in out


def test_execute_of_an_undescribed_portal_is_described_by_the_tap_first() -> None:
    """A client that never describes its statement and asks for binary
    results: the tap describes the portal itself and masks by type; the
    client never sees the tap's own RowDescription."""
    s = session()
    s.on_read(pg.parse_message("s1", "select card_number::int8 from payments") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    bind = msg(b"B", b"\0s1\0\0\0\0\0\0\x01\0\x01")  # one result column, binary
    sent = b"".join(a.data for a in s.on_read(bind + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
                    if isinstance(a, SendUpstream))
    types = [m.type for m in pg.iter_frames(sent)]
    assert types == [b"B", b"D", b"E", b"S"]
    pan = int(PAN).to_bytes(8, "big")
    reply = (msg(b"2") + row_description(("card_number", 0, 0, 20)) + pg.encode_data_row([pan])
             + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I"))
    out = down(s.on_write(reply))
    frames = list(pg.iter_frames(out))
    assert [m.type for m in frames] == [b"2", b"D", b"C", b"Z"]
    value = pg.decode_data_row(frames[1].body)[0]
    assert value != pan and value is not None


def _upstream_types(acts: list) -> list[bytes]:  # type: ignore[type-arg]
    sent = b"".join(a.data for a in acts if isinstance(a, SendUpstream))
    return [m.type for m in pg.iter_frames(sent)]


def test_a_portal_the_client_describes_is_not_described_again() -> None:
    """libpq sends Bind, Describe portal, Execute, Sync for every execution:
    the client's own Describe gives the shape before the rows, so the tap
    adds nothing, and the binary value is still masked by that shape."""
    s = session()
    s.on_read(pg.parse_message("s1", "select card_number::int8 from payments") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    bind = msg(b"B", b"\0s1\0\0\0\0\0\0\x01\0\x01")  # one result column, binary
    batch = bind + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S")
    acts = s.on_read(batch)
    assert _upstream_types(acts) == [b"B", b"D", b"E", b"S"]
    pan = int(PAN).to_bytes(8, "big")
    described = struct.pack("!h", 1) + b"card_number\0" + struct.pack("!IhIhih", 0, 0, 20, 8, -1, 1)
    reply = (msg(b"2") + msg(b"T", described) + pg.encode_data_row([pan])
             + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I"))
    frames = list(pg.iter_frames(down(s.on_write(reply))))
    assert [m.type for m in frames] == [b"2", b"T", b"D", b"C", b"Z"]
    value = pg.decode_data_row(frames[2].body)[0]
    assert value != pan and value is not None


def test_a_describe_of_an_earlier_binding_does_not_count_for_a_later_one() -> None:
    """Bind P (text), Describe P, Bind P again (binary), Execute P: the
    description answers the first binding; the tap describes the second
    one itself and masks its rows by that answer."""
    s = session()
    s.on_read(pg.parse_message("s1", "select card_number::int8 from payments") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    text_bind = msg(b"B", b"\0s1\0\0\0\0\0\0\x01\0\x00")
    binary_bind = msg(b"B", b"\0s1\0\0\0\0\0\0\x01\0\x01")
    acts = s.on_read(text_bind + msg(b"D", b"P\0") + binary_bind
                     + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
    assert _upstream_types(acts) == [b"B", b"D", b"B", b"D", b"E", b"S"]

    def described(fmt: int) -> bytes:
        return msg(b"T", struct.pack("!h", 1) + b"card_number\0"
                   + struct.pack("!IhIhih", 0, 0, 20, 8, -1, fmt))

    pan = int(PAN).to_bytes(8, "big")
    reply = (msg(b"2") + described(0) + msg(b"2") + described(1) + pg.encode_data_row([pan])
             + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I"))
    frames = list(pg.iter_frames(down(s.on_write(reply))))
    assert [m.type for m in frames] == [b"2", b"T", b"2", b"D", b"C", b"Z"]
    value = pg.decode_data_row(frames[3].body)[0]
    assert value != pan and value is not None


def _computed(s: Session, value: bytes, type_oid: int = 25) -> bytes:
    s.on_read(pg.simple_query("select f(card_number) from payments"))
    return down(s.on_write(row_description(("f", 0, 0, type_oid)) + pg.encode_data_row([value])
                           + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I")))


def test_derived_values_in_computed_columns_are_masked() -> None:
    """hex, reversed and arithmetic forms of a PAN are not Luhn-valid any
    more; computed columns get the strict rule."""
    s = session()
    hexed = PAN.hex().encode()
    assert hexed not in _computed(s, hexed)
    assert PAN[::-1] not in _computed(s, PAN[::-1])
    plus_one = str(int(PAN) + 1).encode()
    assert plus_one not in _computed(s, plus_one)


NON_LUHN = b"4111111111111112"  # a stored card number that fails the Luhn check


def test_binary_computed_numbers_are_masked_whatever_their_digits() -> None:
    """DECLARE c BINARY CURSOR FOR SELECT card_number::numeric ...; FETCH:
    the rows come back in binary with no column identity, and a stored
    card number that fails the Luhn check passes content detection. The
    strict rule for computed columns masks it as a whole."""
    for type_oid, value, zero in [
            (1700, encode_numeric(int(NON_LUHN)), encode_numeric(0)),
            (20, int(NON_LUHN).to_bytes(8, "big"), bytes(8))]:
        s = session()
        s.on_read(pg.simple_query("fetch all from c"))
        described = msg(b"T", struct.pack("!h", 1) + b"card_number\0"
                        + struct.pack("!IhIhih", 0, 0, type_oid, -1, -1, 1))
        out = down(s.on_write(described + pg.encode_data_row([value]) + msg(b"C", b"FETCH 1\0")
                              + pg.ready_for_query(b"I")))
        frames = [m for m in pg.iter_frames(out) if m.type == b"D"]
        assert pg.decode_data_row(frames[0].body) == [zero]


def test_binary_copy_gets_the_strict_rule_field_by_field() -> None:
    s = session()
    s.on_read(pg.simple_query("copy (select cardholder from payments) to stdout binary"))
    field = b"ref " + NON_LUHN
    data = (b"PGCOPY\n\xff\r\n\x00" + bytes(8) + struct.pack("!h", 1)
            + struct.pack("!i", len(field)) + field + b"\xff\xff")
    out = down(s.on_write(msg(b"H", b"\x01\x00\x01\x00\x01") + msg(b"d", data) + msg(b"c")
                          + msg(b"C", b"COPY 1\0") + pg.ready_for_query(b"I")))
    assert NON_LUHN not in out
    assert b"ref " + b"X" * 16 + b"\xff\xff" in out


def test_table_columns_keep_long_non_pan_numbers() -> None:
    s = session()
    s.on_read(pg.simple_query("select order_ref from orders"))
    out = down(s.on_write(row_description(("order_ref", 16500, 2, 25))
                          + pg.encode_data_row([b"1234567890123"]) + msg(b"C", b"SELECT 1\0")
                          + pg.ready_for_query(b"I")))
    assert b"1234567890123" in out


def test_cast_error_quoting_a_hex_pan_is_masked() -> None:
    s = session()
    err = pg.error_response("22003", f'value "{PAN.hex()}" is out of range for type integer')
    out = down(s.on_write(err))
    assert PAN.hex().encode() not in out and PAN not in out


def test_copy_out_masks_derived_values_too() -> None:
    s = session()
    s.on_read(pg.simple_query("copy (select encode(card_number::bytea, 'hex')) to stdout"))
    stream = (msg(b"H", b"\x00\x00\x01\x00\x00") + msg(b"d", PAN.hex().encode() + b","
                                                      + PAN[::-1] + b"\n")
              + msg(b"c") + msg(b"C", b"COPY 1\0") + pg.ready_for_query(b"I"))
    out = down(s.on_write(stream))
    assert PAN.hex().encode() not in out and PAN[::-1] not in out


def test_a_reused_result_shape_follows_catalog_changes_and_counts_afresh() -> None:
    """The factory reuses a prepared shape for a re-executed statement; a
    catalog reload that gives a column its identity (and so its rule) must
    still apply from the next result on, and counts never carry over."""
    plan = MaskPlan(rules=(ColumnRule("public.payments.card_number", "redact"),),
                    scan_content=True)
    names: dict[tuple[int, int], str] = {(1, 1): "public.other.x"}  # (non-empty: kept as is)
    s = session(Decision(verdict=Verdict.ALLOW, mask=plan), names)

    def run() -> tuple[bytes, list[dict]]:  # type: ignore[type-arg]
        s.on_read(pg.simple_query("select card_number from payments"))
        acts = s.on_write(row_description(("card_number", 16384, 2, 25))
                          + pg.encode_data_row([b"1234"]) + msg(b"C", b"SELECT 1\0")
                          + pg.ready_for_query(b"I"))
        ends = [a.record for a in acts
                if isinstance(a, Event) and a.record["type"] == "statement_end"]
        return down(acts), ends

    out, _ = run()
    assert b"1234" in out  # no identity yet: content scanning only, not a PAN
    names[(16384, 2)] = "public.payments.card_number"  # the catalog reloaded
    for _ in range(2):
        out, ends = run()
        assert b"1234" not in out
        assert ends[0]["masked"]["values"] == 1


def _suspended_portal_exchange(refused_after: bool = False) -> tuple[Session, bytes]:
    """A masked portal read two rows at a time (Execute with a row limit,
    PortalSuspended, Execute again), then the statement closed. With
    ``refused_after``, the client pipelines a refused Query behind it: the
    tap then reads the reply message by message (it looks for its marker)."""
    refuse = Decision(verdict=Verdict.DENY, reasons=("no",))
    factory = MaskingFactory(key=b"k" * 32, catalog=lambda _db: lambda t, c: None)
    s = Session(SessionConfig(session_id="m"), Hooks(
        decide_cached=lambda r: refuse if "drop" in r.sql else ALLOW_ALL, masker_factory=factory))
    s.on_read(pg.encode_startup({"user": "app", "database": "shop"}))
    s.on_write(pg.AUTH_OK + pg.encode_backend_key(1, b"abcd") + pg.ready_for_query(b"I"))
    s.on_read(pg.parse_message("s1", "select card_number from payments") + msg(b"D", b"Ss1\0")
              + msg(b"S"))
    s.on_write(msg(b"1") + msg(b"t", b"\x00\x00") + row_description(("card_number", 0, 0, 25))
               + pg.ready_for_query(b"I"))
    execute = msg(b"E", b"\0" + struct.pack("!i", 2))
    s.on_read(msg(b"B", b"\0s1\0\0\0\0\0\0\0") + execute + execute + msg(b"C", b"Ss1\0")
              + msg(b"S") + (pg.simple_query("drop table payments") if refused_after else b""))
    reply = (msg(b"2") + pg.encode_data_row([PAN]) + pg.encode_data_row([AMEX]) + msg(b"s")
             + pg.encode_data_row([PAN]) + msg(b"C", b"SELECT 1\0") + msg(b"3")
             + pg.ready_for_query(b"T"))
    return s, reply


def _check_suspended_portal(s: Session, acts: list,  # type: ignore[type-arg]
                            refused_after: bool = False) -> None:
    out = down(acts)
    assert PAN not in out and AMEX not in out
    assert [m.type for m in pg.iter_frames(out)] == [b"2", b"D", b"D", b"s", b"D", b"C", b"3",
                                                     b"Z"]
    ends = [a.record for a in acts if isinstance(a, Event) and a.record["type"] == "statement_end"]
    # one record per Execute: the suspended one and the one that completed
    assert [e["rows"] for e in ends] == [2, 1]
    if refused_after:
        assert s.busy  # the refused Query's marker is still in flight
    else:
        assert not s.busy and s.transaction_status == "T"


def test_a_suspended_masked_portal_in_one_chunk() -> None:
    """PortalSuspended, CloseComplete and ReadyForQuery of a masked result
    pass on as they came (the framed path), with their bookkeeping done."""
    s, reply = _suspended_portal_exchange()
    _check_suspended_portal(s, s.on_write(reply))


def test_a_suspended_masked_portal_byte_by_byte() -> None:
    """The same reply a byte at a time (each message completes alone)."""
    s, reply = _suspended_portal_exchange()
    acts: list = []  # type: ignore[type-arg]
    for i in range(len(reply)):
        acts += s.on_write(reply[i:i + 1])
    _check_suspended_portal(s, acts)


def test_a_suspended_masked_portal_read_message_by_message() -> None:
    """With a refused statement pipelined behind, the same reply takes the
    message-by-message path; the refusal's own answer follows."""
    s, reply = _suspended_portal_exchange(refused_after=True)
    _check_suspended_portal(s, s.on_write(reply), refused_after=True)


def test_an_empty_query_on_a_masked_session_ends_its_statement() -> None:
    s = session()
    s.on_read(pg.simple_query(""))
    acts = s.on_write(msg(b"I") + pg.ready_for_query(b"I"))
    assert [m.type for m in pg.iter_frames(down(acts))] == [b"I", b"Z"]
    assert not s.busy


# --------------------------------------------------------------- withheld error text

WITHHOLD = Decision(verdict=Verdict.ALLOW, mask=MaskPlan(
    rules=(ColumnRule("public.payments.card_number"),), withhold_errors=True))
# translate(card_number, '0123456789', 'abcdefghij') of the Visa test PAN:
# no detector sees a card number in it, anyone can read one.
LETTERS = "ebbbbbbbbbbbbbbb"


def _server_error(code: str, message: str, **more: str) -> bytes:
    return pg.encode_fields(b"E", {"S": "ERROR", "V": "ERROR", "C": code, "M": message,
                                   "F": "numutils.c", "L": "232", "R": "pg_strtoint32_safe",
                                   **more})


def _fields(out: bytes, kind: bytes = b"E") -> dict[str, str]:
    frames = [f for f in pg.iter_frames(out) if f.type == kind]
    assert len(frames) == 1, [f.type for f in pg.iter_frames(out)]
    return pg.decode_fields(frames[0].body)


def test_error_text_of_a_cardholder_read_is_withheld_simple_protocol() -> None:
    s = session(WITHHOLD)
    s.on_read(pg.simple_query(
        "select 1 from payments where translate(card_number, '0123456789', 'abcdefghij')::int > 0"))
    acts = s.on_write(_server_error("22P02", f'invalid input syntax for type integer: "{LETTERS}"',
                                    D=f"detail {LETTERS}", W=f"context {LETTERS}", P="42",
                                    q=f"select '{LETTERS}'")
                      + pg.ready_for_query(b"I"))
    out = down(acts)
    assert LETTERS.encode() not in out
    fields = _fields(out)
    assert fields["C"] == "22P02" and fields["S"] == "ERROR" and fields["P"] == "42"
    assert "22P02 invalid_text_representation" in fields["M"] and "withheld" in fields["M"]
    assert not {"D", "W", "q", "F", "L", "R"} & set(fields)
    # The audit trail records what the client got, not the server's text.
    recorded = repr([a.record for a in acts if isinstance(a, Event)])
    assert LETTERS not in recorded and "22P02" in recorded
    # The session goes on.
    assert [m.type for m in pg.iter_frames(out)] == [b"E", b"Z"]


def test_error_text_of_a_cardholder_execute_is_withheld_extended_protocol() -> None:
    s = session(WITHHOLD)
    s.on_read(pg.parse_message("", "select substr(card_number, 1, 8)::date from payments")
              + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
    # The tap describes the portal before the Execute (no Describe came).
    described = row_description(("substr", 0, 0, 1082))
    out = down(s.on_write(msg(b"1") + msg(b"2") + described
                          + _server_error("22008", 'date/time field value out of range: '
                                          '"41111111"')
                          + pg.ready_for_query(b"I")))
    assert b"41111111" not in out
    assert _fields(out)["C"] == "22008"


def test_parse_errors_and_transaction_state_errors_keep_their_text() -> None:
    """Parse only analyses the statement (no row is read), and classes such
    as 25 or 57 never quote a value: their text stays useful."""
    s = session(WITHHOLD)
    s.on_read(pg.parse_message("", "select amout from payments") + msg(b"S"))
    out = down(s.on_write(_server_error("42703", 'column "amout" does not exist')
                          + pg.ready_for_query(b"I")))
    assert _fields(out)["M"] == 'column "amout" does not exist'
    s.on_read(pg.simple_query("select card_number from payments where id = 1"))
    out = down(s.on_write(_server_error("57014", "canceling statement due to user request")
                          + pg.ready_for_query(b"I")))
    assert _fields(out)["M"] == "canceling statement due to user request"


def test_error_text_is_kept_when_the_plan_does_not_withhold_it() -> None:
    s = session(Decision(verdict=Verdict.ALLOW, mask=MaskPlan(scan_content=True)))
    s.on_read(pg.simple_query("select 'x'::int"))
    out = down(s.on_write(_server_error("22P02", 'invalid input syntax for type integer: "x"')
                          + pg.ready_for_query(b"I")))
    assert _fields(out)["M"] == 'invalid input syntax for type integer: "x"'


def test_a_withheld_fatal_still_ends_the_session() -> None:
    s = session(WITHHOLD)
    s.on_read(pg.simple_query("select card_number::int from payments"))
    acts = s.on_write(pg.encode_fields(b"E", {"S": "FATAL", "V": "FATAL", "C": "XX000",
                                              "M": f"cache lookup failed for {LETTERS}"}))
    out = down(acts)
    assert LETTERS.encode() not in out and _fields(out)["S"] == "FATAL"
    assert s.end_reason == "server_fatal"
