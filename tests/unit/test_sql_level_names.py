"""SQL-level PREPARE and DECLARE share their namespaces with the protocol's
statements and portals: a client can PREPARE a text in a simple Query and run
it with Bind/Execute, or DECLARE a cursor and read it with Execute. The tap
never lets such a Bind or Execute run undecided in a governed session: a Bind
of a named statement it did not see parsed is decided as the SQL ``EXECUTE``
it amounts to (with its values), an Execute of a named portal it did not see
bound as the SQL ``FETCH``; and rows of no decided statement are masked with
the ambient plan (content detection), never passed unread. Bytes only."""

from __future__ import annotations

import struct

from test_session import answer_refused_bind, events, ready_session, up
from test_session_masking import AMEX, PAN, down, msg, row_description

from tap import protocol as pg
from tap.actions import NeedDecision
from tap.hooks import ALLOW_ALL, Decision, StatementRequest, Verdict
from tap.masking import MaskingFactory
from tap.session import Hooks, Session

DENY = Decision(verdict=Verdict.DENY, reasons=("opaque statement",), decision_id="d-1")


def bind(statement: str, *values: bytes, portal: str = "") -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!h", 0)
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v
    return msg(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def governed(asked: list[StatementRequest], answer: Decision | None = None,
             masking: bool = False) -> Session:
    def decide(r: StatementRequest) -> Decision | None:
        asked.append(r)
        return None if answer is None else answer

    factory = MaskingFactory(key=b"k" * 32, catalog=lambda _db: lambda t, c: None) if masking \
        else None
    s, _ = ready_session(Hooks(decide_cached=decide, masker_factory=factory))
    return s


def test_bind_of_a_statement_prepared_in_sql_is_decided_as_execute_with_its_values() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked)
    acts = s.on_read(bind("pgw_p", b"20000") + execute() + msg(b"S"))
    need = [a for a in acts if isinstance(a, NeedDecision)]
    assert len(need) == 1 and up(acts) == b""  # nothing runs while it is decided
    assert need[0].request.sql == 'EXECUTE "pgw_p"($1)'
    assert need[0].request.params == ("20000",)
    assert need[0].request.path == "parse"
    refused = list(pg.iter_frames(up(s.on_decision(need[0].ticket, DENY))))
    # A Parse of the marker takes the Bind's place; the server skips to Sync.
    out = answer_refused_bind(s, refused)
    assert [m.type for m in out] == [b"E", b"Z"]
    assert pg.decode_fields(out[0].body)["C"] == "42501"


def test_an_allowed_execute_runs_and_its_rows_are_masked_by_its_decision() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked, ALLOW_ALL, masking=True)
    sent = list(pg.iter_frames(up(s.on_read(bind("pgw_p", b"1") + execute() + msg(b"S")))))
    assert [a.sql for a in asked] == ['EXECUTE "pgw_p"($1)']
    # Forwarded as sent, with a Describe of the portal ahead of the Execute
    # (the tap never saw this statement's row shape).
    assert [m.type for m in sent] == [b"B", b"D", b"E", b"S"]
    acts = s.on_write(msg(b"2") + row_description(("card_number", 0, 0, 25))
                      + pg.encode_data_row([PAN]) + msg(b"C", b"SELECT 1\0")
                      + pg.ready_for_query(b"I"))
    out = down(acts)
    assert PAN not in out and b"1111" in out
    assert [m.type for m in pg.iter_frames(out)] == [b"2", b"D", b"C", b"Z"]
    assert events(acts, "statement_end")[0]["rows"] == 1


def test_execute_of_a_cursor_declared_in_sql_is_decided_as_fetch() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked, ALLOW_ALL, masking=True)
    sent = list(pg.iter_frames(up(s.on_read(execute("pgw_cur", 10) + msg(b"S")))))
    assert [a.sql for a in asked] == ['FETCH FORWARD 10 FROM "pgw_cur"']
    assert [m.type for m in sent] == [b"D", b"E", b"S"]
    assert [m.body for m in sent][1] == b"pgw_cur\0" + struct.pack("!i", 10)
    acts = s.on_write(row_description(("card_number", 0, 0, 25))
                      + pg.encode_data_row([AMEX]) + msg(b"s") + pg.ready_for_query(b"T"))
    out = down(acts)
    assert AMEX not in out and b"0005" in out
    # The internal Describe's answer is not passed on.
    assert [m.type for m in pg.iter_frames(out)] == [b"D", b"s", b"Z"]


def test_a_refused_fetch_never_reaches_the_server() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked, DENY)
    sent = list(pg.iter_frames(up(s.on_read(execute("pgw_cur") + msg(b"S")))))
    assert [a.sql for a in asked] == ['FETCH FORWARD ALL FROM "pgw_cur"']
    assert [m.type for m in sent] == [b"P", b"S"]
    assert pg.decode_parse(sent[0].body).query.startswith("pgwarden_refused_")


def test_known_statements_and_portals_are_not_asked_again() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked, ALLOW_ALL)
    s.on_read(pg.parse_message("s1", "select 1") + bind("s1", portal="c1")
              + execute("c1", 1) + msg(b"S"))
    assert [a.sql for a in asked] == ["select 1"]


def test_a_refused_bind_leaves_its_portal_known_to_belong_to_the_refusal() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked, DENY)
    acts = s.on_read(bind("pgw_p", portal="c1") + execute("c1") + msg(b"S"))
    assert [a.sql for a in asked] == ['EXECUTE "pgw_p"']  # the Execute is not asked about
    assert [m.type for m in pg.iter_frames(up(acts))] == [b"P", b"E", b"S"]
    recorded = events(acts, "statement")
    assert [(e["sql"], e["verdict"]) for e in recorded] == [('EXECUTE "pgw_p"', "deny")]


def test_unnamed_statement_and_portal_are_left_to_the_server() -> None:
    """The unnamed statement and portal only ever come from Parse and Bind:
    unknown to the tap, they do not exist in the server either."""
    asked: list[StatementRequest] = []
    s = governed(asked, DENY)
    sent = list(pg.iter_frames(up(s.on_read(bind("") + execute() + msg(b"S")))))
    assert asked == [] and [m.type for m in sent] == [b"B", b"E", b"S"]


def test_rows_of_no_decided_statement_are_content_scanned() -> None:
    asked: list[StatementRequest] = []
    s = governed(asked, ALLOW_ALL, masking=True)
    sent = list(pg.iter_frames(up(s.on_read(execute() + msg(b"S")))))
    assert asked == [] and [m.type for m in sent] == [b"D", b"E", b"S"]
    out = down(s.on_write(row_description(("x", 0, 0, 25)) + pg.encode_data_row([PAN])
                          + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I")))
    assert PAN not in out and b"1111" in out


def test_ungoverned_sessions_pass_such_messages_on_undecided() -> None:
    s, _ = ready_session()
    frames = bind("pgw_p", b"1") + execute("pgw_cur") + msg(b"S")
    assert up(s.on_read(frames)) == frames


def _answer(analysis: dict) -> Decision:  # type: ignore[type-arg]
    return Decision(verdict=Verdict.ALLOW, analysis=analysis)


def test_sql_deallocate_and_prepare_make_the_tap_forget_a_parsed_statement() -> None:
    """Parse s1 (decided), then DEALLOCATE s1; PREPARE s1 AS <other text> in
    SQL: a Bind of s1 would run the other text under s1's old decision. The
    tap forgets s1 when the SQL is allowed, so that Bind is decided again."""
    asked: list[str] = []

    def decide(r: StatementRequest) -> Decision | None:
        asked.append(r.sql)
        if r.sql.startswith("DEALLOCATE"):
            return _answer({"sql_names": {"statements": ["s1"], "portals": []}})
        return ALLOW_ALL

    s, _ = ready_session(Hooks(decide_cached=decide))
    s.on_read(pg.parse_message("s1", "select 1") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    s.on_read(bind("s1") + execute() + msg(b"S"))
    s.on_write(msg(b"2") + msg(b"C", b"SELECT 1\0") + pg.ready_for_query(b"I"))
    assert asked == ["select 1"]  # known: not asked again
    s.on_read(pg.simple_query("DEALLOCATE s1; PREPARE s1 AS SELECT 2"))
    s.on_write(msg(b"C", b"DEALLOCATE\0") + msg(b"C", b"PREPARE\0") + pg.ready_for_query(b"I"))
    s.on_read(bind("s1") + execute() + msg(b"S"))
    assert asked[-1] == 'EXECUTE "s1"'


def test_sql_close_and_discard_make_the_tap_forget_portals_and_statements() -> None:
    asked: list[str] = []
    answers = {"CLOSE ALL": {"statements": [], "portals": ["*"]},
               "DISCARD ALL": {"statements": ["*"], "portals": ["*"]}}

    def decide(r: StatementRequest) -> Decision | None:
        asked.append(r.sql)
        names = answers.get(r.sql)
        return _answer({"sql_names": names}) if names else ALLOW_ALL

    s, _ = ready_session(Hooks(decide_cached=decide))
    s.on_read(pg.parse_message("s1", "select 1") + bind("s1", portal="c1")
              + pg.parse_message("", "select 2") + bind("", portal="") + msg(b"S"))
    s.on_write(msg(b"1") + msg(b"2") + msg(b"1") + msg(b"2") + pg.ready_for_query(b"T"))
    s.on_read(pg.simple_query("CLOSE ALL"))
    s.on_write(msg(b"C", b"CLOSE CURSOR ALL\0") + pg.ready_for_query(b"T"))
    asked.clear()
    s.on_read(execute("c1") + execute("") + bind("s1", portal="c2") + msg(b"S"))
    # c1 was closed in SQL: its Execute is decided as a FETCH; the unnamed
    # portal is protocol-only, and s1 is still known.
    assert asked == ['FETCH FORWARD ALL FROM "c1"']
    s.on_write(msg(b"E", b"SERROR\0C34000\0Mcursor does not exist\0\0") + pg.ready_for_query(b"T"))
    s.on_read(pg.simple_query("DISCARD ALL"))
    s.on_write(msg(b"C", b"DISCARD ALL\0") + pg.ready_for_query(b"I"))
    asked.clear()
    s.on_read(bind("s1") + bind("") + msg(b"S"))
    assert asked == ['EXECUTE "s1"']


def _hold_over_10000(asked: list[tuple[str, tuple[str | None, ...] | None]]):  # type: ignore[no-untyped-def]
    def decide(r: StatementRequest) -> Decision | None:
        asked.append((r.sql, r.params))
        if "amount" in r.sql:
            if r.params is None:
                return Decision(verdict=Verdict.HOLD, analysis={"params_used": [1]})
            value = r.params[0]
            return ALLOW_ALL if value is not None and int(value) <= 10000 else DENY
        return ALLOW_ALL
    return decide


def test_a_second_parse_of_a_name_in_use_does_not_replace_the_first() -> None:
    """The server refuses a Parse of a name in use (42P05) and keeps the
    first statement: a Bind of the name runs the first text, so the first
    text's decision (here: decided again at Bind, with the values) stays."""
    asked: list[tuple[str, tuple[str | None, ...] | None]] = []
    s, _ = ready_session(Hooks(decide_cached=_hold_over_10000(asked)))
    s.on_read(pg.parse_message("s1", "select * from payments where amount > $1") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    s.on_read(pg.parse_message("s1", "select $1::int") + msg(b"S"))
    s.on_write(pg.error_response("42P05", 'prepared statement "s1" already exists')
               + pg.ready_for_query(b"I"))
    acts = s.on_read(bind("s1", b"20000") + execute() + msg(b"S"))
    assert asked[-1] == ("select * from payments where amount > $1", ("20000",))
    assert [m.type for m in pg.iter_frames(up(acts))] == [b"P", b"E", b"S"]  # refused


def test_a_parse_the_server_refused_leaves_no_statement_behind() -> None:
    asked: list[tuple[str, tuple[str | None, ...] | None]] = []
    s, _ = ready_session(Hooks(decide_cached=_hold_over_10000(asked)))
    s.on_read(pg.parse_message("s1", "select $1::int from no_such_table") + bind("s1", b"1")
              + execute() + pg.parse_message("s2", "select 2") + msg(b"S"))
    s.on_write(pg.error_response("42P01", 'relation "no_such_table" does not exist')
               + pg.ready_for_query(b"I"))
    # Neither s1 (failed) nor s2 (skipped) exists in the server now: a Bind
    # of either is decided as the EXECUTE of an unknown name.
    asked.clear()
    s.on_read(bind("s1", b"1") + bind("s2") + msg(b"S"))
    assert [a[0] for a in asked] == ['EXECUTE "s1"($1)', 'EXECUTE "s2"']


def test_a_pipelined_parse_is_known_to_the_bind_behind_it() -> None:
    asked: list[tuple[str, tuple[str | None, ...] | None]] = []
    s, _ = ready_session(Hooks(decide_cached=_hold_over_10000(asked)))
    sent = up(s.on_read(pg.parse_message("S_1", "select $1::int") + bind("S_1", b"7")
                        + execute() + msg(b"S")))
    assert [m.type for m in pg.iter_frames(sent)] == [b"P", b"B", b"E", b"S"]
    assert [a[0] for a in asked] == ["select $1::int"]
    s.on_write(msg(b"1") + msg(b"2") + pg.encode_data_row([b"7"]) + msg(b"C", b"SELECT 1\0")
               + pg.ready_for_query(b"I"))
    asked.clear()
    s.on_read(bind("S_1", b"8") + execute() + msg(b"S"))
    assert asked == []  # prepared in the server: known


def test_a_refused_parse_of_a_name_in_use_keeps_the_first_statement() -> None:
    def decide(r: StatementRequest) -> Decision | None:
        return DENY if "pg_read_file" in r.sql or r.sql.startswith("EXECUTE") else ALLOW_ALL

    s, _ = ready_session(Hooks(decide_cached=decide))
    s.on_read(pg.parse_message("s1", "select 1") + msg(b"S"))
    s.on_write(msg(b"1") + pg.ready_for_query(b"I"))
    sent = list(pg.iter_frames(up(s.on_read(pg.parse_message("s1", "select pg_read_file('x')")
                                            + msg(b"S")))))
    marker = pg.decode_parse(sent[0].body).query
    s.on_write(pg.error_response("42601", f'syntax error at or near "{marker}"')
               + pg.ready_for_query(b"I"))
    sent = list(pg.iter_frames(up(s.on_read(bind("s1") + execute() + msg(b"S")))))
    assert [m.type for m in sent] == [b"B", b"E", b"S"]  # still the known, allowed s1


def test_a_bind_the_server_refuses_leaves_the_open_portal_as_it_was() -> None:
    """A cursor declared WITH HOLD stays open after its transaction; a Bind
    of its name is refused by the server (42P03), which keeps the cursor. An
    Execute of the name reads the cursor, so it is decided as the FETCH it
    is, not run under the refused Bind's decision (here: unmasked)."""
    from tap.hooks import MaskPlan

    raw = Decision(verdict=Verdict.ALLOW, mask=MaskPlan(unmasked=True, scan_content=False))
    asked: list[str] = []

    def decide(r: StatementRequest) -> Decision | None:
        asked.append(r.sql)
        if r.sql.startswith("declare"):
            return _answer({"sql_names": {"statements": [], "portals": ["c1"]}})
        return raw if "raw" in r.sql else ALLOW_ALL

    factory = MaskingFactory(key=b"k" * 32, catalog=lambda _db: lambda t, c: None)
    s, _ = ready_session(Hooks(decide_cached=decide, masker_factory=factory))
    s.on_read(pg.simple_query("declare c1 cursor with hold for select card"))
    s.on_write(msg(b"C", b"DECLARE CURSOR\0") + pg.ready_for_query(b"I"))
    s.on_read(pg.parse_message("sb", "select raw") + bind("sb", portal="c1") + msg(b"S"))
    s.on_write(msg(b"1") + pg.error_response("42P03", 'cursor "c1" already exists')
               + pg.ready_for_query(b"I"))
    asked.clear()
    s.on_read(execute("c1") + msg(b"S"))
    assert asked == ['FETCH FORWARD ALL FROM "c1"']
    out = down(s.on_write(row_description(("card", 0, 0, 25)) + pg.encode_data_row([PAN])
                          + msg(b"C", b"FETCH 1\0") + pg.ready_for_query(b"I")))
    assert PAN not in out and b"1111" in out


def test_a_binary_cursor_read_by_execute_is_masked_by_its_described_types() -> None:
    """DECLARE ... BINARY CURSOR returns binary values; read with a protocol
    Execute, its shape comes from the tap's own Describe of the portal,
    whose format codes are the server's (binary here): a card number held as
    a binary int8 is masked by type, not passed as opaque bytes."""
    asked: list[StatementRequest] = []
    s = governed(asked, ALLOW_ALL, masking=True)
    sent = list(pg.iter_frames(up(s.on_read(execute("pgw_bin") + msg(b"S")))))
    assert [m.type for m in sent] == [b"D", b"E", b"S"]
    binary_int8 = msg(b"T", struct.pack("!h", 1) + b"card_number\0"
                      + struct.pack("!IhIhih", 0, 0, 20, 8, -1, 1))
    pan = int(PAN).to_bytes(8, "big")
    out = down(s.on_write(binary_int8 + pg.encode_data_row([pan]) + msg(b"C", b"FETCH 1\0")
                          + pg.ready_for_query(b"T")))
    frames = list(pg.iter_frames(out))
    assert [m.type for m in frames] == [b"D", b"C", b"Z"]
    value = pg.decode_data_row(frames[0].body)[0]
    assert value is not None and value != pan
