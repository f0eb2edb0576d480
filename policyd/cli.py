"""`pgwarden policyd serve|input|opa`: run the decision point, show what a
policy sees, or run a local OPA on rego/."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    import grpc

    from pgwarden.config import PgwardenConfig
    from policyd.audit.writer import AuditWriter

app = typer.Typer(no_args_is_help=True)


def serve_settings(listen: str | None, opa_url: str | None, opa_deadline: float | None,
                   cfg: PgwardenConfig | None) -> tuple[str, str, float]:
    """Where policyd listens, its OPA and OPA's deadline: a command-line
    option wins, then the configuration file's ``policyd`` section, then
    that section's defaults."""
    from pgwarden.config import PolicydConfig

    section = cfg.policyd if cfg is not None else PolicydConfig()
    return (listen or section.listen, opa_url or section.opa_url,
            opa_deadline if opa_deadline is not None else section.opa_deadline_seconds)


@app.command()
def serve(
    listen: str | None = typer.Option(
        None, help="unix:/path.sock or host:port [default: policyd.listen of --config, "
        "else 127.0.0.1:50061]"),
    opa_url: str | None = typer.Option(
        None, help="OPA REST API base URL [default: policyd.opa_url of --config, "
        "else http://127.0.0.1:8181]"),
    opa_deadline: float | None = typer.Option(
        None, help="seconds per OPA query; past it: deny [default: "
        "policyd.opa_deadline_seconds of --config, else 0.5]"),
    revision_interval: float = typer.Option(1.0, help="seconds between policy revision polls"),
    policy_dir: Path | None = typer.Option(  # noqa: B008
        None, help="the folder OPA watches, if visible here: cheaper revision polling"),
    metrics_addr: str = typer.Option("", help="HOST:PORT for /metrics, /healthz, /readyz"),
    config: Path | None = typer.Option(  # noqa: B008
        None, help="pgwarden YAML: with it policyd also hosts the approval service "
        "(approvals in the audit store, approvers' tokens checked against `identity`)"),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve PolicyService (Decide, DecideConnect, WatchRevision) and gRPC health."""
    from pgwarden.logs import configure
    from policyd.server import PolicyServer

    configure(log_level)
    cfg = _load(config) if config is not None else None
    listen, opa_url, opa_deadline = serve_settings(listen, opa_url, opa_deadline, cfg)
    extra = []
    writer = None
    if cfg is not None:
        add, writer = _approval_service(cfg)
        extra.append(add)
    server = PolicyServer(listen, opa_url, opa_deadline=opa_deadline,
                          revision_interval=revision_interval, policy_dir=policy_dir,
                          extra_services=extra)
    if writer is not None:
        writer.start()
        server.engine.on_change = policy_change_recorder(writer)
    exposition = None
    if metrics_addr:
        from pgwarden.metrics import serve as serve_metrics

        # ready: OPA answers; a policyd without OPA refuses every statement.
        exposition = serve_metrics(metrics_addr, ready=lambda: server.engine.ready)
    async def until_signalled() -> None:
        import signal

        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, stop.set)
        await server.serve_forever(stop)

    try:
        from pgwarden import loop

        # SIGTERM (a rollout, `pgwarden down`) stops the server cleanly, so
        # the audit writer below records policyd's stop.
        loop.run(until_signalled())
    finally:
        if exposition is not None:
            exposition.close()
        if writer is not None:
            writer.close(timeout=10)  # records policyd's stop (PCI DSS 10.2.1.6)


def policy_change_recorder(writer: AuditWriter) -> Callable[[str, str], None]:
    """Record every policy revision policyd starts deciding with (the first
    one and each reload) as a gateway ``policy_reload`` event: which policy
    was in force from when is evidence, next to the revision each statement
    decision carries (PCI DSS 10.2.1, 10.2.2)."""
    import socket

    from policyd.audit.events import GatewayEvent

    instance = socket.gethostname()

    def record(previous: str, revision: str) -> None:
        writer.submit([GatewayEvent(action="policy_reload", component="policyd",
                                    instance=instance, policy_revision=revision,
                                    detail={"previous_revision": previous or None})])
    return record


def _load(config_path: Path) -> PgwardenConfig:
    from pgwarden.config import ConfigError, load

    try:
        return load(config_path)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc


def _approval_service(cfg: PgwardenConfig
                      ) -> tuple[Callable[[grpc.aio.Server], None], AuditWriter]:
    """Host ApprovalService (and the taps' AuditSink) next to PolicyService,
    from the pgwarden config; policyd's own audit writer (started by the
    caller) records approvals and policyd's own events."""
    from policyd.approvals.service import add_to_server
    from policyd.approvals.settings import ApprovalSettings
    from policyd.audit.writer import AuditWriter
    from policyd.identity import IdentitySettings, TokenValidator

    if cfg.identity is None or cfg.tap.audit is None:
        raise typer.BadParameter("the approval service needs `identity` and `tap.audit` sections",
                                 param_hint="--config")
    audit = cfg.tap.audit
    audit.spool_dir.mkdir(parents=True, exist_ok=True)
    writer = AuditWriter(audit.url, audit.spool_dir / "policyd.spool", component="policyd",
                         fail_closed=audit.on_spool_failure == "refuse",
                         signing_key=audit.signing_key_file, checkpoint_file=audit.checkpoint_file)
    settings = ApprovalSettings()
    validator = TokenValidator(IdentitySettings.model_validate(cfg.identity))

    def add(server: grpc.aio.Server) -> None:
        from policyd.audit.service import add_to_server as add_audit_sink
        from policyd.audit.store import AuditStore
        from policyd.audit.writer import store_sink

        add_to_server(server, settings.store(audit.url), writer, validator,
                      notifier=settings.notifier())
        # The taps ship their spools here: one process owns the store writes
        # and signs the checkpoints, off the taps' CPU.
        checkpointer = store_sink(audit.url, signing_key=audit.signing_key_file,
                                  checkpoint_file=audit.checkpoint_file,
                                  writer_id="policyd-sink").checkpointer
        add_audit_sink(server, AuditStore(audit.url), checkpointer)
    return add, writer


@app.command("input")
def show_input(
    sql: str = typer.Argument(..., help="the SQL of one message"),
    group: list[str] = typer.Option([], "--group", "-g", help="identity group (repeat)"),  # noqa: B008
    database: str = typer.Option("shop"),
    role: str = typer.Option("", help="upstream role ($user in search_path)"),
    search_path: str = typer.Option('"$user", public'),
    param: list[str] = typer.Option([], "--param", "-p", help="Bind value $1, $2, ... (repeat)"),  # noqa: B008
    card_lookups: int = typer.Option(0, help="card lookups this identity made in the window "
                                              "(input.history)"),
) -> None:
    """Print the policy input document for SQL (pipe into `opa eval -I`)."""
    from policyd.analysis import analyse
    from policyd.decision import statement_input
    from tap.hooks import Identity, SessionInfo, StatementRequest

    request = StatementRequest(
        identity=Identity(subject="cli", groups=tuple(group)),
        session=SessionInfo(session_id="cli", database=database, upstream_role=role,
                            search_path=search_path),
        sql=sql, params=tuple(param) if param else None)
    from policyd.lookups import history_input

    analysis = analyse(sql, search_path=search_path, user=role, params=request.params)
    typer.echo(json.dumps(statement_input(request, analysis, history=history_input(card_lookups)),
                          indent=2))


@app.command()
def opa(
    port: int = typer.Option(8181),
    rego: Path = typer.Option(Path(__file__).resolve().parent.parent / "rego"),  # noqa: B008
) -> None:
    """Run OPA on 127.0.0.1:PORT with --watch on the policy folder (local stack)."""
    import time

    from policyd.opa_process import OpaProcess

    with OpaProcess(paths=[rego], port=port) as proc:
        typer.echo(f"OPA on {proc.url} watching {rego}; Ctrl-C to stop")
        while proc.running:
            time.sleep(1)


if __name__ == "__main__":  # `python -m policyd.cli serve`: without the other subcommands' imports
    app()
