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

    from policyd.audit.cli import audit_app, replay_app, sessions_app

    app.add_typer(sessions_app, name="sessions", help="List recorded sessions.")
    app.add_typer(replay_app, name="replay", help="Replay a recorded session.")
    app.add_typer(audit_app, name="audit", help="Export, verify and prune the audit trail.")

    from pgwarden.tokens_cli import app as token_app

    app.add_typer(token_app, name="token", help="Development token issuer (mint, rotate).")

    from pgwarden.stack import down_command, up_command

    app.command("up")(up_command)
    app.command("down")(down_command)

    from pgwarden.demo import demo_command

    app.command("demo")(demo_command)

    from policyd.cli import app as policyd_app

    app.add_typer(policyd_app, name="policyd", help="Policy decisions: serve, show input, run OPA.")

    from maskd.cli import app as maskd_app

    app.add_typer(maskd_app, name="maskd", help="Mask card numbers in results: serve.")

    from policyd.approvals.cli import app as approvals_app

    app.add_typer(approvals_app, name="approvals", help="Just-in-time approvals: list, show, approve, deny.")

    from policyd.console.cli import app as console_app

    app.add_typer(console_app, name="console", help="Auditor and approver web console: serve.")

    from pgwarden.config_cli import app as config_app

    app.add_typer(config_app, name="config", help="Validate a pgwarden configuration file.")

    from pgwarden.doctor import doctor_command
    from pgwarden.version import version_command

    app.command("version")(version_command)
    app.command("doctor")(doctor_command)


_register()
