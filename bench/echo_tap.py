"""A stand-in for ``pgwarden tap`` that does no protocol work: the floor a
Python process on the gateway's path costs.

``extproc`` serves Envoy's network ext_proc service and answers every chunk
with the same bytes (read_data to upstream, write_data to the client);
``inline`` is a bare uvloop byte pipe to ``--upstream``. Given ``--tls-cert``
and ``--tls-key`` (the local stack passes the tap's), the pipe also answers a
client's SSLRequest, terminates that TLS session with uvloop's ``start_tls``
and opens its own TLS session to PostgreSQL (SSLRequest, no certificate
check): the least any gateway that reads the bytes of an encrypted session
must do, with no PostgreSQL protocol work at all. It takes the tap's
command line shape (``MODE --listen HOST:PORT [--upstream HOST:PORT] ...``,
other options ignored), so the local stack runs it in the tap's place with
``PGWARDEN_TAP_COMMAND="python bench/echo_tap.py"`` (bench/floors.py does).
The ext_proc server gets the tap's gRPC options (``SERVER_OPTIONS``).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pgwarden._proto import network_ext_proc_pb2 as pb
from pgwarden._proto import network_ext_proc_pb2_grpc as pb_grpc
from tap.drivers.ext_proc import SERVER_OPTIONS

_MODIFIED = pb.ProcessingResponse.MODIFIED
SERVICE = "envoy.service.network_ext_proc.v3.NetworkExternalProcessor"


class Echo(pb_grpc.NetworkExternalProcessorServicer):
    async def Process(self, requests, context):  # type: ignore[no-untyped-def]
        async for req in requests:
            if req.HasField("read_data"):
                yield pb.ProcessingResponse(read_data=pb.Data(data=req.read_data.data),
                                            data_processing_status=_MODIFIED)
            else:
                yield pb.ProcessingResponse(write_data=pb.Data(data=req.write_data.data),
                                            data_processing_status=_MODIFIED)


async def serve_echo(listen: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_NetworkExternalProcessorServicer_to_server(Echo(), server)  # type: ignore[no-untyped-call]
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(listen)
    await server.start()
    for name in ("", SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


SSL_REQUEST = struct.pack("!ii", 8, 80877103)
# The event loop keeps only weak references to tasks: hold the TLS set-ups.
_TASKS: set[asyncio.Task[None]] = set()


class _Side(asyncio.Protocol):
    """One end of the pipe. Bytes go to the peer once the peer is ``live``
    (connected, and through its TLS handshake when there is one); until then
    they wait in ``early``."""

    def __init__(self) -> None:
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.live = False
        self.early: list[bytes] = []
        self.answer: asyncio.Future[bytes] | None = None  # the server's reply to SSLRequest
        self.tls: ssl.SSLContext | None = None  # client side: offer TLS with this context
        self.mode: str | None = None  # client side: "plain" or "tls" once the first bytes came
        self.is_client = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def go_live(self, transport: asyncio.Transport) -> None:
        self.transport, self.live = transport, True
        peer = self.peer
        if peer is not None and peer.early:
            transport.write(b"".join(peer.early))
            peer.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.answer is not None:
            fut, self.answer = self.answer, None
            fut.set_result(data)
            return
        peer = self.peer
        assert peer is not None
        if self.is_client and self.mode is None:  # the client's first bytes
            if self.tls is not None and data == SSL_REQUEST:
                self.mode, self.live = "tls", False
                task = asyncio.get_running_loop().create_task(self._start_tls(self.tls))
                _TASKS.add(task)
                task.add_done_callback(_TASKS.discard)
                return
            self.mode, self.live = "plain", True
            if peer.transport is not None:
                peer.go_live(peer.transport)
        if peer.live:
            peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self.early.append(data)

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        upstream = self.peer
        assert self.transport is not None and upstream is not None
        self.transport.write(b"S")
        plain = await loop.start_tls(self.transport, self, ctx, server_side=True)
        assert plain is not None
        self.transport = plain
        while upstream.transport is None:
            await asyncio.sleep(0.001)
        up_tls = ssl.create_default_context()
        up_tls.check_hostname = False
        up_tls.verify_mode = ssl.CERT_NONE
        answer: asyncio.Future[bytes] = loop.create_future()
        upstream.answer = answer
        upstream.transport.write(SSL_REQUEST)
        if await answer != b"S":
            plain.close()
            upstream.transport.close()
            return
        wrapped = await loop.start_tls(upstream.transport, upstream, up_tls)
        assert wrapped is not None
        upstream.go_live(wrapped)
        self.go_live(plain)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve_pipe(listen: str, upstream: str, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    up_host, up_port = upstream.rsplit(":", 1)
    connecting: set[asyncio.Task[object]] = set()

    def factory() -> _Side:
        client, server = _Side(), _Side()
        client.peer, server.peer = server, client
        client.tls, client.is_client = tls, True

        async def connect() -> None:
            await loop.create_connection(lambda: server, up_host, int(up_port))
            if client.mode == "plain":
                assert server.transport is not None
                server.go_live(server.transport)

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    host, port = listen.rsplit(":", 1)
    srv = await loop.create_server(factory, host, int(port))
    await srv.serve_forever()


def main(argv: list[str]) -> None:
    mode = argv[0]
    listen = argv[argv.index("--listen") + 1]
    if mode == "extproc":
        uvloop.run(serve_echo(listen))
    else:
        tls = None
        if "--tls-cert" in argv and "--tls-key" in argv:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(argv[argv.index("--tls-cert") + 1],
                                argv[argv.index("--tls-key") + 1])
        uvloop.run(serve_pipe(listen, argv[argv.index("--upstream") + 1], tls))


if __name__ == "__main__":
    main(sys.argv[1:])
