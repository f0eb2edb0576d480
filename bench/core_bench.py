"""The tap's own Python per transaction, with no socket, gRPC or other process.

Feeds the byte strings of one ``pgbench -S`` transaction (simple protocol:
Query; RowDescription, DataRow, CommandComplete, ReadyForQuery), again and
again, to

- the inline driver (``tap.drivers.inline.ClientSide`` over the sans-IO
  session, with transports that drop what is written);
- the ext_proc driver's ``Process`` handler, as grpc.aio would call it
  (``ProcessingRequest`` messages in, ``ProcessingResponse`` messages out);
- the ext_proc echo of ``bench/echo_tap.py`` (the floor: the same protobuf
  work, no session).

with the data path's default hooks (allow everything, no masking; events
counted, not stored); and the governed point read of ``make bench``
(``pgbench -M prepared``: Bind, Describe, Execute, Sync) through the inline
driver with a cached decision carrying the default pack's masking plan,
masking on, and each execution's record appended to a real spool (no TLS,
no shipping). CPU time per transaction, best of ``--repeat`` runs.
Repeatable to a few percent on a quiet machine, which ``make bench``'s
end-to-end ratios are not; use it to compare two versions of the core:

    .venv/bin/python bench/core_bench.py [--transactions 30000] [--repeat 5]

Nothing is written; figures quoted in bench/RESULTS.md carry the date.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import echo_tap  # noqa: E402
import structlog  # noqa: E402

from pgwarden._proto import network_ext_proc_pb2 as pb  # noqa: E402
from tap import protocol as pg  # noqa: E402
from tap.cancel import CancelRegistry  # noqa: E402
from tap.drivers.ext_proc import NetworkExtProc  # noqa: E402
from tap.drivers.inline import ClientSide, InlineSettings, UpstreamSide  # noqa: E402
from tap.runtime import Runtime  # noqa: E402
from tap.session import Session, SessionConfig  # noqa: E402


def _msg(kind: bytes, body: bytes) -> bytes:
    return pg.Message(kind, body).encode()


STARTUP = pg.encode_startup({"user": "app", "database": "shop"})
HELLO = pg.AUTH_OK + pg.encode_backend_key(4242, b"\x01\x02\x03\x04") + pg.ready_for_query(b"I")
QUERY = _msg(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;\0")
RESPONSE = (
    _msg(b"T", struct.pack("!h", 1) + b"abalance\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
    + _msg(b"D", struct.pack("!hi", 1, 1) + b"0")
    + _msg(b"C", b"SELECT 1\0")
    + pg.ready_for_query(b"I")
)


class _Sink:
    """A transport that drops what is written."""

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _inline_pair(runtime: Runtime) -> tuple[ClientSide, UpstreamSide]:
    """The inline driver's protocol objects for one logged-in session,
    without a loop (connection_made would start the upstream connection):
    the session is set up as it does."""
    client = ClientSide(InlineSettings(), runtime, CancelRegistry())
    client.transport = _Sink()  # type: ignore[assignment]
    config = SessionConfig(session_id="bench", client_addr="127.0.0.1:1", driver="inline",
                           **runtime.session_options())
    client.session = Session(config, runtime.hooks(), client.cancels)
    upstream = UpstreamSide(client)
    upstream.transport = _Sink()  # type: ignore[assignment]
    client.upstream = upstream
    client._upstream_ready = True
    client.data_received(STARTUP)
    upstream.data_received(HELLO)
    return client, upstream


def _exchange(client: ClientSide, upstream: UpstreamSide, request: bytes, answer: bytes,
              n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            client.data_received(request)
            upstream.data_received(answer)
    return run


def cold_per_transaction(client: Any, upstream: Any, n: int) -> float:
    """CPU µs per transaction when the caches are cold, as they are on a
    machine where PostgreSQL, Envoy and the load generator run between two
    transactions: 8 MiB of other memory is read before each one (not
    counted). Thread CPU time around each transaction, mean of ``n``."""
    import numpy as np

    other = np.ones(8 << 20, dtype=np.uint8)
    spent = 0.0
    for _ in range(n):
        other.sum()
        started = time.thread_time()
        client.data_received(QUERY)
        upstream.data_received(RESPONSE)
        spent += time.thread_time() - started
    return spent / n * 1e6


class _Pipe:
    """A bare byte pipe's Python work (bench/echo_tap.py inline): each
    chunk written to the other side as it is."""

    def __init__(self) -> None:
        self.transport = _Sink()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def inline_run(n: int) -> Callable[[], None]:
    client, upstream = _inline_pair(Runtime())
    return _exchange(client, upstream, QUERY, RESPONSE, n)


class _Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def extproc_run(handler: Any, n: int) -> Callable[[], None]:
    read = [pb.ProcessingRequest(read_data=pb.Data(data=QUERY)) for _ in range(n)]
    write = [pb.ProcessingRequest(write_data=pb.Data(data=RESPONSE)) for _ in range(n)]
    loop = asyncio.new_event_loop()

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        yield pb.ProcessingRequest(read_data=pb.Data(data=STARTUP))
        yield pb.ProcessingRequest(write_data=pb.Data(data=HELLO))
        for r, w in zip(read, write, strict=True):
            yield r
            yield w

    async def drive() -> None:
        async for _ in handler.Process(requests(), _Context()):
            pass

    return lambda: loop.run_until_complete(drive())


POINT_READ = "SELECT amount, merchant FROM payments WHERE id = $1"
PAYMENTS_OID = 16384


def _point_read_exchange() -> tuple[bytes, bytes, bytes, bytes]:
    """libpq's PQprepare and PQexecPrepared for the governed bench's point
    read: (prepare, its answer, one execution, its answer)."""
    prepare = (pg.parse_message("p1", POINT_READ)
               + _msg(b"D", b"Sp1\0") + _msg(b"S", b""))
    row_description = _msg(b"T", struct.pack("!h", 2)
                           + b"amount\0" + struct.pack("!IhIhih", PAYMENTS_OID, 4, 1700, -1, -1, 0)
                           + b"merchant\0" + struct.pack("!IhIhih", PAYMENTS_OID, 5, 25, -1, -1, 0))
    prepared = (_msg(b"1", b"") + _msg(b"t", struct.pack("!hI", 1, 20)) + row_description
                + pg.ready_for_query(b"I"))
    bind = _msg(b"B", b"\0p1\0" + struct.pack("!hhi", 0, 1, 4) + b"1234" + struct.pack("!h", 0))
    execute = bind + _msg(b"D", b"P\0") + _msg(b"E", b"\0" + struct.pack("!i", 0)) + _msg(b"S", b"")
    row = _msg(b"D", struct.pack("!hi", 2, 6) + b"123.45" + struct.pack("!i", 14) + b"Corner grocery")
    answer = (_msg(b"2", b"") + row_description + row + _msg(b"C", b"SELECT 1\0")
              + pg.ready_for_query(b"I"))
    return prepare, prepared, execute, answer


def governed_run(n: int, spool: Path) -> Callable[[], None]:
    """The governed point read's own work without TLS: a cached decision
    with the default pack's masking plan for fraud-readers, masking of every
    row, and each execution's record appended to a real spool (fsync'd by
    the writer's thread, not shipped; the statement's own record was
    written once, at its Parse)."""
    from policyd.audit.writer import AuditWriter
    from tap.audit_sink import AuditSink
    from tap.hooks import ColumnRule, Decision, MaskPlan, Verdict
    from tap.masking import MaskingFactory
    from tap.session import Hooks

    decision = Decision(verdict=Verdict.ALLOW, decision_id="bench", policy_revision="bench",
                        mask=MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),),
                                      scan_content=True))
    names = {(PAYMENTS_OID, 2): "public.payments.card_number",
             (PAYMENTS_OID, 4): "public.payments.amount",
             (PAYMENTS_OID, 5): "public.payments.merchant"}
    factory = MaskingFactory(key=b"k" * 32,
                             catalog=lambda _db: lambda table, column: names.get((table, column)))
    writer = AuditWriter(None, spool / "bench.spool", ship=False, create_key=False).start()
    runtime = Runtime(hook_factory=lambda: Hooks(decide_cached=lambda _r: decision,
                                                 masker_factory=factory))
    runtime.audit = AuditSink(writer)
    client, upstream = _inline_pair(runtime)
    prepare, prepared, execute, answer = _point_read_exchange()
    client.data_received(prepare)
    upstream.data_received(prepared)
    return _exchange(client, upstream, execute, answer, n)


def best(run: Callable[[], None], repeat: int) -> float:
    run()  # warm up
    times = []
    for _ in range(repeat):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    n = args.transactions
    cases = {
        "inline driver + session": inline_run(n),
        "ext_proc driver + session": extproc_run(NetworkExtProc(Runtime()), n),
        "ext_proc echo (floor)": extproc_run(echo_tap.Echo(), n),
    }
    print(f"CPU µs per pgbench -S transaction, best of {args.repeat} runs of {n}:")
    for name, run in cases.items():
        print(f"  {name:<28} {best(run, args.repeat) / n * 1e6:6.1f}", flush=True)
    cold = min(args.transactions // 10, 3000)
    print(f"CPU µs per pgbench -S transaction with cold caches, mean of {cold}:")
    client, upstream = _inline_pair(Runtime())
    print(f"  {'inline driver + session':<28} {cold_per_transaction(client, upstream, cold):6.1f}",
          flush=True)
    print(f"  {'bare pipe (floor)':<28} {cold_per_transaction(_Pipe(), _Pipe(), cold):6.1f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="pgwarden-core-bench-") as spool:
        governed = governed_run(n, Path(spool))
        print("CPU µs per governed point read (-M prepared; inline driver, cached decision, "
              "masking, each execution's record spooled; no TLS):")
        print(f"  {'inline driver + session':<28} {best(governed, args.repeat) / n * 1e6:6.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
