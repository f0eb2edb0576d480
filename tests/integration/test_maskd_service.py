"""maskd end to end: MaskClient -> gRPC -> MaskService -> engine, in process.

The server runs on a free loopback port inside the test's event loop; the
tests stop it and check that the client fails closed, then start a new one
on the same port and check that the client recovers without being rebuilt.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maskd.client import MaskClient, MaskUnavailable
from maskd.detect import contains_pan
from maskd.engine import ColumnMeta
from maskd.server import SERVICE_NAME, MaskServer
from maskd.styles import Oid
from maskd.wire import build_datarow, parse_datarow
from tap.hooks import ColumnRule, MaskPlan

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="function")]

KEY = bytes(range(32))
PLAN = MaskPlan(rules=(ColumnRule("public.payments.card_number", "last4"),
                       ColumnRule("public.payments.card_token", "hmac")))
COLUMNS = [
    ColumnMeta("id", None, Oid.INT8, 1),
    ColumnMeta("card_number", "public.payments.card_number", Oid.TEXT, 0),
    ColumnMeta("note", None, Oid.TEXT, 0),
    ColumnMeta("card_token", "public.payments.card_token", Oid.TEXT, 0),
]
ROWS: list[list[bytes | None]] = [
    [struct.pack(">q", 1), b"4111 1111 1111 1111", b"card 5555555555554444", b"tok"],
    [struct.pack(">q", 4111111111111111), None, b"fine", None],
]


@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[MaskServer]:
    srv = MaskServer("127.0.0.1:0", KEY)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def test_mask_batch_rows_and_datarows(server: MaskServer) -> None:
    async with MaskClient(server.target, deadline=5.0) as client:
        rows, stats = await client.mask_rows(PLAN, COLUMNS, ROWS, statement_id="st-1")
        assert rows[0][1] == b"XXXX XXXX XXXX 1111"
        assert rows[0][2] == b"card XXXXXXXXXXXX4444"
        assert rows[0][3] is not None and len(rows[0][3]) == 16
        assert struct.unpack(">q", rows[1][0] or b"")[0] == 1111  # int8 PAN by content
        assert rows[1][1] is None and rows[1][3] is None
        assert not any(v is not None and contains_pan(v) for r in rows for v in r)
        assert stats.rows == 2
        assert stats.by_rule == {"last4": 1, "hmac": 1, "content": 2}
        assert stats.by_column == {"card_number": 1, "card_token": 1, "note": 1, "id": 1}

        bodies = [build_datarow(r) for r in ROWS]
        masked, stats2 = await client.mask_datarows(PLAN, COLUMNS, bodies)
        assert [parse_datarow(b) for b in masked] == rows
        assert stats2.as_dict() == stats.as_dict()

        # raw access granted by the policy: values come back untouched
        raw, st = await client.mask_rows(MaskPlan(unmasked=True), COLUMNS, ROWS)
        assert raw == ROWS and st.values == 0


async def test_health_serving(server: MaskServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        for name in ("", SERVICE_NAME):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_batch_is_refused_without_values(server: MaskServer) -> None:
    async with MaskClient(server.target, deadline=5.0) as client:
        with pytest.raises(MaskUnavailable) as err:
            await client.mask_rows(MaskPlan(rules=(ColumnRule("a.b.c", "show"),)),
                                   COLUMNS, ROWS)
        assert err.value.code == "INVALID_ARGUMENT"
        bad_row: list[bytes | None] = [b"4111111111111111"]
        with pytest.raises(MaskUnavailable) as err2:
            await client.mask_rows(PLAN, COLUMNS, [bad_row])
        assert "4111" not in str(err2.value) and "4111" not in str(err.value)


async def test_client_fails_closed_when_maskd_dies_and_recovers() -> None:
    srv = MaskServer("127.0.0.1:0", KEY)
    await srv.start()
    port = srv.port
    client = MaskClient(srv.target, deadline=2.0)
    try:
        rows, _ = await client.mask_rows(PLAN, COLUMNS, ROWS)
        assert rows[0][1] == b"XXXX XXXX XXXX 1111"
        await srv.stop(0)
        with pytest.raises(MaskUnavailable) as err:
            await client.mask_rows(PLAN, COLUMNS, ROWS)
        assert err.value.sqlstate == "58000"
        assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        assert "4111" not in str(err.value)
        # maskd comes back on the same address: the same client works again
        srv = MaskServer(f"127.0.0.1:{port}", KEY)
        await srv.start()
        for _ in range(50):  # bounded retry while the channel reconnects
            try:
                rows, _ = await client.mask_rows(PLAN, COLUMNS, ROWS)
                break
            except MaskUnavailable:
                continue
        assert rows[0][1] == b"XXXX XXXX XXXX 1111"
    finally:
        await client.close()
        await srv.stop(0)
