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


@app.command()
def verify(
    keys: KeysOption = None,
    jwks_file: Annotated[
        Path | None, typer.Option("--jwks-file", help="Validate against this JWKS file.")
    ] = None,
    jwks_url: Annotated[
        str | None, typer.Option("--jwks-url", help="Validate against this HTTPS JWKS URL.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="CA bundle for --jwks-url.")
    ] = None,
    issuer: Annotated[str | None, typer.Option("--issuer")] = None,
    audience: Annotated[str, typer.Option("--audience")] = DEFAULT_AUDIENCE,
    groups_claim: Annotated[str, typer.Option("--groups-claim")] = "groups",
    kind_claim: Annotated[str, typer.Option("--kind-claim")] = "kind",
    subject_claim: Annotated[str, typer.Option("--subject-claim")] = "sub",
) -> None:
    """Validate a token read from stdin and print the identity pgwarden derives.

    For checking an OIDC provider's claim layout before pointing the gateway
    at it. The token is read from stdin, never from the command line (process
    listings would show it). Without --jwks-file/--jwks-url the development
    issuer's keys and issuer are used.
    """
    import contextlib
    import json
    import sys

    from pgwarden.devissuer import DEV_ISSUER
    from policyd.identity import IdentitySettings, TokenRejected, TokenValidator

    if jwks_file is None and jwks_url is None:
        jwks_file = _keys_dir(keys) / "jwks.json"
        issuer = issuer or DEV_ISSUER
    if issuer is None:
        raise typer.BadParameter("required with --jwks-file/--jwks-url", param_hint="--issuer")
    try:
        settings = IdentitySettings(
            issuer=issuer,
            audience=audience,
            jwks_file=jwks_file,
            jwks_url=jwks_url,
            jwks_ca_file=ca_file,
            groups_claim=groups_claim,
            kind_claim=kind_claim,
            subject_claim=subject_claim,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    token = sys.stdin.readline().strip()
    try:
        # Log lines (JWKS loaded, ...) must not mix with the result on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            result = TokenValidator(settings).validate_detailed(token)
    except TokenRejected as exc:
        typer.echo(f"rejected: {exc.reason_code.value}: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    ident = result.identity
    typer.echo(
        json.dumps(
            {
                "subject": ident.subject,
                "groups": list(ident.groups),
                "issuer": ident.issuer,
                "kind": ident.kind,
                "actor": ident.actor,
                "expires_at": ident.expires_at,
                "kid": result.kid,
                "algorithm": result.algorithm,
            },
            indent=2,
        )
    )
