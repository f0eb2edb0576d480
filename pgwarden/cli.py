"""The one `pgwarden` command. Each area registers its own sub-application
here; keep this file to wiring only."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pgwarden",
    help="PostgreSQL access gateway for autonomous agents, with PCI DSS evidence.",
    no_args_is_help=True,
    add_completion=False,
)


def _register() -> None:
    from tap.cli import app as tap_app

    app.add_typer(tap_app, name="tap", help="Run the PostgreSQL protocol tap.")

    from pgwarden.tokens_cli import app as token_app

    app.add_typer(token_app, name="token", help="Development token issuer (mint, rotate).")


_register()
