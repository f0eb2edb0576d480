"""``pgwarden console serve``: run the auditor and approver console.

Token validation: ``--identity-config FILE`` (a pgwarden configuration with an
``identity`` section, or a file of just those settings), or ``--jwks FILE``
with ``--issuer``/``--audience``; with neither, the development issuer's JWKS
(``pgwarden token mint``; ``PGWARDEN_DEV_KEYS`` or ``.run/identity``) is
trusted, which is for local use only.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from pgwarden.devissuer import DEFAULT_AUDIENCE, DEFAULT_KEYS_DIR, DEV_ISSUER
from policyd.identity import IdentitySettings

app = typer.Typer(help="Auditor and approver web console.", no_args_is_help=True)


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise typer.BadParameter("use HOST:PORT, e.g. 127.0.0.1:8470", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve(
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to serve on (loopback by default).")
    ] = "127.0.0.1:8470",
    store: Annotated[
        str | None, typer.Option("--store", help="Audit store URL (env PGWARDEN_AUDIT_URL).")
    ] = None,
    approvals_store: Annotated[
        str | None,
        typer.Option("--approvals-store", help="Approvals database URL (default: --store)."),
    ] = None,
    identity_config: Annotated[
        Path | None,
        typer.Option("--identity-config", help="YAML with the identity settings."),
    ] = None,
    jwks: Annotated[
        Path | None, typer.Option("--jwks", help="JWKS file to validate tokens with.")
    ] = None,
    issuer: Annotated[str | None, typer.Option("--issuer", help="Expected token issuer.")] = None,
    audience: Annotated[str, typer.Option("--audience", help="Expected audience.")] = (
        DEFAULT_AUDIENCE
    ),
    reader_group: Annotated[
        list[str] | None,
        typer.Option("--reader-group", help="Group that may read (repeat; default auditors)."),
    ] = None,
    approver_group: Annotated[
        list[str] | None,
        typer.Option(
            "--approver-group", help="Group that may approve/deny (repeat; default approvers)."
        ),
    ] = None,
    session_minutes: Annotated[
        float, typer.Option("--session-minutes", min=1, max=60, help="Sign-in lifetime.")
    ] = 15.0,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Audit signing key or its .pub (env PGWARDEN_AUDIT_KEY)."),
    ] = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option("--checkpoints", help="Checkpoint file (env PGWARDEN_AUDIT_CHECKPOINTS)."),
    ] = None,
    insecure_cookie: Annotated[
        bool,
        typer.Option(
            "--insecure-cookie",
            help="Send the session cookie over plain HTTP on a non-loopback address "
            "(only behind a TLS-terminating proxy on the same host).",
        ),
    ] = False,
) -> None:
    """Serve the console: sessions, replays, approvals queue, verification."""
    import uvicorn

    from policyd.audit.store import store_url
    from policyd.console.app import create_app
    from policyd.console.settings import ConsoleSettings, load_identity_config

    host, port = _split_listen(listen)
    try:
        if identity_config is not None:
            identity = load_identity_config(identity_config)
        elif jwks is not None:
            if issuer is None:
                raise typer.BadParameter("required with --jwks", param_hint="--issuer")
            identity = IdentitySettings(issuer=issuer, audience=audience, jwks_file=jwks)
        else:
            dev_jwks = Path(os.environ.get("PGWARDEN_DEV_KEYS", str(DEFAULT_KEYS_DIR))) / "jwks.json"
            typer.echo(
                f"console: trusting the development issuer ({dev_jwks}); "
                "use --identity-config in production",
                err=True,
            )
            identity = IdentitySettings(
                issuer=DEV_ISSUER,
                audience=audience,
                jwks_file=dev_jwks,
                algorithms=["EdDSA", "ES256"],
            )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = ConsoleSettings(
        store_url=store_url(store),
        identity=identity,
        approvals_url=approvals_store,
        reader_groups=frozenset(reader_group or ["auditors"]),
        approver_groups=frozenset(approver_group or ["approvers"]),
        session_seconds=session_minutes * 60,
        # On loopback the cookie never leaves the host, and not every browser sends
        # a Secure cookie back to plain http://127.0.0.1; anywhere else: TLS only.
        cookie_secure=not (is_loopback(host) or insecure_cookie),
        signing_key=key,
        checkpoints=checkpoints,
    )
    try:
        application = create_app(settings)
    except Exception as exc:
        typer.echo(f"error: cannot start the console: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"console: http://{listen}/ (store {settings.store_url.split('@')[-1]})", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False)
