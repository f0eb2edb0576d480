"""`pgwarden tap inline|extproc`: run the tap with one of its two drivers."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
