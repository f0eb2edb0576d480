"""`pgwarden doctor`: check a running deployment end to end, in plain words.

An operator runs it when something is wrong ("agents get 'policy
unavailable'") or after a rollout. Each component is checked the way its
clients reach it, and a failure says what is wrong and what to do:

========  ==================================================================
envoy     admin ``/ready`` is LIVE, every listener accepts connections, and
          Envoy's active health checks see no unhealthy tap replica
tap       ext_proc: gRPC health SERVING; inline: accepts TCP connections
          (and ``/readyz`` answers 200 when ``tap.health_listen`` is set)
policyd   gRPC health SERVING, and the policy revision it serves equals the
          one OPA has loaded (or ``--expect-revision``)
opa       ``/health`` answers 200
maskd     gRPC health SERVING
audit     the store accepts a connection and ``SELECT 1``; PostgreSQL: not a
          read-only standby, audit tables present and INSERT granted
upstream  PostgreSQL accepts TCP connections and, when a role with
          gateway-held credentials is known, a login as that role
========  ==================================================================

A component with no known address is reported as SKIP, not as a failure.
Nothing here prints a secret: URLs are shown without their password and
credentials are only ever handed to the client library.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import typer

TapMode = Literal["inline", "extproc"]
Status = Literal["OK", "FAIL", "SKIP"]


@dataclass(frozen=True)
class CheckResult:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    hint: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass(frozen=True)
class UpstreamLoginTarget:
    """How to log in to PostgreSQL as the role the gateway injects."""

    role: str
    dbname: str = "postgres"
    secrets_file: Path | None = None
    sslmode: str = "verify-full"
    ca_file: Path | None = None
    server_hostname: str | None = None


@dataclass(frozen=True)
class Targets:
    """Where each component of the deployment is; None: not checked."""

    envoy_admin: str | None = None
    taps: tuple[tuple[TapMode, str], ...] = ()
    tap_health: str | None = None
    policyd: str | None = None
    opa_url: str | None = None
    maskd: str | None = None
    audit_url: str | None = None
    upstream: str | None = None
    upstream_login: UpstreamLoginTarget | None = None
    expected_revision: str | None = None
    timeout: float = 3.0
    # Services of policyd the taps' configuration relies on besides
    # decisions: "approval service" (tap.approvals), "audit sink"
    # (tap.audit.ship_to: policyd). policyd hosts them only with --config.
    policyd_hosts: tuple[str, ...] = ()


# ------------------------------------------------------------------ small helpers


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def redact_url(url: str) -> str:
    """``url`` without its password (shown as ``***``)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _tcp(address: str, timeout: float) -> str | None:
    """None when something accepts on ``address``, else the reason in words.

    Connects and closes without sending a byte: PostgreSQL does not log such a
    probe, and the tap treats it as a non-event.
    """
    if address.startswith("unix:"):
        path = address[len("unix:"):].lstrip("/")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect("/" + path)
            return None
        except OSError as exc:
            return _oserror(exc)
        finally:
            sock.close()
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return _oserror(exc)


def _oserror(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out (a firewall, a NetworkPolicy or a hung process)"
    if isinstance(exc, socket.gaierror):
        return f"name does not resolve ({exc.strerror})"
    if isinstance(exc, urllib.error.URLError):
        return _oserror(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    strerror = getattr(exc, "strerror", None)
    return str(strerror or exc or type(exc).__name__)


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": "pgwarden-doctor"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _grpc_health(target: str, service: str, timeout: float) -> tuple[str | None, str]:
    """(status name, problem): status SERVING with problem "" when all is well."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                return None, "not reachable (nothing answers gRPC there)"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None, f"no answer within {timeout:g}s"
            if code == grpc.StatusCode.NOT_FOUND:
                return None, f"answers gRPC but does not know the service {service!r} (wrong port?)"
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return None, "answers gRPC but has no health service (wrong port?)"
            name = code.name if code is not None else "error"
            return None, f"gRPC health check failed ({name})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status, "" if status == "SERVING" else f"reports {status}"


# ------------------------------------------------------------------------ checks


def check_envoy(admin: str, timeout: float) -> CheckResult:
    base = admin.rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    try:
        status, body = _http_get(f"{base}/ready", timeout)
    except OSError as exc:
        return CheckResult("envoy", "FAIL", f"admin {base} not reachable: {_oserror(exc)}",
                           "is Envoy running? the admin interface listens on loopback in the "
                           "shipped configs: run doctor in the Envoy pod or port-forward 9901")
    state = body.decode(errors="replace").strip()
    if status != 200 or state != "LIVE":
        return CheckResult("envoy", "FAIL", f"admin says {state or status} (not LIVE)",
                           "Envoy is starting, draining or failed to load its config: "
                           "see its log")
    try:
        _, raw = _http_get(f"{base}/listeners?format=json", timeout)
        listeners = json.loads(raw).get("listener_statuses", [])
        _, raw = _http_get(f"{base}/clusters?format=json", timeout)
        clusters = json.loads(raw).get("cluster_statuses", [])
    except (OSError, ValueError) as exc:
        return CheckResult("envoy", "FAIL", f"admin answered /ready but not /listeners or "
                           f"/clusters: {exc}", "check the admin interface is not restricted")
    problems: list[str] = []
    up: list[str] = []
    for listener in listeners:
        sock = listener.get("local_address", {}).get("socket_address", {})
        host = str(sock.get("address", "127.0.0.1"))
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        address = f"{host}:{sock.get('port_value', 0)}"
        why = _tcp(address, timeout)
        name = listener.get("name", "?")
        if why is None:
            up.append(f"{name} {address}")
        else:
            problems.append(f"listener {name} on {address}: {why}")
    if not listeners:
        problems.append("no listener is configured")
    for cluster in clusters:
        for host_status in cluster.get("host_statuses", []):
            health = host_status.get("health_status", {})
            if health.get("failed_active_health_check") or health.get("eds_health_status") in (
                    "UNHEALTHY", "TIMEOUT"):
                sock = host_status.get("address", {}).get("socket_address", {})
                problems.append(f"cluster {cluster.get('name')}: endpoint "
                                f"{sock.get('address')}:{sock.get('port_value')} fails Envoy's "
                                "health check")
    if problems:
        return CheckResult("envoy", "FAIL", "; ".join(problems),
                           "an unhealthy tap endpoint gets no new sessions: check that replica "
                           "(`pgwarden doctor --tap MODE=ADDR`) and its log")
    return CheckResult("envoy", "OK", f"LIVE; listeners up: {', '.join(up)}")


def check_tap(mode: TapMode, address: str, health: str | None, timeout: float) -> CheckResult:
    name = f"tap {mode}"
    if mode == "extproc":
        status, problem = _grpc_health(address, "", timeout)
        if problem:
            return CheckResult(name, "FAIL", f"{address}: {problem}",
                               "Envoy fails closed without it: every connection through the "
                               "ext_proc listener is refused. Start `pgwarden tap extproc` or "
                               "fix tap.listen")
        return CheckResult(name, "OK", f"{address}: gRPC health {status}")
    why = _tcp(address, timeout)
    if why is not None:
        return CheckResult(name, "FAIL", f"{address}: {why}",
                           "Envoy's tcp_proxy has nowhere to send sessions: start "
                           "`pgwarden tap inline` or fix tap.listen")
    detail = f"{address}: accepts connections"
    if health is not None:
        host, port = _split(health)
        try:
            code, _ = _http_get(f"http://{host}:{port}/readyz", timeout)
        except OSError as exc:
            return CheckResult(name, "FAIL", f"health endpoint {health}: {_oserror(exc)}",
                               "tap.health_listen is set but nothing answers there")
        if code != 200:
            return CheckResult(name, "FAIL", f"{address} accepts but /readyz says {code}",
                               "the tap is draining or cannot reach policyd or the audit store")
        detail += ", /readyz 200"
    return CheckResult(name, "OK", detail)


def opa_revision(opa_url: str, timeout: float) -> tuple[str, bool]:
    """(revision, ready) of what OPA has loaded, computed exactly as policyd does."""
    from policyd.opa import OpaEngine

    async def fetch() -> tuple[str, bool]:
        engine = OpaEngine(opa_url, deadline=timeout, revision_interval=3600)
        await engine.start()
        try:
            return engine.revision, engine.ready
        finally:
            await engine.close()

    return asyncio.run(fetch())


def policyd_revision(target: str, timeout: float) -> tuple[str, bool]:
    """(revision, opa_ready) as policyd announces it to the taps."""
    import grpc

    from pgwarden._proto import policy_pb2 as pb
    from pgwarden._proto import policy_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PolicyServiceStub(channel)  # type: ignore[no-untyped-call]
        stream = stub.WatchRevision(pb.WatchRevisionRequest(), timeout=timeout)
        try:
            first = next(iter(stream))
        finally:
            stream.cancel()
    return str(first.policy_revision), bool(first.opa_ready)


# A method of each service policyd may host, called with an empty request:
# a server without the service answers UNIMPLEMENTED; one with it answers
# otherwise (UNAUTHENTICATED for the approval service: no token, nothing
# read or recorded; the store's position of no writer for the audit sink).
_HOSTED_PROBES = {
    "approval service": "/pgwarden.approvals.v1.ApprovalService/Get",
    "audit sink": "/pgwarden.audit.v1.AuditSink/Position",
}


def policyd_missing(target: str, services: Sequence[str], timeout: float) -> list[str]:
    """Which of ``services`` policyd does not host."""
    import grpc

    missing = []
    with grpc.insecure_channel(target) as channel:
        for name in services:
            call = channel.unary_unary(_HOSTED_PROBES[name])
            try:
                call(b"", timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    missing.append(name)
    return missing


def check_policyd(target: str, opa_url: str | None, expected: str | None,
                  timeout: float, needs: Sequence[str] = ()) -> CheckResult:
    from policyd.server import SERVICE_NAME

    status, problem = _grpc_health(target, SERVICE_NAME, timeout)
    if problem:
        hint = ("policyd reports NOT_SERVING while OPA does not answer it: check the opa line"
                if status == "NOT_SERVING" else
                "start `pgwarden policyd serve` or fix tap.policyd.target")
        return CheckResult("policyd", "FAIL", f"{target}: {problem}",
                           hint + "; meanwhile the taps refuse every statement (fail closed)")
    try:
        revision, opa_ready = policyd_revision(target, timeout)
    except Exception as exc:  # a gRPC error of any kind: say it, don't crash the report
        return CheckResult("policyd", "FAIL", f"{target}: WatchRevision failed: {exc}",
                           "policyd answers health but not its policy service: version skew?")
    if not opa_ready:
        return CheckResult("policyd", "FAIL", f"{target}: OPA is not ready for policyd",
                           "check policyd.opa_url and the opa line")
    want = expected
    source = "--expect-revision"
    if want is None and opa_url is not None:
        with_opa, ready = opa_revision(opa_url, timeout)
        if ready:
            want, source = with_opa, "OPA"
    if want is not None and want != revision:
        return CheckResult("policyd", "FAIL",
                           f"{target} serves policy revision {revision}, {source} has {want}",
                           "policyd is pointed at another OPA, or has not noticed a reload yet "
                           "(it polls every second): run doctor again, then check "
                           "policyd.opa_url")
    missing = policyd_missing(target, needs, timeout)
    if missing:
        return CheckResult("policyd", "FAIL",
                           f"{target} does not host the {' and the '.join(missing)} the taps' "
                           "configuration relies on",
                           "start policyd with --config (the same file as the taps); until "
                           "then held statements are refused and the taps' audit spools grow "
                           "until they refuse every statement")
    return CheckResult("policyd", "OK", f"{target}: SERVING, policy revision {revision}")


def check_opa(opa_url: str, timeout: float) -> CheckResult:
    base = opa_url.rstrip("/")
    try:
        status, body = _http_get(f"{base}/health", timeout)
    except OSError as exc:
        return CheckResult("opa", "FAIL", f"{base} not reachable: {_oserror(exc)}",
                           "start OPA (`opa run --server rego/`, the sidecar of policyd) or fix "
                           "policyd.opa_url; until it answers every statement is refused")
    if status != 200:
        return CheckResult("opa", "FAIL", f"{base}/health answered {status}: "
                           f"{body.decode(errors='replace').strip()[:200]}",
                           "OPA runs but is not ready: do the policies compile? (`opa check rego/`)")
    return CheckResult("opa", "OK", f"{base}: healthy")


def check_maskd(target: str, timeout: float) -> CheckResult:
    from maskd.server import SERVICE_NAME

    status, problem = _grpc_health(target, SERVICE_NAME, timeout)
    if problem:
        return CheckResult("maskd", "FAIL", f"{target}: {problem}",
                           "start `pgwarden maskd serve` or fix the address; results that need "
                           "masking by maskd are refused meanwhile")
    return CheckResult("maskd", "OK", f"{target}: gRPC health {status}")


def check_audit(url: str, timeout: float) -> CheckResult:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from policyd.audit.models import StatementRecord
    from policyd.audit.store import _sqlalchemy_url, make_engine

    shown = redact_url(url)
    sa_url = make_url(_sqlalchemy_url(url))
    backend = sa_url.get_backend_name()
    if backend == "sqlite" and sa_url.database not in (None, "", ":memory:"):
        # Connecting would create an empty database: a doctor must not.
        if not Path(str(sa_url.database)).is_file():
            return CheckResult("audit", "FAIL", f"{shown}: no database file",
                               "run `pgwarden audit init` (or start policyd) to create the store")
    table = str(StatementRecord.__tablename__)
    if backend == "postgresql":
        sa_url = sa_url.update_query_dict({"connect_timeout": str(max(1, int(timeout)))})
        url = sa_url.render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
            if backend == "postgresql":
                if conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one():
                    return CheckResult("audit", "FAIL", f"{shown}: a read-only standby",
                                       "point tap.audit.url at the primary")
                exists = conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"),
                                      {"t": table}).scalar_one()
                if not exists:
                    return CheckResult("audit", "FAIL", f"{shown}: connected, but the audit "
                                       "tables are missing", "run `pgwarden audit init`")
                can = conn.execute(text("SELECT has_table_privilege(:t, 'INSERT')"),
                                   {"t": table}).scalar_one()
                if not can:
                    return CheckResult("audit", "FAIL", f"{shown}: this role may not INSERT "
                                       f"into {table}", "GRANT INSERT on the audit tables")
            elif backend == "sqlite":
                exists = conn.execute(text(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = :t"),
                    {"t": table}).scalar_one()
                if not exists:
                    return CheckResult("audit", "FAIL", f"{shown}: no audit tables",
                                       "run `pgwarden audit init`")
            conn.rollback()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return CheckResult("audit", "FAIL", f"{shown}: {reason}",
                           "the taps spool audit events and, once the spool is full, refuse "
                           "statements: fix the store URL, credentials or network")
    finally:
        engine.dispose()
    return CheckResult("audit", "OK", f"{shown}: connected, writable ({backend})")


def check_upstream(address: str, login: UpstreamLoginTarget | None,
                   timeout: float) -> CheckResult:
    why = _tcp(address, timeout)
    if why is not None:
        return CheckResult("upstream", "FAIL", f"PostgreSQL {address}: {why}",
                           "fix tap.upstream or the network path (NetworkPolicy: only the tap "
                           "may reach PostgreSQL)")
    if login is None:
        return CheckResult("upstream", "OK", f"PostgreSQL {address}: accepts connections "
                           "(no role to log in as: give --upstream-role)")
    import psycopg

    from policyd.secrets import Method, SecretsError, load_secrets

    try:
        cred = load_secrets(login.secrets_file).for_role(login.role)
    except SecretsError as exc:
        return CheckResult("upstream", "FAIL", f"no credential for role {login.role!r}: {exc}",
                           "add the role to tap.secrets_file or PGWARDEN_SECRET_* variables")
    host, port = _split(address)
    params: dict[str, Any] = {
        "host": host, "port": port, "user": login.role, "dbname": login.dbname,
        "connect_timeout": max(1, int(timeout)), "sslmode": login.sslmode,
        "application_name": "pgwarden-doctor",
    }
    if login.ca_file is not None:
        params["sslrootcert"] = str(login.ca_file)
    if login.server_hostname:
        params["host"] = login.server_hostname
        params["hostaddr"] = host if _is_ip(host) else None
    if cred.password is not None and cred.method is not Method.TRUST:
        params["password"] = cred.password.reveal()
    if cred.cert_file is not None:
        params["sslcert"] = str(cred.cert_file)
    if cred.key_file is not None:
        params["sslkey"] = str(cred.key_file)
    params = {k: v for k, v in params.items() if v is not None}
    try:
        with psycopg.connect(**params) as conn:
            row = conn.execute("SELECT current_user, current_setting('server_version')").fetchone()
    except psycopg.Error as exc:
        # libpq messages name the host, role and reason; never the password.
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return CheckResult("upstream", "FAIL", f"login as {login.role!r} on {address} failed: "
                           f"{reason}", "check the role's gateway-held credential, pg_hba.conf "
                           "and tap.upstream_tls")
    assert row is not None
    return CheckResult("upstream", "OK", f"PostgreSQL {row[1]} at {address}: logged in as "
                       f"{row[0]} ({login.sslmode})")


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------- running


def run_checks(targets: Targets) -> list[CheckResult]:
    """Every check whose target is known, in the order traffic flows."""
    t = targets.timeout
    plan: list[tuple[str, Callable[[], CheckResult] | None]] = []
    admin, policyd, opa, maskd = (targets.envoy_admin, targets.policyd, targets.opa_url,
                                  targets.maskd)
    audit, upstream = targets.audit_url, targets.upstream
    plan.append(("envoy", (lambda: check_envoy(admin, t)) if admin else None))
    for mode, address in targets.taps:
        plan.append((f"tap {mode}", _bind_tap(mode, address, targets.tap_health, t)))
    if not targets.taps:
        plan.append(("tap", None))
    plan.append(("policyd", (lambda: check_policyd(policyd, opa, targets.expected_revision, t,
                                                   targets.policyd_hosts))
                 if policyd else None))
    plan.append(("opa", (lambda: check_opa(opa, t)) if opa else None))
    plan.append(("maskd", (lambda: check_maskd(maskd, t)) if maskd else None))
    plan.append(("audit", (lambda: check_audit(audit, t)) if audit else None))
    plan.append(("upstream", (lambda: check_upstream(upstream, targets.upstream_login, t))
                 if upstream else None))
    results = []
    for name, run in plan:
        if run is None:
            results.append(CheckResult(name, "SKIP", "no address configured"))
            continue
        try:
            results.append(run())
        except Exception as exc:  # a bug in one check must not hide the others
            results.append(CheckResult(name, "FAIL", f"the check itself failed: "
                                       f"{type(exc).__name__}: {exc}"))
    return results


def _bind_tap(mode: TapMode, address: str, health: str | None,
              timeout: float) -> Callable[[], CheckResult]:
    return lambda: check_tap(mode, address, health if mode == "inline" else None, timeout)


def render(results: Iterable[CheckResult]) -> str:
    """The report as printed: one line per check, the hint indented below."""
    lines = []
    for r in results:
        lines.append(f"{r.status:<4}  {r.name:<12} {r.detail}")
        if r.hint and r.status == "FAIL":
            lines.append(f"{'':<6}{'':<12} hint: {r.hint}")
    failed = [r.name for r in results if r.failed]
    lines.append(f"{len(failed)} problem{'s' if len(failed) != 1 else ''}"
                 + (f": {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def wait_for(targets: Targets, names: Sequence[str], status: Status,
             attempts: int = 50, pause: float = 0.2) -> list[CheckResult]:
    """Run the checks until each of ``names`` has ``status`` (bounded);
    for scripts and tests that just started or stopped a component."""
    results: list[CheckResult] = []
    for _ in range(attempts):
        results = run_checks(targets)
        by_name = {r.name: r.status for r in results}
        if all(by_name.get(n) == status for n in names):
            return results
        time.sleep(pause)
    return results


# --------------------------------------------------------------------------- CLI


def targets_from(config_path: Path | None, *, envoy_admin: str | None, taps: Sequence[str],
                 tap_mode: TapMode, policyd: str | None, opa_url: str | None,
                 maskd: str | None, audit_url: str | None, upstream: str | None,
                 upstream_role: str | None, upstream_dbname: str,
                 expect_revision: str | None, timeout: float) -> Targets:
    """Targets from the configuration file (defaults when none), command-line
    options winning. Raises ConfigError for a broken file."""
    from pgwarden.config import PgwardenConfig, load

    config = load(config_path) if config_path is not None else PgwardenConfig()
    tap = config.tap
    tap_list: list[tuple[TapMode, str]] = []
    for spec in taps:
        mode, sep, address = spec.partition("=")
        if not sep or mode not in ("inline", "extproc"):
            raise ValueError(f"--tap expects MODE=HOST:PORT with MODE inline or extproc, "
                             f"got {spec!r}")
        tap_list.append((mode, address))  # type: ignore[arg-type]
    if not tap_list:
        tap_list.append((tap_mode, tap.listen))
    role = upstream_role if upstream_role is not None else tap.catalog_role
    login = None
    if role:
        login = UpstreamLoginTarget(
            role=role, dbname=upstream_dbname, secrets_file=tap.secrets_file,
            sslmode=tap.upstream_tls.sslmode, ca_file=tap.upstream_tls.ca_file,
            server_hostname=tap.upstream_tls.server_hostname)
    return Targets(
        envoy_admin=envoy_admin,
        taps=tuple(tap_list),
        tap_health=tap.health_listen,
        policyd=policyd or (tap.policyd.target if tap.policyd is not None else None),
        opa_url=opa_url or config.policyd.opa_url,
        maskd=maskd,
        audit_url=audit_url or (tap.audit.url if tap.audit is not None else None),
        upstream=upstream or tap.upstream,
        upstream_login=login,
        expected_revision=expect_revision,
        timeout=timeout,
        policyd_hosts=tuple(
            name for name, needed in (
                ("approval service", tap.policyd is not None and tap.approvals),
                ("audit sink", tap.audit is not None and tap.audit.ship_to == "policyd"))
            if needed),
    )


def doctor_command(
    config: Annotated[Path | None, typer.Option(help="pgwarden YAML configuration file.")] = None,
    envoy_admin: Annotated[str, typer.Option(
        help="Envoy admin URL ('none': Envoy not checked). The shipped production config "
             "keeps it on the pod's loopback.")] = "http://127.0.0.1:9901",
    tap: Annotated[list[str] | None, typer.Option(
        "--tap", help="MODE=HOST:PORT of a tap replica (repeat); default: tap.listen.")] = None,
    tap_mode: Annotated[str, typer.Option(
        help="Driver of the tap at tap.listen: extproc | inline.")] = "extproc",
    policyd: Annotated[str | None, typer.Option(help="policyd HOST:PORT.")] = None,
    opa_url: Annotated[str | None, typer.Option(help="OPA base URL.")] = None,
    maskd: Annotated[str | None, typer.Option(
        help="maskd HOST:PORT (omit: maskd not checked).")] = None,
    audit_url: Annotated[str | None, typer.Option(help="Audit store URL.")] = None,
    upstream: Annotated[str | None, typer.Option(help="PostgreSQL HOST:PORT.")] = None,
    upstream_role: Annotated[str | None, typer.Option(
        help="Log in to PostgreSQL as this role with its gateway-held credential "
             "(default: tap.catalog_role).")] = None,
    upstream_dbname: Annotated[str, typer.Option(help="Database for that login.")] = "postgres",
    expect_revision: Annotated[str | None, typer.Option(
        help="Policy revision policyd must serve (default: the one OPA has loaded).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per probe.")] = 3.0,
) -> None:
    """Check a running deployment end to end; exit 1 when anything is wrong."""
    from pgwarden.config import ConfigError
    from pgwarden.logs import configure

    configure("critical")  # library log lines would interleave with the report
    if tap_mode not in ("inline", "extproc"):
        raise typer.BadParameter("extproc or inline", param_hint="--tap-mode")
    try:
        targets = targets_from(
            config, envoy_admin=None if envoy_admin.lower() == "none" else envoy_admin,
            taps=tap or [], tap_mode=tap_mode,  # type: ignore[arg-type]
            policyd=policyd, opa_url=opa_url, maskd=maskd, audit_url=audit_url,
            upstream=upstream, upstream_role=upstream_role, upstream_dbname=upstream_dbname,
            expect_revision=expect_revision, timeout=timeout)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        typer.echo("the configuration is invalid: `pgwarden config check` it first", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tap") from exc
    results = run_checks(targets)
    typer.echo(render(results))
    if any(r.failed for r in results):
        raise typer.Exit(1)
