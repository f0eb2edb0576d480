"""tap.max_result_bytes through the sans-IO session, bytes only.

One execution may return at most ``max_result_bytes`` of DataRow and CopyData
messages. Past it the client gets what came before the message that crossed
the limit, then a FATAL 54000; the statement is recorded as failed with the
rows the client got; the session ends ("result_limit")."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tap import protocol as pg
from tap.actions import Close, Event, SendDownstream
from tap.hooks import ALLOW_ALL, Decision, MaskPlan, Verdict
from tap.masking import MaskingFactory
from tap.session import Hooks, Session, SessionConfig

PAN = b"4111111111111111"
LIMIT = 4096


def msg(t: bytes, body: bytes = b"") -> bytes:
    return pg.Message(t, body).encode()


def down(acts: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(a.data for a in acts if isinstance(a, SendDownstream))


def records(acts: list, kind: str) -> list[dict]:  # type: ignore[type-arg]
    return [a.record for a in acts if isinstance(a, Event) and a.record["type"] == kind]


def session(limit: int | None = LIMIT, masking: bool = False) -> Session:
    hooks = Hooks(decide_cached=lambda _r: ALLOW_ALL)
    if masking:
        hooks.masker_factory = MaskingFactory(key=b"k" * 32, catalog=lambda _db: lambda t, c: None)
    s = Session(SessionConfig(session_id="r", max_result_bytes=limit), hooks)
    s.on_read(pg.encode_startup({"user": "app", "database": "shop"}))
    s.on_write(pg.AUTH_OK + pg.encode_backend_key(1, b"abcd") + pg.ready_for_query(b"I"))
    return s


ROW_DESC = msg(b"T", b"\x00\x01" + b"v\0" + b"\x00" * 6 + b"\x00\x00\x00\x19" + b"\xff\xff"
               + b"\xff\xff\xff\xff" + b"\x00\x00")


def rows(n: int, value: bytes = b"x" * 90) -> list[bytes]:
    return [pg.encode_data_row([value]) for _ in range(n)]


def result(n: int, value: bytes = b"x" * 90, tag: bytes = b"SELECT") -> bytes:
    return (ROW_DESC + b"".join(rows(n, value)) + msg(b"C", tag + b" %d\0" % n)
            + pg.ready_for_query(b"I"))


def fed(s: Session, data: bytes, chunk: int) -> list:  # type: ignore[type-arg]
    acts: list = []  # type: ignore[type-arg]
    for i in range(0, len(data), chunk):
        acts += s.on_write(data[i:i + chunk])
        if any(isinstance(a, Close) for a in acts):
            break
    return acts


def assert_cut(acts: list, delivered_rows: int) -> None:  # type: ignore[type-arg]
    """The client got whole messages, then the FATAL; the records say so."""
    out = list(pg.iter_frames(down(acts)))
    assert out[-1].type == b"E"
    fields = pg.decode_fields(out[-1].body)
    assert fields["S"] == "FATAL" and fields["C"] == "54000"
    assert str(LIMIT) in fields["M"]
    assert sum(1 for m in out if m.type == b"D") == delivered_rows
    end = records(acts, "statement_end")[-1]
    assert end["sqlstate"] == "54000" and end["rows"] == delivered_rows
    assert records(acts, "session_end")[0]["reason"] == "result_limit"
    assert any(isinstance(a, Close) for a in acts)


def test_a_result_under_the_limit_passes_whole() -> None:
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    data = result(30)  # 30 rows of ~100 bytes: under 4096
    acts = s.on_write(data)
    assert down(acts) == data
    assert records(acts, "statement_end")[0]["rows"] == 30
    assert not any(isinstance(a, Close) for a in acts)


def test_the_limit_is_per_execution_not_per_session() -> None:
    s = session()
    for _ in range(3):  # 3 x 30 rows: over 4096 together, each under it
        s.on_read(pg.simple_query("select v from t"))
        acts = s.on_write(result(30))
        assert not any(isinstance(a, Close) for a in acts)
        assert "sqlstate" not in records(acts, "statement_end")[0]


def test_a_result_over_the_limit_in_one_chunk_ends_the_session() -> None:
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    acts = s.on_write(result(1000))
    row = len(rows(1)[0])
    assert_cut(acts, delivered_rows=LIMIT // row)
    assert s.on_write(result(5)) == []  # closed: nothing more is passed on


def test_a_result_over_the_limit_across_chunks_ends_the_session() -> None:
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    acts = fed(s, result(1000), chunk=333)
    row = len(rows(1)[0])
    assert_cut(acts, delivered_rows=LIMIT // row)


def test_no_limit_lets_a_large_result_through() -> None:
    s = session(limit=None)
    s.on_read(pg.simple_query("select v from t"))
    data = result(5000)
    acts = fed(s, data, chunk=8192)
    assert down(acts) == data
    assert not any(isinstance(a, Close) for a in acts)


def test_an_earlier_statement_in_the_same_chunk_is_delivered_and_recorded_whole() -> None:
    s = session()
    s.on_read(pg.simple_query("select v from small") + pg.simple_query("select v from big"))
    small, big = result(3), result(1000)
    acts = s.on_write(small + big)
    out = down(acts)
    assert out.startswith(small)
    first, second = records(acts, "statement_end")
    assert first["rows"] == 3 and "sqlstate" not in first
    row = len(rows(1)[0])
    assert second["rows"] == LIMIT // row and second["sqlstate"] == "54000"
    assert sum(1 for m in pg.iter_frames(out) if m.type == b"D") == 3 + LIMIT // row
    assert records(acts, "session_end")[0]["reason"] == "result_limit"


def test_extended_protocol_execution_is_limited() -> None:
    s = session()
    s.on_read(msg(b"P", b"\0select v from t\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\0")
              + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
    reply = (msg(b"1") + msg(b"2") + ROW_DESC + b"".join(rows(1000))
             + msg(b"C", b"SELECT 1000\0") + pg.ready_for_query(b"I"))
    acts = fed(s, reply, chunk=1000)
    row = len(rows(1)[0])
    assert_cut(acts, delivered_rows=LIMIT // row)


def test_copy_out_data_counts() -> None:
    s = session()
    s.on_read(pg.simple_query("copy t to stdout"))
    line = msg(b"d", b"y" * 95 + b"\n")
    reply = (msg(b"H", b"\x00\x00\x01\x00\x00") + line * 200 + msg(b"c")
             + msg(b"C", b"COPY 200\0") + pg.ready_for_query(b"I"))
    acts = fed(s, reply, chunk=700)
    out = list(pg.iter_frames(down(acts)))
    assert sum(len(m.body) + 5 for m in out if m.type == b"d") <= LIMIT
    fields = pg.decode_fields(out[-1].body)
    assert fields["S"] == "FATAL" and fields["C"] == "54000"
    assert records(acts, "statement_end")[-1]["sqlstate"] == "54000"
    assert records(acts, "session_end")[0]["reason"] == "result_limit"


def test_a_masked_result_is_limited_and_nothing_raw_passes() -> None:
    s = session(masking=True)
    s.on_read(pg.simple_query("select card_number from payments"))
    acts = fed(s, result(1000, value=PAN + b" " + b"z" * 70), chunk=2048)
    out = down(acts)
    assert PAN not in out
    fields = pg.decode_fields(list(pg.iter_frames(out))[-1].body)
    assert fields["C"] == "54000"
    end = records(acts, "statement_end")[-1]
    assert end["sqlstate"] == "54000"
    delivered = sum(1 for m in pg.iter_frames(out) if m.type == b"D")
    assert end["rows"] == delivered and 0 < delivered * 95 <= LIMIT


def policy_session(policy_limit: int | None, config_limit: int | None) -> Session:
    """A session whose statements are allowed with ``max_result_bytes`` set
    by the decision (the policy), next to the gateway's own limit."""
    decision = Decision(verdict=Verdict.ALLOW, max_result_bytes=policy_limit,
                        mask=MaskPlan(scan_content=False))
    s = Session(SessionConfig(session_id="p", max_result_bytes=config_limit),
                Hooks(decide_cached=lambda _r: decision))
    s.on_read(pg.encode_startup({"user": "app", "database": "shop"}))
    s.on_write(pg.AUTH_OK + pg.encode_backend_key(1, b"abcd") + pg.ready_for_query(b"I"))
    return s


def test_a_limit_from_the_policy_decision_ends_the_session() -> None:
    s = policy_session(LIMIT, None)
    s.on_read(pg.simple_query("select v from t"))
    acts = fed(s, result(1000), chunk=1500)
    assert_cut(acts, delivered_rows=LIMIT // len(rows(1)[0]))
    message = pg.decode_fields(list(pg.iter_frames(down(acts)))[-1].body)["M"]
    assert "policy decision" in message and "tap.max_result_bytes" not in message


def test_the_smaller_of_the_policy_and_gateway_limits_applies() -> None:
    row = len(rows(1)[0])
    for policy, config in ((LIMIT, 10 * LIMIT), (10 * LIMIT, LIMIT)):
        s = policy_session(policy, config)
        s.on_read(msg(b"P", b"\0select v from t\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\0")
                  + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
        reply = (msg(b"1") + msg(b"2") + ROW_DESC + b"".join(rows(1000))
                 + msg(b"C", b"SELECT 1000\0") + pg.ready_for_query(b"I"))
        acts = fed(s, reply, chunk=1000)
        assert_cut(acts, delivered_rows=LIMIT // row)
        message = pg.decode_fields(list(pg.iter_frames(down(acts)))[-1].body)["M"]
        assert ("policy decision" in message) is (policy < config), message


def test_a_policy_limit_is_per_statement() -> None:
    """Only the executions whose decision carries a limit are limited."""
    limited = Decision(verdict=Verdict.ALLOW, max_result_bytes=LIMIT,
                       mask=MaskPlan(scan_content=False))
    s = Session(SessionConfig(session_id="p"), Hooks(
        decide_cached=lambda r: limited if "limited" in r.sql else ALLOW_ALL))
    s.on_read(pg.encode_startup({"user": "app", "database": "shop"}))
    s.on_write(pg.AUTH_OK + pg.encode_backend_key(1, b"abcd") + pg.ready_for_query(b"I"))
    s.on_read(pg.simple_query("select v from free"))
    data = result(1000)
    acts = fed(s, data, chunk=4096)
    assert down(acts) == data and not any(isinstance(a, Close) for a in acts)
    s.on_read(pg.simple_query("select v from limited"))
    assert_cut(fed(s, result(1000), chunk=4096), delivered_rows=LIMIT // len(rows(1)[0]))


def test_the_error_message_names_no_value() -> None:
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    acts = s.on_write(result(1000, value=PAN))
    text = b"".join(a.data for a in acts if isinstance(a, SendDownstream)).split(b"54000")[-1]
    assert PAN not in text
    assert all(PAN.decode() not in str(a.record) for a in acts if isinstance(a, Event))


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=30_000), min_size=1, max_size=12),
       n=st.integers(min_value=0, max_value=300))
def test_any_split_delivers_whole_messages_within_the_limit(cuts: list[int], n: int) -> None:
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    data = result(n)
    acts: list = []  # type: ignore[type-arg]
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > pos:
            acts += s.on_write(data[pos:cut])
            pos = cut
    acts += s.on_write(data[pos:])
    out = list(pg.iter_frames(down(acts)))  # whole messages, or iter_frames raises
    payload = sum(len(m.body) + 5 for m in out if m.type == b"D")
    assert payload <= LIMIT
    row = len(rows(1)[0])
    if n * row > LIMIT:
        assert out[-1].type == b"E" and pg.decode_fields(out[-1].body)["C"] == "54000"
        assert records(acts, "statement_end")[-1]["rows"] == sum(1 for m in out if m.type == b"D")
    else:
        assert down(acts) == data


def test_config_and_cli_reach_the_session() -> None:
    from pgwarden.config import TapConfig
    from tap.runtime import Runtime, TapSettings

    assert TapConfig(auth_mode="passthrough").max_result_bytes is None
    assert TapConfig(auth_mode="passthrough", max_result_bytes=1 << 20).max_result_bytes == 1 << 20
    runtime = Runtime(settings=TapSettings(max_result_bytes=123456))
    assert SessionConfig(session_id="x", **runtime.session_options()).max_result_bytes == 123456



def test_a_cut_moves_the_results_cut_counter() -> None:
    from prometheus_client import REGISTRY

    from tap.runtime import Runtime

    def cut() -> float:
        return REGISTRY.get_sample_value("pgwarden_results_cut_total") or 0.0

    runtime = Runtime(sink=lambda _r: None)
    before = cut()
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    acts = s.on_write(result(1000))
    assert runtime.record([a.record for a in acts if isinstance(a, Event)])
    assert cut() == before + 1
    small = session_with_small_result()
    assert runtime.record([a.record for a in small if isinstance(a, Event)])
    assert cut() == before + 1  # a whole result moves nothing


def session_with_small_result() -> list:  # type: ignore[type-arg]
    s = session()
    s.on_read(pg.simple_query("select v from t"))
    return s.on_write(result(3))


def test_the_command_line_limit_overrides_the_config_file(tmp_path: Path) -> None:
    from tap.cli import _runtime_factory
    from tap.runtime import TapSettings

    config = tmp_path / "pgwarden.yaml"
    config.write_text("tap:\n  auth_mode: passthrough\n  max_result_bytes: 1048576\n")
    _, loaded = _runtime_factory(config, TapSettings())
    assert loaded.tap.max_result_bytes == 1048576  # type: ignore[attr-defined]
    _, loaded = _runtime_factory(config, TapSettings(max_result_bytes=5000))
    assert loaded.tap.max_result_bytes == 5000  # type: ignore[attr-defined]
