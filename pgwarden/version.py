"""`pgwarden version`: what this gateway is and what it runs against.

Asked for in every bug report and every change record, so it reports the
pieces whose versions change behaviour: pgwarden itself, Python, the Envoy
and OPA binaries found the way the stack finds them, the PostgreSQL server
(with ``--dsn``) and the wire protocol versions the tap speaks. A component
that cannot be found is reported as such instead of failing the command.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer


@dataclass(frozen=True)
class Versions:
    pgwarden: str
    python: str
    envoy: str
    opa: str
    postgresql: str | None
    protocols: tuple[str, ...]


def pgwarden_version() -> str:
    try:
        return version("pgwarden")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


def protocol_versions() -> tuple[str, ...]:
    """The PostgreSQL frontend/backend protocol versions the tap accepts."""
    from tap import protocol as pg

    return tuple(f"{v >> 16}.{v & 0xFFFF}" for v in (pg.PROTOCOL_3_0, pg.PROTOCOL_3_2))


def _run(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return (out.stdout or out.stderr).strip()


def envoy_version() -> str:
    """``1.40.0 (9e55809..., RELEASE, BoringSSL)`` from ``envoy --version``."""
    from pgwarden.stack import StackError, envoy_binary

    try:
        text = _run([envoy_binary(), "--version"])
    except (StackError, OSError, subprocess.SubprocessError) as exc:
        return f"not found ({exc})"
    # "envoy  version: <sha>/<version>/<Clean|Modified>/<RELEASE|DEBUG>/<ssl>"
    match = re.search(r"version:\s*([0-9a-f]+)/([^/\s]+)/[^/\s]+/([^/\s]+)/(\S+)", text)
    if match is None:
        return text.splitlines()[-1] if text else "unknown"
    sha, ver, build, ssl = match.groups()
    return f"{ver} ({sha[:12]}, {build}, {ssl})"


def opa_version() -> str:
    from policyd.opa_process import OpaNotFound, find_opa

    try:
        text = _run([find_opa(), "version"])
    except (OpaNotFound, OSError, subprocess.SubprocessError) as exc:
        return f"not found ({exc})"
    match = re.search(r"^Version:\s*(\S+)", text, re.MULTILINE)
    return match.group(1) if match else (text.splitlines()[0] if text else "unknown")


def postgresql_version(dsn: str) -> str:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=5, application_name="pgwarden-version") as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return f"unreachable ({reason})"
    return str(row[0]) if row else "unknown"


def collect(dsn: str | None = None) -> Versions:
    return Versions(
        pgwarden=pgwarden_version(),
        python=f"{platform.python_version()} ({platform.python_implementation()})",
        envoy=envoy_version(),
        opa=opa_version(),
        postgresql=postgresql_version(dsn) if dsn else None,
        protocols=protocol_versions(),
    )


def version_command(
    dsn: Annotated[str | None, typer.Option(
        help="libpq DSN of a PostgreSQL server to report the version of.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print the pgwarden, Python, Envoy, OPA, PostgreSQL and protocol versions."""
    found = collect(dsn)
    if as_json:
        typer.echo(json.dumps(asdict(found)))
        return
    typer.echo(f"pgwarden    {found.pgwarden}")
    typer.echo(f"python      {found.python}")
    typer.echo(f"envoy       {found.envoy}")
    typer.echo(f"opa         {found.opa}")
    if found.postgresql is not None:
        typer.echo(f"postgresql  {found.postgresql}")
    typer.echo(f"protocol    {', '.join(found.protocols)}")
