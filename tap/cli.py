"""`pgwarden tap inline|extproc`: run the tap with one of its two drivers.

With ``--config`` the tap runs as configured (token auth, policy, masking,
audit). Without it, it runs the development data path: client credentials
passed through to PostgreSQL and every statement allowed — it says so in its
log at start.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from tap.runtime import Runtime, TapSettings

# Kept in sync with tap.protocol.DEFAULT_MAX_MESSAGE; not imported so that
# `pgwarden --help` does not load the tap.
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024

app = typer.Typer(no_args_is_help=True)

Config = Annotated[Path | None, typer.Option(help="pgwarden YAML configuration file.")]
Listen = Annotated[str | None, typer.Option(help="HOST:PORT to listen on (overrides the config).")]
TlsCert = Annotated[str | None, typer.Option(help="PEM certificate for client TLS.")]
TlsKey = Annotated[str | None, typer.Option(help="PEM key for client TLS.")]
RequireTls = Annotated[bool, typer.Option(help="Refuse clients that do not use TLS.")]
UpSsl = Annotated[str, typer.Option(help="disable | require | verify-ca | verify-full")]
UpCa = Annotated[str | None, typer.Option(help="CA file to verify PostgreSQL's certificate.")]
UpHost = Annotated[str | None, typer.Option(help="Host name expected in PostgreSQL's certificate.")]
MaxMsg = Annotated[int, typer.Option(help="Largest protocol message accepted, in bytes.")]
MaxResult = Annotated[int | None, typer.Option(
    min=1024, help="Largest result one execution may return, in bytes; past it the session "
    "ends with SQLSTATE 54000 (overrides tap.max_result_bytes).")]
LogLevel = Annotated[str, typer.Option(help="debug | info | warning | error")]
Metrics = Annotated[str | None, typer.Option(
    help="HOST:PORT for /metrics, /healthz and /readyz (overrides tap.health_listen).")]


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {addr!r}")
    return host, int(port)


def _dev_settings(tls_cert: str | None, tls_key: str | None, require_tls: bool,
                  upstream_sslmode: str, upstream_ca: str | None, upstream_hostname: str | None,
                  max_message_size: int, max_result_bytes: int | None) -> TapSettings:
    from tap.runtime import TapSettings

    if bool(tls_cert) != bool(tls_key):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if require_tls and not tls_cert:
        raise typer.BadParameter("--require-tls needs --tls-cert and --tls-key")
    return TapSettings(tls_cert=tls_cert, tls_key=tls_key, require_client_tls=require_tls,
                       upstream_sslmode=upstream_sslmode, upstream_ca=upstream_ca,
                       upstream_hostname=upstream_hostname, max_message_size=max_message_size,
                       max_result_bytes=max_result_bytes)


RuntimeFactory = Callable[[AsyncExitStack], Awaitable["Runtime"]]


def _runtime_factory(config_path: Path | None, dev: TapSettings, listen: str | None = None,
                     upstream: str | None = None) -> tuple[RuntimeFactory, object]:
    """Return how to build the runtime, and the loaded config (or None).
    ``listen``/``upstream`` from the command line override the file's."""
    if config_path is None:
        async def dev_runtime(_: AsyncExitStack) -> Runtime:
            from tap.runtime import Runtime

            runtime = Runtime(settings=dev)
            runtime.log.warning("development_mode", detail="no --config: client credentials are "
                                "passed through and every statement is allowed")
            return runtime
        return dev_runtime, None
    from pgwarden.config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    overrides: dict[str, object] = {k: v for k, v in (("listen", listen), ("upstream", upstream))
                                    if v}
    if dev.max_result_bytes is not None:
        overrides["max_result_bytes"] = dev.max_result_bytes
    if overrides:
        config = config.model_copy(update={"tap": config.tap.model_copy(update=overrides)})

    async def configured(stack: AsyncExitStack) -> Runtime:
        from tap.services import build_runtime

        return await build_runtime(config, stack)
    return configured, config


def _health_listen(loaded: object) -> str | None:
    return getattr(getattr(loaded, "tap", None), "health_listen", None)


def _expose(runtime: Runtime, address: str | None) -> None:
    """/metrics, /healthz, /readyz (readiness false while draining or while
    the audit trail cannot take events)."""
    if address:
        from pgwarden.metrics import serve as serve_metrics

        serve_metrics(address, ready=lambda: runtime.ready)


def _drain_seconds(loaded: object | None) -> float:
    """tap.drain_seconds of the loaded config (10 s in dev mode)."""
    tap = getattr(loaded, "tap", None)
    return float(getattr(tap, "drain_seconds", 10.0))


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    from pgwarden import loop

    async def runner() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, stop.set)
        await main(stop)

    loop.run(runner())


@app.command()
def inline(
    listen: Listen = None,
    upstream: Annotated[str | None, typer.Option(help="PostgreSQL HOST:PORT.")] = None,
    config: Config = None,
    tls_cert: TlsCert = None, tls_key: TlsKey = None, require_tls: RequireTls = False,
    upstream_sslmode: UpSsl = "disable", upstream_ca: UpCa = None,
    upstream_hostname: UpHost = None, max_message_size: MaxMsg = DEFAULT_MAX_MESSAGE,
    max_result_bytes: MaxResult = None,
    log_level: LogLevel = "info", metrics_addr: Metrics = None,
) -> None:
    """Accept PostgreSQL connections (behind Envoy's tcp_proxy) and own the upstream."""
    from pgwarden.logs import configure
    from tap.drivers.inline import InlineSettings, serve

    configure(log_level)
    factory, loaded = _runtime_factory(config, _dev_settings(
        tls_cert, tls_key, require_tls, upstream_sslmode, upstream_ca, upstream_hostname,
        max_message_size, max_result_bytes), listen, upstream)
    listen = listen or (loaded.tap.listen if loaded is not None else None)  # type: ignore[attr-defined]
    upstream = upstream or (loaded.tap.upstream if loaded is not None else None)  # type: ignore[attr-defined]
    if not listen or not upstream:
        raise typer.BadParameter("--listen and --upstream are needed without a --config")
    host, port = _split(listen)
    up_host, up_port = _split(upstream)
    settings = InlineSettings(listen_host=host, listen_port=port, upstream_host=up_host,
                              upstream_port=up_port, drain_seconds=_drain_seconds(loaded))

    async def main(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            runtime = await factory(stack)
            runtime.driver = "inline"
            _expose(runtime, metrics_addr or _health_listen(loaded))
            await serve(settings, runtime, stop=stop)

    _run(main)


@app.command()
def extproc(
    listen: Listen = None,
    config: Config = None,
    tls_cert: TlsCert = None, tls_key: TlsKey = None, require_tls: RequireTls = False,
    upstream_sslmode: UpSsl = "disable", upstream_ca: UpCa = None,
    upstream_hostname: UpHost = None, max_message_size: MaxMsg = DEFAULT_MAX_MESSAGE,
    max_result_bytes: MaxResult = None,
    log_level: LogLevel = "info", metrics_addr: Metrics = None,
) -> None:
    """Serve Envoy's network ext_proc stream; Envoy's tcp_proxy owns the upstream."""
    from pgwarden.logs import configure
    from tap.drivers.ext_proc import serve

    configure(log_level)
    factory, loaded = _runtime_factory(config, _dev_settings(
        tls_cert, tls_key, require_tls, upstream_sslmode, upstream_ca, upstream_hostname,
        max_message_size, max_result_bytes), listen)
    listen = listen or (loaded.tap.listen if loaded is not None else None)  # type: ignore[attr-defined]
    if not listen:
        raise typer.BadParameter("--listen is needed without a --config")
    host, port = _split(listen)

    async def main(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            runtime = await factory(stack)
            runtime.driver = "extproc"
            _expose(runtime, metrics_addr or _health_listen(loaded))
            await serve(host, port, runtime, stop=stop, drain_seconds=_drain_seconds(loaded))

    _run(main)
