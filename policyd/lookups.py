"""How many card lookups an identity made lately: the policy's memory.

A masked identity may look a card up by value (``card_number = $1``), one
value per statement. Each new value is a new question about the card
numbers; enough of them enumerate the digits the mask hides (the middle six
of a card whose first six and last four are known are 10^5 candidates after
the Luhn check). The pack therefore limits lookups per identity in a sliding
window. OPA keeps no state between queries, so policyd counts: the decision
document says how many lookups a message makes (``"card_lookups": n``),
policyd remembers when it allowed them, and puts the count of the window
into the next input (``input.history``).

Limits of this memory, documented in docs/policy-authors.md: it lives in one
policyd process (a restart or a second replica starts from zero), and
decisions in flight at the same moment for one identity each see the count
from before the others (the overshoot is at most the identity's concurrent
sessions).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW_SECONDS = 3600.0
# Identities remembered at once (least recently used forgotten first), and
# timestamps kept per identity: a count is exact up to this value and then
# saturates, which is far above any sensible limit.
MAX_IDENTITIES = 100_000
MAX_PER_IDENTITY = 10_000


class LookupLedger:
    def __init__(self, window: float = WINDOW_SECONDS, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_identities: int = MAX_IDENTITIES,
                 max_per_identity: int = MAX_PER_IDENTITY) -> None:
        self.window = window
        self.clock = clock
        self.max_identities = max_identities
        self.max_per_identity = max_per_identity
        self._seen: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def count(self, key: tuple[str, str]) -> int:
        """Lookups allowed to ``key`` (issuer, subject) within the window."""
        times = self._seen.get(key)
        if times is None:
            return 0
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._seen[key]
            return 0
        return len(times)

    def add(self, key: tuple[str, str], n: int = 1) -> None:
        """Count ``n`` lookups of ``key`` now."""
        times = self._seen.get(key)
        if times is None:
            times = self._seen[key] = deque(maxlen=self.max_per_identity)
            if len(self._seen) > self.max_identities:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(key)
        times.extend([self.clock()] * min(n, self.max_per_identity))

    def history(self, key: tuple[str, str]) -> dict[str, int]:
        """``input.history`` for a decision of ``key``."""
        return history_input(self.count(key), self.window)


def history_input(card_lookups: int, window: float = WINDOW_SECONDS) -> dict[str, int]:
    """The ``input.history`` document (docs/policy-input.schema.json)."""
    return {"card_lookups": card_lookups, "window_seconds": round(window)}
