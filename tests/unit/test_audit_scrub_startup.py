"""Start-up parameters are the client's text: a card number a client puts in
its application_name, user name or database name must not reach the audit
store or the spool raw (PCI DSS 3.5.1), while the identity from the token
stays as given."""

from __future__ import annotations

from policyd.audit.events import AuthEvent, SessionStartEvent, event_to_json
from policyd.audit.scrub import line_needs_scrub, scrub_event

PAN = "4111111111111111"


def test_session_start_parameters_are_scrubbed_identity_kept() -> None:
    event = SessionStartEvent(session_id="s", subject="bot-7", groups=["fraud-readers"],
                              client_addr="127.0.0.1:5", user=f"u{PAN}",
                              database=f"db {PAN}", application_name=f"job {PAN}")
    assert line_needs_scrub(event_to_json(event))
    clean = scrub_event(event)
    line = event_to_json(clean)
    assert PAN not in line
    assert clean.application_name.endswith("1111") and clean.application_name.startswith("job ")
    assert (clean.subject, clean.groups, clean.client_addr) == ("bot-7", ["fraud-readers"],
                                                                "127.0.0.1:5")


def test_failed_login_parameters_are_scrubbed() -> None:
    event = AuthEvent(session_id="s", outcome="failure", reason="bad_signature",
                      user=PAN, database=f"{PAN}db")
    line = event_to_json(scrub_event(event))
    assert PAN not in line and "bad_signature" in line


def test_ordinary_names_are_unchanged() -> None:
    event = SessionStartEvent(session_id="s", subject="bot", user="agent", database="shop",
                              application_name="pgwarden-nightly-42")
    assert scrub_event(event) == event
