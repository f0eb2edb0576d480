"""The card-lookup ledger policyd keeps for the policy (input.history)."""

from __future__ import annotations

from policyd.lookups import LookupLedger

ME = ("https://idp", "fraud-bot")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_within_the_window_only() -> None:
    clock = Clock()
    ledger = LookupLedger(window=60, clock=clock)
    assert ledger.history(ME) == {"card_lookups": 0, "window_seconds": 60}
    ledger.add(ME)
    clock.now += 30
    ledger.add(ME)
    assert ledger.count(ME) == 2
    assert ledger.count(("https://idp", "other")) == 0
    clock.now += 31  # the first one is now older than the window
    assert ledger.count(ME) == 1
    clock.now += 30
    assert ledger.count(ME) == 0
    ledger.add(ME, 3)  # three lookups in one message
    assert ledger.count(ME) == 3


def test_memory_is_bounded() -> None:
    clock = Clock()
    ledger = LookupLedger(window=60, clock=clock, max_identities=2, max_per_identity=5)
    for _ in range(8):
        ledger.add(ME)
    assert ledger.count(ME) == 5  # saturates
    ledger.add(("i", "b"))
    ledger.add(("i", "c"))  # three identities: the least recently used goes
    assert ledger.count(ME) == 0
    assert ledger.count(("i", "b")) == 1 and ledger.count(("i", "c")) == 1
