"""`pgwarden maskd serve`: run the masking service."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def serve(
    listen: str = typer.Option("127.0.0.1:50062", help="unix:/path.sock or host:port"),
    key_file: Path | None = typer.Option(  # noqa: B008
        None, help="gateway masking key (raw or hex); default: $PGWARDEN_MASK_KEY (hex)"),
    metrics: str = typer.Option("", help="host:port for /metrics (Prometheus); empty: off"),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve MaskService (MaskBatch) and gRPC health."""
    from maskd.server import MaskServer, load_key
    from pgwarden import metrics as pgmetrics
    from pgwarden.logs import configure

    configure(log_level)
    try:
        key = load_key(key_file)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--key-file") from exc
    if metrics:
        pgmetrics.serve(metrics)
    from pgwarden import loop

    loop.run(MaskServer(listen, key).serve_forever())
