"""pgwarden.metrics: every series is documented, the exposition server
answers /metrics, /healthz and /readyz as a probe or a scraper expects."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgwarden import metrics

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "metrics.md"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server() -> Iterator[tuple[metrics.ExpositionServer, list[bool]]]:
    state = [True]
    running = metrics.serve("127.0.0.1:0", ready=lambda: state[0])
    try:
        yield running, state
    finally:
        running.close()


def test_every_series_is_documented_and_every_documented_series_exists() -> None:
    # Every daemon's own series are registered when its module is imported:
    # import them all so the check does not depend on test order.
    import policyd.server  # noqa: F401

    documented = set(re.findall(r"^\| `(pgwarden_[a-z0-9_]+)`", DOC.read_text(), re.MULTILINE))
    exported = metrics.metric_names()
    assert exported - documented == set(), "undocumented series"
    assert documented - exported == set(), "documented series that do not exist"
    required = {
        "pgwarden_sessions", "pgwarden_statements_total", "pgwarden_decision_latency_seconds",
        "pgwarden_decision_cache_hits_total", "pgwarden_decision_cache_misses_total",
        "pgwarden_masked_values_total", "pgwarden_approvals_pending",
        "pgwarden_approvals_resolved_total", "pgwarden_audit_queue_depth",
        "pgwarden_audit_spool_bytes", "pgwarden_upstream_connect_errors_total",
        "pgwarden_protocol_errors_total",
    }
    assert required <= exported


def test_scrape_shows_what_was_recorded(server: tuple[metrics.ExpositionServer, list[bool]]) -> None:
    running, _ = server
    metrics.SESSIONS.labels(driver="inline").inc()
    metrics.record_decision("deny", "policyd", 0.002)
    metrics.MASKED_VALUES.labels(rule="pan_last4").inc(3)
    status, body = get(f"{running.url}/metrics")
    assert status == 200
    assert 'pgwarden_sessions{driver="inline"}' in body
    assert re.search(r'^pgwarden_statements_total\{verdict="deny"\} [1-9]', body, re.MULTILINE)
    assert 'pgwarden_decision_latency_seconds_bucket{le="0.0025",source="policyd"}' in body
    assert re.search(r'^pgwarden_masked_values_total\{rule="pan_last4"\} [3-9]', body,
                     re.MULTILINE)
    assert 'pgwarden_build_info{version="' in body
    metrics.SESSIONS.labels(driver="inline").dec()


def test_cache_hit_ratio_follows_decisions() -> None:
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    hits0 = value("pgwarden_decision_cache_hits_total")
    misses0 = value("pgwarden_decision_cache_misses_total")
    metrics.record_decision("allow", "cache", 0.00001)
    metrics.record_decision("allow", "cache", 0.00001)
    metrics.record_decision("allow", "policyd", 0.001)
    assert value("pgwarden_decision_cache_hits_total") == hits0 + 2
    assert value("pgwarden_decision_cache_misses_total") == misses0 + 1
    ratio = metrics.cache_hit_ratio()
    assert ratio is not None and 0 < ratio < 1


def test_readiness_and_liveness(server: tuple[metrics.ExpositionServer, list[bool]]) -> None:
    running, state = server
    assert get(f"{running.url}/healthz")[0] == 200
    assert get(f"{running.url}/readyz")[0] == 200
    state[0] = False  # draining: the load balancer must stop sending sessions
    assert get(f"{running.url}/readyz")[0] == 503
    assert get(f"{running.url}/healthz")[0] == 200  # still alive: don't restart it
    assert get(f"{running.url}/nope")[0] == 404


@pytest.mark.parametrize("bad", ["9090", "host:", ":9090", "host:port", "host:70000"])
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        metrics.parse_address(bad)


def test_ipv6_address_parses() -> None:
    assert metrics.parse_address("[::1]:9090") == ("::1", 9090)
