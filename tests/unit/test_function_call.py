"""A protocol-level FunctionCall names its function by OID only. The tap asks
its catalog for the name and lets the policy decide on the same call written
in SQL (``SELECT "schema"."name"($1, ...)``); an OID the catalog does not
know stays opaque and is refused, as before."""

from __future__ import annotations

import asyncio
import struct

import pytest
from test_session import SERVER_HELLO, events, ready_session, up

from tap import protocol as pg
from tap.actions import NeedDecision, SendDownstream
from tap.catalog import Catalog
from tap.hooks import ALLOW_ALL, Decision, StatementRequest
from tap.session import Hooks, Session, SessionConfig

LOREAD = 954


def function_call(oid: int, args: list[bytes | None], formats: tuple[int, ...] = (0,),
                  result_format: int = 1) -> bytes:
    body = struct.pack("!Ih", oid, len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(args))
    for a in args:
        body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
    body += struct.pack("!h", result_format)
    return pg.Message(b"F", body).encode()


def test_function_call_decodes() -> None:
    call = pg.decode_function_call(function_call(LOREAD, [b"\x00\x00\x00\x01", None])[5:])
    assert (call.oid, call.arg_formats, call.args, call.result_format) == (
        LOREAD, (0,), (b"\x00\x00\x00\x01", None), 1)


@pytest.mark.parametrize("cut", [3, 5, 9, 14])
def test_a_truncated_function_call_is_a_protocol_error(cut: int) -> None:
    body = function_call(LOREAD, [b"abcd"])[5:]
    with pytest.raises(pg.ProtocolError):
        pg.decode_function_call(body[:cut])


def test_a_negative_argument_count_is_a_protocol_error() -> None:
    body = struct.pack("!Ihhh", LOREAD, 0, -1, 0)
    with pytest.raises(pg.ProtocolError):
        pg.decode_function_call(body)


def _session_asking(names: dict[int, str]) -> tuple[Session, list[tuple[str, int]]]:
    asked: list[tuple[str, int]] = []

    def function_name(database: str, oid: int) -> str | None:
        asked.append((database, oid))
        return names.get(oid)

    s, _ = ready_session(Hooks(decide_cached=lambda r: None, function_name=function_name))
    return s, asked


def test_a_known_function_is_decided_as_its_sql_call() -> None:
    s, asked = _session_asking({LOREAD: '"pg_catalog"."loread"'})
    assert asked == [("shop", 0)]  # the catalog starts loading when the session is ready
    acts = s.on_read(function_call(LOREAD, [b"1", b"100"]))
    need = [a for a in acts if isinstance(a, NeedDecision)]
    assert len(need) == 1 and up(acts) == b""
    assert need[0].request.sql == 'SELECT "pg_catalog"."loread"($1, $2)'
    assert need[0].request.path == "function_call"
    acts = s.on_decision(need[0].ticket, ALLOW_ALL)
    assert up(acts) == function_call(LOREAD, [b"1", b"100"])  # forwarded unchanged
    assert events(acts, "statement")[0]["sql"] == 'SELECT "pg_catalog"."loread"($1, $2)'


def test_an_unknown_function_stays_opaque() -> None:
    s, _ = _session_asking({})
    acts = s.on_read(function_call(123456, []))
    need = [a for a in acts if isinstance(a, NeedDecision)]
    assert need[0].request.sql == "<function call oid 123456>"


def test_without_a_catalog_every_function_call_is_opaque() -> None:
    s, _ = ready_session(Hooks(decide_cached=lambda r: None))
    acts = s.on_read(function_call(LOREAD, [b"1"]))
    assert next(a for a in acts if isinstance(a, NeedDecision)).request.sql == (
        f"<function call oid {LOREAD}>")


def test_a_malformed_function_call_ends_the_session_with_08P01() -> None:
    s, _ = ready_session(Hooks(decide_cached=lambda r: None))
    acts = s.on_read(pg.Message(b"F", struct.pack("!Ih", LOREAD, 3)).encode())
    assert events(acts, "protocol_error")


def test_catalog_names_functions_quoted() -> None:
    async def loader(database: str) -> tuple[list[tuple[int, int, str, str, str]],
                                             list[tuple[int, str, str, int]]]:
        return ([(16384, 2, "public", "payments", "card_number")],
                [(LOREAD, "pg_catalog", "loread", 17), (99999, "odd schema", 'Quo"te', 25)])

    catalog = Catalog(loader)
    asyncio.run(catalog.load_now("shop"))
    assert catalog.function_name("shop", LOREAD) == '"pg_catalog"."loread"'
    assert catalog.function_name("shop", 99999) == '"odd schema"."Quo""te"'
    assert catalog.function_name("shop", 1) is None
    assert catalog.function_name("other", LOREAD) is None  # not loaded for that database
    assert catalog.resolver("shop")(16384, 2) == "public.payments.card_number"
    assert catalog.function_result_type("shop", LOREAD) == 17  # bytea
    assert catalog.function_result_type("other", LOREAD) is None
    assert pg.quote_ident('a"b') == '"a""b"'


def test_a_session_without_a_database_parameter_uses_the_user_name() -> None:
    asked: list[tuple[str, int]] = []
    s = Session(SessionConfig(session_id="s"), Hooks(
        function_name=lambda db, oid: asked.append((db, oid)) or None))
    s.on_read(pg.encode_startup({"user": "app"}))
    s.on_write(SERVER_HELLO)
    assert asked == [("app", 0)]


def test_the_first_call_before_the_catalog_is_loaded_waits_for_it() -> None:
    """The session cannot wait (it is sans-IO): it sends the call opaque;
    the runtime waits for the catalog's first load, names the function and
    asks the policy about the named call; the session records that name."""
    from tap.runtime import Runtime

    loaded = asyncio.Event()

    async def loader(database: str) -> tuple[list[tuple[int, int, str, str, str]],
                                             list[tuple[int, str, str, int]]]:
        await loaded.wait()
        return [], [(LOREAD, "pg_catalog", "loread", 17)]

    seen: list[str] = []

    async def decider(request: StatementRequest) -> Decision:
        seen.append(request.sql)
        return ALLOW_ALL

    async def scenario() -> list[str]:
        catalog = Catalog(loader)
        runtime = Runtime(decider=decider)
        runtime.catalog = catalog
        s, _ = ready_session(Hooks(decide_cached=lambda r: None,
                                   function_name=catalog.function_name))
        acts = s.on_read(function_call(LOREAD, [b"1", b"2"]))
        need = next(a for a in acts if isinstance(a, NeedDecision))
        assert need.request.sql == f"<function call oid {LOREAD}>"  # not loaded yet
        pending = asyncio.ensure_future(runtime.decide(need.request))
        await asyncio.sleep(0.05)
        assert not pending.done()  # waiting for the catalog, not refused
        loaded.set()
        decision = await pending
        acts = s.on_decision(need.ticket, decision)
        assert up(acts) == function_call(LOREAD, [b"1", b"2"])
        return [e["sql"] for e in events(acts, "statement")]

    recorded = asyncio.run(scenario())
    assert seen == ['SELECT "pg_catalog"."loread"($1, $2)']
    assert recorded == ['SELECT "pg_catalog"."loread"($1, $2)']


def test_an_unknown_oid_stays_opaque_after_the_load() -> None:
    from tap.runtime import Runtime

    async def loader(database: str) -> tuple[list[tuple[int, int, str, str, str]],
                                             list[tuple[int, str, str, int]]]:
        return [], [(LOREAD, "pg_catalog", "loread", 17)]

    seen: list[str] = []

    async def decider(request: StatementRequest) -> Decision:
        seen.append(request.sql)
        return ALLOW_ALL

    async def scenario() -> None:
        runtime = Runtime(decider=decider)
        runtime.catalog = Catalog(loader)
        s, _ = ready_session(Hooks(decide_cached=lambda r: None,
                                   function_name=runtime.catalog.function_name))
        need = next(a for a in s.on_read(function_call(4242, []))
                    if isinstance(a, NeedDecision))
        await runtime.decide(need.request)

    asyncio.run(scenario())
    assert seen == ["<function call oid 4242>"]


def _masked_session(result_types: dict[int, int], decision: Decision = ALLOW_ALL) -> Session:
    from tap.masking import MaskingFactory

    factory = MaskingFactory(key=b"k" * 32, catalog=lambda _db: lambda t, c: None)
    s, _ = ready_session(Hooks(decide_cached=lambda r: decision, masker_factory=factory,
                               function_name=lambda db, oid: '"pg_catalog"."upper"',
                               function_result_type=lambda db, oid: result_types.get(oid)))
    return s


def _function_result(value: bytes | None) -> bytes:
    body = struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return pg.Message(b"V", body).encode()


UPPER, ABS8 = 871, 1396
PAN = b"4111111111111111"


def _call_and_answer(s: Session, oid: int, result_format: int, value: bytes | None) -> bytes:
    s.on_read(function_call(oid, [b"x"], result_format=result_format))
    acts = s.on_write(_function_result(value) + pg.ready_for_query(b"I"))
    return b"".join(a.data for a in acts if isinstance(a, SendDownstream))


def test_a_function_call_result_in_text_is_masked() -> None:
    out = list(pg.iter_frames(_call_and_answer(_masked_session({UPPER: 25}), UPPER, 0,
                                               b"card " + PAN)))
    assert [m.type for m in out] == [b"V", b"Z"]
    value = out[0].body[4:]
    assert PAN not in value and value.endswith(b"1111") and value.startswith(b"card ")


def test_a_function_call_result_as_binary_int8_is_masked_by_its_type() -> None:
    raw = int(PAN).to_bytes(8, "big")
    out = list(pg.iter_frames(_call_and_answer(_masked_session({ABS8: 20}), ABS8, 1, raw)))
    assert [m.type for m in out] == [b"V", b"Z"]
    assert out[0].body[4:] != raw and struct.unpack("!i", out[0].body[:4])[0] == 8


def test_a_null_or_harmless_function_result_passes_unchanged() -> None:
    s = _masked_session({UPPER: 25})
    assert _call_and_answer(s, UPPER, 0, None).startswith(_function_result(None))
    assert _call_and_answer(s, UPPER, 0, b"HELLO").startswith(_function_result(b"HELLO"))


def test_an_unmasked_decision_passes_the_result_raw() -> None:
    from tap.hooks import MaskPlan, Verdict

    raw = Decision(verdict=Verdict.ALLOW, mask=MaskPlan(unmasked=True, scan_content=False))
    out = _call_and_answer(_masked_session({UPPER: 25}, raw), UPPER, 0, PAN)
    assert out.startswith(_function_result(PAN))
