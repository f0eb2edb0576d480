"""Prometheus metrics shared by every pgwarden daemon (tap, policyd, maskd).

One module defines every series so that names, labels and buckets are the
same whichever process exports them, and so docs/metrics.md has a single
source to describe (a test checks the two agree). Each daemon is its own
process with its own default registry; a series a daemon never touches is
still exported (at zero, or without samples for labelled series) which keeps
dashboards and alerts simple.

Label values are bounded sets chosen by the code (driver, verdict, rule
name, reason), never a user, a statement, a table or a session id: those
belong in the audit trail, not in a time series database.

Usage from a daemon::

    from pgwarden import metrics

    server = metrics.serve("0.0.0.0:9090", ready=lambda: runtime.accepting)
    metrics.SESSIONS.labels(driver="inline").inc()
    with metrics.DECISION_LATENCY.labels(source="policyd").time():
        decision = await client.decide(request)
    metrics.STATEMENTS.labels(verdict=decision.verdict.value).inc()
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

NAMESPACE = "pgwarden"

DRIVERS = ("inline", "extproc")
VERDICTS = ("allow", "deny", "hold")
DECISION_SOURCES = ("cache", "policyd")
APPROVAL_OUTCOMES = ("approved", "rejected", "expired", "cancelled")
UPSTREAM_ERROR_REASONS = ("refused", "timeout", "tls", "auth", "other")
PROTOCOL_DIRECTIONS = ("frontend", "backend")

# Decisions are answered from the tap's cache in microseconds and by policyd
# (pglast + OPA over loopback) in about a millisecond; the policy deadline is
# 1 s by default, so buckets stop a little past it. Held statements are not
# observed here: a human approval is not latency.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# --------------------------------------------------------------------- sessions
SESSIONS = Gauge(
    "sessions", "Client sessions open now, by tap driver.",
    ["driver"], namespace=NAMESPACE)
SESSIONS_OPENED = Counter(
    "sessions_opened", "Client sessions accepted since start, by tap driver.",
    ["driver"], namespace=NAMESPACE)

# ------------------------------------------------------------------- statements
STATEMENTS = Counter(
    "statements", "Statements decided, by verdict (allow, deny, hold).",
    ["verdict"], namespace=NAMESPACE)
DECISION_LATENCY = Histogram(
    "decision_latency_seconds",
    "Time to obtain a verdict for one statement, by where it came from (cache, policyd).",
    ["source"], namespace=NAMESPACE, buckets=DECISION_BUCKETS)
DECISION_CACHE_HITS = Counter(
    "decision_cache_hits", "Statements answered from the tap's decision cache.",
    namespace=NAMESPACE)
DECISION_CACHE_MISSES = Counter(
    "decision_cache_misses", "Statements the decision cache could not answer (asked policyd).",
    namespace=NAMESPACE)
POLICY_UNAVAILABLE = Counter(
    "policy_unavailable", "Statements refused because policyd or OPA did not answer (fail closed).",
    namespace=NAMESPACE)

# ---------------------------------------------------------------------- masking
MASKED_VALUES = Counter(
    "masked_values", "Values masked in results, COPY, errors and notices, by masking rule.",
    ["rule"], namespace=NAMESPACE)
RESULTS_CUT = Counter(
    "results_cut", "Sessions ended because one result passed tap.max_result_bytes.",
    namespace=NAMESPACE)

# -------------------------------------------------------------------- approvals
APPROVALS_PENDING = Gauge(
    "approvals_pending", "Statements held now, waiting for a human approval.",
    namespace=NAMESPACE)
APPROVALS_RESOLVED = Counter(
    "approvals_resolved", "Held statements resolved, by outcome.",
    ["outcome"], namespace=NAMESPACE)

# ------------------------------------------------------------------------ audit
AUDIT_QUEUE_DEPTH = Gauge(
    "audit_queue_depth", "Audit events accepted but not yet stored, by component.",
    ["component"], namespace=NAMESPACE)
AUDIT_SPOOL_BYTES = Gauge(
    "audit_spool_bytes", "Bytes in the local audit spool (events waiting for the store).",
    ["component"], namespace=NAMESPACE)
AUDIT_WRITE_ERRORS = Counter(
    "audit_write_errors", "Failed attempts to write audit events to the store, by component.",
    ["component"], namespace=NAMESPACE)

# ------------------------------------------------------------- upstream, protocol
UPSTREAM_CONNECT_ERRORS = Counter(
    "upstream_connect_errors", "Failed connections from the tap to PostgreSQL, by reason.",
    ["reason"], namespace=NAMESPACE)
PROTOCOL_ERRORS = Counter(
    "protocol_errors",
    "Malformed or oversized PostgreSQL protocol messages, by direction (frontend: from the "
    "client, backend: from the server).",
    ["direction"], namespace=NAMESPACE)

BUILD_INFO = Info("build", "The pgwarden version this process runs.", namespace=NAMESPACE)


def _package_version() -> str:
    try:
        return version("pgwarden")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


BUILD_INFO.info({"version": _package_version()})


def record_decision(verdict: str, source: str, seconds: float) -> None:
    """Count one statement's verdict and its latency, with the cache counters.

    One call per decided statement keeps the four series consistent: the
    hit ratio is ``hits / (hits + misses)`` and ``sum(statements)`` equals the
    histogram's count plus the held statements resumed from approval.
    """
    STATEMENTS.labels(verdict=verdict).inc()
    DECISION_LATENCY.labels(source=source).observe(seconds)
    if source == "cache":
        DECISION_CACHE_HITS.inc()
    else:
        DECISION_CACHE_MISSES.inc()


def cache_hit_ratio(registry: CollectorRegistry = REGISTRY) -> float | None:
    """Hits / lookups since start, or None before the first lookup (for logs
    and `pgwarden doctor`; dashboards compute it from the rates instead)."""
    hits = registry.get_sample_value(f"{NAMESPACE}_decision_cache_hits_total") or 0.0
    misses = registry.get_sample_value(f"{NAMESPACE}_decision_cache_misses_total") or 0.0
    total = hits + misses
    return hits / total if total else None


# ------------------------------------------------------------------ exposition


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9090`` for IPv6) into a bind pair; port 0 picks one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT for the metrics address, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass
class ExpositionServer:
    """A running metrics/health HTTP server; ``close()`` stops it."""

    host: str
    port: int
    _server: ThreadingHTTPServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(registry: CollectorRegistry, ready: Callable[[], bool] | None,
             live: Callable[[], bool] | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """GET /metrics, /healthz (liveness), /readyz (readiness)."""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/livez"):
                ok = live() if live is not None else True
                self._send(200 if ok else 503, b"ok\n" if ok else b"not live\n")
            elif path == "/readyz":
                ok = ready() if ready is not None else True
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Scrapes every few seconds would drown the structured log.
            return

    return Handler


def serve(address: str, *, ready: Callable[[], bool] | None = None,
          live: Callable[[], bool] | None = None,
          registry: CollectorRegistry = REGISTRY) -> ExpositionServer:
    """Start the exposition server on ``address`` in a daemon thread.

    Besides ``/metrics`` it answers ``/healthz`` (liveness: ``live()``, default
    always true) and ``/readyz`` (readiness: ``ready()``, default always
    true), so a daemon without gRPC (the inline tap) gets Kubernetes probes
    from the same port. A daemon that drains on SIGTERM should make
    ``ready()`` false first so the load balancer stops sending new sessions.
    """
    host, port = parse_address(address)
    server_cls = ThreadingHTTPServer
    if ":" in host:
        import socket

        class _V6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_cls = _V6
    server = server_cls((host, port), _handler(registry, ready, live))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return ExpositionServer(host, int(server.server_address[1]), server, thread)


def metric_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Names of the pgwarden series as exposed (``_total`` included), for the
    documentation test and `pgwarden doctor`."""
    names: set[str] = set()
    for family in registry.collect():
        if not family.name.startswith(f"{NAMESPACE}_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "info":
            names.add(f"{family.name}_info")
        else:
            names.add(family.name)
    return names
