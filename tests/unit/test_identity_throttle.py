"""Brute-force slow-down: per source, exponential, bounded, forgetful."""

from __future__ import annotations

import pytest

from policyd.identity import FailureThrottle, ThrottleSettings, source_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(**kw: float) -> tuple[FailureThrottle, FakeClock]:
    clock = FakeClock()
    settings = ThrottleSettings.model_validate(
        {"base_delay": 1.0, "max_delay": 8.0, "window_seconds": 60.0, "free_failures": 2, **kw}
    )
    return FailureThrottle(settings=settings, clock=clock), clock


def test_free_failures_then_exponential_up_to_max() -> None:
    t, _ = make()
    delays = [t.record_failure("10.0.0.1") for _ in range(8)]
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert t.delay_for("10.0.0.1") == 8.0
    assert t.delay_for("10.0.0.2") == 0.0  # other sources are not punished


def test_window_forgets_quiet_sources() -> None:
    t, clock = make()
    for _ in range(5):
        t.record_failure("10.0.0.1")
    clock.now += 30
    assert t.delay_for("10.0.0.1") == 4.0  # still within the window of the last failure
    clock.now += 61
    assert t.delay_for("10.0.0.1") == 0.0
    assert t.record_failure("10.0.0.1") == 0.0


def test_success_clears() -> None:
    t, _ = make()
    for _ in range(4):
        t.record_failure("10.0.0.1")
    t.record_success("10.0.0.1")
    assert t.failures("10.0.0.1") == 0


def test_ports_and_ipv6_prefixes_share_a_bucket() -> None:
    t, _ = make()
    t.record_failure("10.0.0.1:5000")
    t.record_failure("10.0.0.1:5001")
    t.record_failure("10.0.0.1")
    assert t.failures("10.0.0.1") == 3
    t.record_failure("2001:db8::1")
    t.record_failure("[2001:db8::ffff]:6432")
    assert t.failures("2001:db8::42") == 2
    assert source_key("::ffff:10.0.0.9") == "10.0.0.9"
    assert source_key("") == "local"


def test_memory_is_bounded() -> None:
    t, _ = make(max_tracked=3)
    for i in range(10):
        t.record_failure(f"10.0.0.{i}")
    assert len(t) == 3
    assert t.failures("10.0.0.9") == 1
    assert t.failures("10.0.0.0") == 0


def test_long_attack_does_not_overflow() -> None:
    t, _ = make(max_delay=30.0)
    for _ in range(5000):
        delay = t.record_failure("10.0.0.1")
    assert delay == 30.0


@pytest.mark.parametrize("free", [0, 1])
def test_no_free_failures(free: int) -> None:
    t, _ = make(free_failures=free)
    for _ in range(free):
        assert t.record_failure("h") == 0.0
    assert t.record_failure("h") == 1.0
