"""`pgwarden config check FILE`: validate a configuration before deploying it.

An operator runs this in CI or before a rollout, so the answer must be
complete (every problem at once, not the first one), located (the dotted
path and, when it can be found, the line in the file) and actionable (a
hint). It never prints a setting's value: a value may be a secret, or a URL
with a password in it.

Exit codes: 0 valid, 1 invalid. Warnings (valid but unwise, e.g. a password
written inline in the audit store URL) are printed and do not fail the check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
import yaml

from pgwarden.config import ConfigError, PgwardenConfig, load

app = typer.Typer(no_args_is_help=True)

# "tap.listen: ..." -> "tap.listen"; the path part of a problem string made by
# pgwarden.config._describe, or "FILE: ..." for file-level problems.
_PATH = re.compile(r"^(?P<path>[A-Za-z0-9_.\-\[\]]+|\(top level\)): ")


@dataclass(frozen=True)
class Report:
    """The outcome of a check, as the command prints it."""

    problems: list[str]
    warnings: list[str]
    summary: str

    @property
    def ok(self) -> bool:
        return not self.problems


def _key_lines(text: str) -> dict[str, int]:
    """Dotted path -> 1-based line of its key, for every mapping key of ``text``.

    Uses the YAML node graph (not a regex over lines) so flow mappings and
    nested sections resolve like the loader sees them. List items are
    addressed by index (``a.0.b``), as pydantic reports them.
    """
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines.setdefault(name, key.start_mark.line + 1)
                walk(value, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                name = f"{prefix}.{i}" if prefix else str(i)
                lines.setdefault(name, item.start_mark.line + 1)
                walk(item, name)

    if root is not None:
        walk(root, "")
    return lines


def _locate(problem: str, lines: dict[str, int]) -> int | None:
    """Line of the deepest existing ancestor of the problem's path."""
    match = _PATH.match(problem)
    if match is None:
        return None
    parts = match.group("path").split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


def _warnings(config: PgwardenConfig) -> list[str]:
    """Valid but unwise settings: things an auditor would flag."""
    out: list[str] = []
    tap = config.tap
    if tap.audit is not None:
        parts = urlsplit(tap.audit.url)
        if parts.password:
            out.append("tap.audit.url: holds a password inline (hint: use a libpq password file, "
                       "e.g. ?passfile=/run/secrets/audit.pgpass, or PGPASSWORD from a secret)")
        if parts.scheme.startswith("sqlite"):
            out.append("tap.audit.url: SQLite is for one process on one machine (hint: use a "
                       "PostgreSQL audit store when more than one tap or policyd replica runs)")
        if tap.audit.on_spool_failure == "allow":
            out.append("tap.audit.on_spool_failure: 'allow' lets statements run unrecorded when "
                       "the audit trail is down (hint: 'refuse' in production, PCI DSS 10.7.2)")
    if tap.auth_mode == "token" and tap.allow_plaintext_tokens and not tap.tls.cert_file:
        out.append("tap.allow_plaintext_tokens: tokens may cross the network in clear "
                   "(hint: loopback development only; configure tap.tls)")
    if tap.upstream_tls.sslmode in ("disable", "require"):
        out.append(f"tap.upstream_tls.sslmode: '{tap.upstream_tls.sslmode}' does not verify "
                   "PostgreSQL's certificate (hint: verify-full with ca_file)")
    if tap.auth_mode == "passthrough":
        out.append("tap.auth_mode: 'passthrough' hands database credentials to the agent "
                   "(hint: 'token' so agents never hold them, PCI DSS 8.6.2)")
    if tap.policyd is None:
        out.append("tap.policyd: not set, every statement will be refused")
    return out


def _summary(config: PgwardenConfig) -> str:
    """One line an operator can eyeball; no value that could be a secret."""
    tap = config.tap
    audit = "off"
    if tap.audit is not None:
        parts = urlsplit(tap.audit.url)
        audit = parts.scheme.split("+")[0] + (f"@{parts.hostname}" if parts.hostname else "")
    policy = tap.policyd.target if tap.policyd is not None else "none (deny all)"
    tls = "on" if tap.tls.cert_file else "off"
    return (f"tap {tap.listen} -> {tap.upstream} (auth {tap.auth_mode}, client TLS {tls}, "
            f"upstream {tap.upstream_tls.sslmode}), policyd {policy}, OPA {config.policyd.opa_url}, "
            f"audit {audit}")


def check(path: Path, environ: dict[str, str] | None = None) -> Report:
    """Validate ``path`` (with environment overrides, as the daemons would)."""
    try:
        config = load(path, environ)
    except ConfigError as exc:
        try:
            lines = _key_lines(path.read_text())
        except OSError:
            lines = {}
        problems = []
        for problem in exc.problems:
            if problem.startswith(f"{path}:"):  # file-level: unreadable, not YAML
                problems.append(problem)
                continue
            line = _locate(problem, lines)
            problems.append(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
        return Report(problems, [], "")
    return Report([], _warnings(config), _summary(config))


@app.command("check")
def check_command(
    file: Annotated[Path, typer.Argument(help="The pgwarden YAML configuration file.")],
    ignore_env: Annotated[bool, typer.Option(
        help="Ignore PGWARDEN__* environment overrides (check the file alone).")] = False,
) -> None:
    """Validate a configuration file: every problem with its place and a hint."""
    report = check(file, {} if ignore_env else None)
    for problem in report.problems:
        typer.echo(f"error: {problem}", err=True)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if not report.ok:
        n = len(report.problems)
        typer.echo(f"{file}: {n} problem{'s' if n != 1 else ''}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: OK: {report.summary}")
