"""A stand-in for ``pgwarden tap`` that does no protocol work: the floor a
Python process on the gateway's path costs.

``extproc`` serves Envoy's network ext_proc service and answers every chunk
with the same bytes (read_data to upstream, write_data to the client);
``inline`` is a bare uvloop byte pipe to ``--upstream``. It takes the tap's
command line shape (``MODE --listen HOST:PORT [--upstream HOST:PORT] ...``,
other options ignored), so the local stack runs it in the tap's place with
``PGWARDEN_TAP_COMMAND="python bench/echo_tap.py"`` (bench/floors.py does).
The ext_proc server gets the tap's gRPC options (``SERVER_OPTIONS``).
"""

from __future__ import annotations

import asyncio
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


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.peer is not None and self.peer.early:
            self.transport.write(b"".join(self.peer.early))  # type: ignore[union-attr]
            self.peer.early.clear()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        if self.peer.transport is None:
            self.early.append(data)  # the upstream connection is on its way
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve_pipe(listen: str, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    up_host, up_port = upstream.rsplit(":", 1)
    connecting: set[asyncio.Task[object]] = set()

    def factory() -> _Side:
        client, server = _Side(), _Side()
        client.peer, server.peer = server, client
        task = loop.create_task(loop.create_connection(lambda: server, up_host, int(up_port)))
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
        uvloop.run(serve_pipe(listen, argv[argv.index("--upstream") + 1]))


if __name__ == "__main__":
    main(sys.argv[1:])
