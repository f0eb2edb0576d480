"""Test helper: run a SpoolShipper until it has shipped its spool."""

from __future__ import annotations

import threading

from policyd.audit.writer import SpoolShipper


def ship_until_idle(shipper: SpoolShipper, timeout: float = 20.0) -> None:
    """Run ``shipper`` in a thread until nothing is left to ship, then stop
    and close it (the spool lines are stored, quarantined or still failing)."""
    thread = threading.Thread(target=shipper.run, daemon=True)
    thread.start()
    assert shipper.idle.wait(timeout), "the shipper did not get through its spool"
    shipper.stopping.set()
    shipper.notify()
    thread.join(10)
    shipper.close()
