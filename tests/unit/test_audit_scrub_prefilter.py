"""``line_needs_scrub``: the store and the tap skip re-scrubbing an event
whose JSON text shows nothing a scrubber could change. That is only safe if
the check never says False for a line that scrubbing would change."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.audit.events import StatementEvent, event_to_json, parse_event
from policyd.audit.scrub import line_needs_scrub, scrub_event, scrub_text
from policyd.audit.service import _scrubbed

PAN = "4111111111111111"
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJl"

# Text built from the pieces scrubbers react to, so dirty strings are common.
_PIECES = st.sampled_from([
    "4111", "1111", "5555", "4444", "3782", "8224", "6011", "0000", " ", "-", "x", "'",
    "password", "PWD=", "pass", "eyJ", "eyJhbGciOi.", "abcd.", "\\x", "34", "31", "é",
    "\u0660", "\n", "\"", "select ", "=", "\\u0034", "\\u0031", "\\u002d",
])
_TEXT = st.lists(_PIECES, max_size=14).map("".join) | st.text(max_size=40)


@settings(max_examples=3000, deadline=None)
@given(_TEXT)
def test_never_false_for_text_the_scrubber_changes(text: str) -> None:
    if scrub_text(text) != text:
        assert line_needs_scrub(json.dumps({"sql": text}))
        assert line_needs_scrub(json.dumps({"sql": text}, ensure_ascii=False))


@settings(max_examples=1000, deadline=None)
@given(_TEXT, _TEXT, st.lists(_TEXT, max_size=3))
def test_a_clean_verdict_means_scrub_event_changes_nothing(sql: str, note: str,
                                                           reasons: list[str]) -> None:
    event = StatementEvent(session_id="s", statement_seq=1, sql=sql, verdict="allow",
                           reasons=reasons, analysis={"note": note, "n": [1, note]})
    line = event_to_json(event)
    if not line_needs_scrub(line):
        assert scrub_event(event) == event


def test_each_form_is_caught() -> None:
    dirty = [
        f"select '{PAN}'", "select '4111 1111 1111 1111'", "select '4111-1111-1111-1111'",
        f"select {PAN}::int8", JWT, "alter role x password 'hunter2'", "host=h pwd=x",
        "select '\\x34313131313131313131313131313131'",
    ]
    for text in dirty:
        assert line_needs_scrub(json.dumps({"sql": text})), text
    # a PAN behind JSON escapes is still seen
    assert line_needs_scrub('{"sql":"\\u0034111111111111111"}')


def test_an_ordinary_statement_record_skips_the_second_scrub() -> None:
    # A fixed event id: a random one holds 13 digits in a row in about one
    # case in 25, which the pre-check rightly cannot tell from a PAN.
    event = StatementEvent(event_id="ab" * 16, session_id="s-1", statement_seq=7, subject="bot",
                           sql="SELECT amount, merchant FROM payments WHERE id = $1",
                           fingerprint="9aedfa76451cf50d", verdict="allow",
                           reasons=["fraud-readers may read payments"],
                           analysis={"relations": ["public.payments:read"], "params_used": [1]})
    line = event_to_json(event)
    assert not line_needs_scrub(line)
    assert _scrubbed(line.encode()) == parse_event(line)
    with_pan = event.model_copy(update={"sql": f"SELECT 1 WHERE x = '{PAN}'"})
    stored = _scrubbed(event_to_json(with_pan).encode())
    assert isinstance(stored, StatementEvent) and PAN not in stored.sql
