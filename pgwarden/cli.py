"""The one `pgwarden` command. Each area registers its own sub-application
here; keep this file to wiring only.

The installed script (``main``) builds a command tree holding only the area
the first argument names: an area's module may import heavy libraries (the
audit CLI loads SQLAlchemy and its models, ~1 s here), and an operator
running ``pgwarden token mint`` should not wait for them. Help, and anything
not recognised, get the whole tree. ``from pgwarden.cli import app`` (tests,
embedding) also gets the whole tree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer


def _tap(app: typer.Typer) -> None:
    from tap.cli import app as tap_app

    app.add_typer(tap_app, name="tap", help="Run the PostgreSQL protocol tap.")


def _audit(app: typer.Typer) -> None:
    from policyd.audit.cli import audit_app, replay_app, sessions_app

    app.add_typer(sessions_app, name="sessions", help="List recorded sessions.")
    app.add_typer(replay_app, name="replay", help="Replay a recorded session.")
    app.add_typer(audit_app, name="audit", help="Export, verify and prune the audit trail.")


def _token(app: typer.Typer) -> None:
    from pgwarden.tokens_cli import app as token_app

    app.add_typer(token_app, name="token", help="Development token issuer (mint, rotate).")


def _stack(app: typer.Typer) -> None:
    from pgwarden.stack import down_command, up_command

    app.command("up")(up_command)
    app.command("down")(down_command)


def _demo(app: typer.Typer) -> None:
    from pgwarden.demo import demo_command

    app.command("demo")(demo_command)


def _policyd(app: typer.Typer) -> None:
    from policyd.cli import app as policyd_app

    app.add_typer(policyd_app, name="policyd", help="Policy decisions: serve, show input, run OPA.")


def _maskd(app: typer.Typer) -> None:
    from maskd.cli import app as maskd_app

    app.add_typer(maskd_app, name="maskd", help="Mask card numbers in results: serve.")


def _approvals(app: typer.Typer) -> None:
    from policyd.approvals.cli import app as approvals_app

    app.add_typer(approvals_app, name="approvals",
                  help="Just-in-time approvals: list, show, approve, deny.")


def _console(app: typer.Typer) -> None:
    from policyd.console.cli import app as console_app

    app.add_typer(console_app, name="console", help="Auditor and approver web console: serve.")


def _config(app: typer.Typer) -> None:
    from pgwarden.config_cli import app as config_app

    app.add_typer(config_app, name="config", help="Validate a pgwarden configuration file.")


def _ops(app: typer.Typer) -> None:
    from pgwarden.doctor import doctor_command
    from pgwarden.version import version_command

    app.command("version")(version_command)
    app.command("doctor")(doctor_command)


# (the first-argument names an area answers to, its registrar), in help order
_AREAS: tuple[tuple[tuple[str, ...], Callable[[typer.Typer], None]], ...] = (
    (("tap",), _tap),
    (("sessions", "replay", "audit"), _audit),
    (("token",), _token),
    (("up", "down"), _stack),
    (("demo",), _demo),
    (("policyd",), _policyd),
    (("maskd",), _maskd),
    (("approvals",), _approvals),
    (("console",), _console),
    (("config",), _config),
    (("version", "doctor"), _ops),
)


def build(only: str | None = None) -> typer.Typer:
    """The command tree: every area, or only the one answering to ``only``."""
    app = typer.Typer(
        name="pgwarden",
        help="PostgreSQL access gateway for autonomous agents, with PCI DSS evidence.",
        no_args_is_help=True,
        add_completion=False,
    )

    @app.callback()
    def _root() -> None:
        """PostgreSQL access gateway for autonomous agents, with PCI DSS evidence."""

    for names, register in _AREAS:
        if only is None or only in names:
            register(app)
    return app


def main() -> None:
    """Entry point of the installed ``pgwarden`` script."""
    first = sys.argv[1] if len(sys.argv) > 1 else None
    known = any(first in names for names, _ in _AREAS)
    build(first if known else None)()


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        app = build()
        globals()["app"] = app
        return app
    raise AttributeError(name)
