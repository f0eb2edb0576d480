"""`pgwarden tap inline|extproc`: run the tap with one of its two drivers."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from tap import protocol as pg
from tap.runtime import Runtime, TapSettings

app = typer.Typer(no_args_is_help=True)

TlsCert = Annotated[str | None, typer.Option(help="PEM certificate for client TLS.")]
TlsKey = Annotated[str | None, typer.Option(help="PEM key for client TLS.")]
RequireTls = Annotated[bool, typer.Option(help="Refuse clients that do not use TLS.")]
UpSsl = Annotated[str, typer.Option(help="disable | require | verify-ca | verify-full")]
UpCa = Annotated[str | None, typer.Option(help="CA file to verify PostgreSQL's certificate.")]
UpHost = Annotated[str | None, typer.Option(help="Host name expected in PostgreSQL's certificate.")]
MaxMsg = Annotated[int, typer.Option(help="Largest protocol message accepted, in bytes.")]
LogLevel = Annotated[str, typer.Option(help="debug | info | warning | error")]


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {addr!r}")
    return host, int(port)


def _settings(tls_cert: str | None, tls_key: str | None, require_tls: bool, upstream_sslmode: str,
              upstream_ca: str | None, upstream_hostname: str | None,
              max_message_size: int) -> TapSettings:
    if bool(tls_cert) != bool(tls_key):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if require_tls and not tls_cert:
        raise typer.BadParameter("--require-tls needs --tls-cert and --tls-key")
    return TapSettings(tls_cert=tls_cert, tls_key=tls_key, require_client_tls=require_tls,
                       upstream_sslmode=upstream_sslmode, upstream_ca=upstream_ca,
                       upstream_hostname=upstream_hostname, max_message_size=max_message_size)


def _run(main: object) -> None:
    import uvloop

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)  # type: ignore[operator]

    uvloop.run(runner())


@app.command()
def inline(
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept connections on.")],
    upstream: Annotated[str, typer.Option(help="PostgreSQL HOST:PORT.")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, require_tls: RequireTls = False,
    upstream_sslmode: UpSsl = "disable", upstream_ca: UpCa = None,
    upstream_hostname: UpHost = None, max_message_size: MaxMsg = pg.DEFAULT_MAX_MESSAGE,
    log_level: LogLevel = "info",
) -> None:
    """Accept PostgreSQL connections (behind Envoy's tcp_proxy) and own the upstream."""
    from pgwarden.logs import configure
    from tap.drivers.inline import InlineSettings, serve

    configure(log_level)
    host, port = _split(listen)
    up_host, up_port = _split(upstream)
    runtime = Runtime(settings=_settings(tls_cert, tls_key, require_tls, upstream_sslmode,
                                         upstream_ca, upstream_hostname, max_message_size))
    settings = InlineSettings(listen_host=host, listen_port=port, upstream_host=up_host,
                              upstream_port=up_port)

    async def main(stop: asyncio.Event) -> None:
        await serve(settings, runtime, stop=stop)

    _run(main)


@app.command()
def extproc(
    listen: Annotated[str, typer.Option(help="HOST:PORT for Envoy's gRPC stream.")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, require_tls: RequireTls = False,
    upstream_sslmode: UpSsl = "disable", upstream_ca: UpCa = None,
    upstream_hostname: UpHost = None, max_message_size: MaxMsg = pg.DEFAULT_MAX_MESSAGE,
    log_level: LogLevel = "info",
) -> None:
    """Serve Envoy's network ext_proc stream; Envoy's tcp_proxy owns the upstream."""
    from pgwarden.logs import configure
    from tap.drivers.ext_proc import serve

    configure(log_level)
    host, port = _split(listen)
    runtime = Runtime(settings=_settings(tls_cert, tls_key, require_tls, upstream_sslmode,
                                         upstream_ca, upstream_hostname, max_message_size))

    async def main(stop: asyncio.Event) -> None:
        await serve(host, port, runtime, stop=stop)

    _run(main)
