"""`pgwarden token init|mint|rotate`: the development issuer from the shell.

`mint` prints the token and nothing else on stdout, so it composes:
``PGPASSWORD=$(pgwarden token mint --sub ci-bot --groups analysts) psql ...``.
Everything informative goes to stderr.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pgwarden.devissuer import (
    DEFAULT_AUDIENCE,
    DEFAULT_GRACE_SECONDS,
    DEFAULT_KEYS_DIR,
    DevIssuerError,
    ensure_dev_keys,
)

app = typer.Typer(no_args_is_help=True)

_KEYS_HELP = "Development keys directory (env PGWARDEN_DEV_KEYS)."


def _keys_dir(keys: Path | None) -> Path:
    if keys is not None:
        return keys
    return Path(os.environ.get("PGWARDEN_DEV_KEYS", str(DEFAULT_KEYS_DIR)))


KeysOption = Annotated[Path | None, typer.Option("--keys", help=_KEYS_HELP)]


@app.command()
def init(
    keys: KeysOption = None,
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="EdDSA or ES256 (only when creating).")
    ] = "EdDSA",
) -> None:
    """Create the development key pair and JWKS if absent (used by `make up`)."""
    if algorithm not in ("EdDSA", "ES256"):
        raise typer.BadParameter("must be EdDSA or ES256", param_hint="--algorithm")
    try:
        issuer = ensure_dev_keys(_keys_dir(keys), algorithm=algorithm)  # type: ignore[arg-type]
    except DevIssuerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"issuer: {issuer.issuer}", err=True)
    typer.echo(f"jwks:   {issuer.jwks_path}", err=True)
    typer.echo(f"kid:    {issuer.current_kid}", err=True)


@app.command()
def mint(
    sub: Annotated[str, typer.Option("--sub", help="Token subject (who the agent is).")],
    groups: Annotated[str, typer.Option("--groups", help="Comma-separated groups.")] = "",
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Lifetime in seconds.")] = 900,
    act: Annotated[
        str | None,
        typer.Option("--act", help="RFC 8693 actor; 'ci-bot<-alice' for a chain."),
    ] = None,
    kind: Annotated[str, typer.Option("--kind", help="agent or human.")] = "agent",
    audience: Annotated[str, typer.Option("--audience")] = DEFAULT_AUDIENCE,
    keys: KeysOption = None,
) -> None:
    """Print a signed development token, alone, on stdout."""
    if kind not in ("agent", "human"):
        raise typer.BadParameter("must be agent or human", param_hint="--kind")
    group_list = [g.strip() for g in groups.split(",") if g.strip()]
    try:
        issuer = ensure_dev_keys(_keys_dir(keys))
        token = issuer.mint(sub, group_list, ttl=ttl, act=act, kind=kind, audience=audience)
    except (DevIssuerError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(token)


@app.command()
def rotate(
    keys: KeysOption = None,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0, help="Seconds the old key stays in the JWKS."),
    ] = DEFAULT_GRACE_SECONDS,
) -> None:
    """Start signing with a new key; the old one stays published for --grace seconds."""
    try:
        issuer = ensure_dev_keys(_keys_dir(keys))
        kid = issuer.rotate(grace_seconds=grace)
    except DevIssuerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"new kid: {kid}", err=True)
