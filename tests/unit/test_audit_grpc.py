"""The tap side: an AuditWriter whose sink is policyd's AuditSink gRPC
service. Events are spooled on the producer, shipped in batches, stored
once even when a batch is sent again, and refused if they break the schema."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from shipping import ship_until_idle
from sqlalchemy import text

from pgwarden._proto import audit_pb2, audit_pb2_grpc
from policyd.audit.chain import CheckpointLog, load_or_create_key, verify
from policyd.audit.events import StatementEvent
from policyd.audit.service import add_to_server
from policyd.audit.sinks import Checkpointer, GrpcSink
from policyd.audit.spool import SpoolEntry
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter


@pytest.fixture
def policyd(tmp_path: Path) -> Iterator[tuple[str, AuditStore]]:
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    key = load_or_create_key(tmp_path / "key")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_to_server(server, store, Checkpointer(CheckpointLog(tmp_path / "cp.jsonl", key), every=50))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", store
    server.stop(grace=None)
    store.close()


def test_tap_writer_ships_to_policyd(tmp_path: Path, policyd: tuple[str, AuditStore]) -> None:
    target, store = policyd
    w = AuditWriter(spool_path=tmp_path / "tap-spool.jsonl", sink=GrpcSink(target),
                    component="tap", batch_size=40).start()
    for k in range(5):
        assert w.submit([StatementEvent(session_id="t", statement_seq=k * 30 + i,
                                        sql="SELECT '4111111111111111'", verdict="allow")
                         for i in range(1, 31)])
    assert w.close()
    with store.engine.connect() as c:
        got = [r[0] for r in c.execute(
            text("SELECT statement_seq FROM audit_statements ORDER BY seq"))]
        sql = c.execute(text("SELECT sql FROM audit_statements LIMIT 1")).scalar_one()
    assert got == list(range(1, 151))
    assert "4111111111111111" not in sql
    key = load_or_create_key(tmp_path / "key", create=False)
    report = verify(store, CheckpointLog(tmp_path / "cp.jsonl"), key.public_key())
    assert report.ok and report.checkpoints_covered >= 1


def test_resent_batch_is_stored_once(policyd: tuple[str, AuditStore]) -> None:
    target, store = policyd
    sink = GrpcSink(target)
    entries = [SpoolEntry(n, StatementEvent(session_id="d", statement_seq=n, sql="SELECT 1",
                                            verdict="allow").model_dump(mode="json"), 0)
               for n in range(1, 11)]
    assert sink.append("tap-a", entries[:6]) == 6
    assert sink.append("tap-a", entries) == 10  # 1..6 again: a retry after a timeout
    assert sink.position("tap-a") == 10
    assert sink.position("tap-b") == 0
    with store.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM audit_statements")).scalar_one() == 10
    sink.close()


def test_event_breaking_the_schema_is_refused(policyd: tuple[str, AuditStore]) -> None:
    target, _ = policyd
    with grpc.insecure_channel(target) as ch:
        stub = audit_pb2_grpc.AuditSinkStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Append(audit_pb2.AppendRequest(writer_id="x", events=[
                audit_pb2.SpooledEvent(n=1, event_json=b'{"type": "statement", "sql": 1}')]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_event_policyd_refuses_is_quarantined_and_the_rest_flows(
        tmp_path: Path, policyd: tuple[str, AuditStore]) -> None:
    """One event in the spool that breaks the schema (a producer bug) must not
    stop the audit trail: the shipper narrows the batch down to it, keeps its
    text in the quarantine file, records an ``event_quarantined`` record in
    its place, and stores every other event in order."""
    import json

    from policyd.audit.spool import Spool
    from policyd.audit.writer import SpoolShipper

    target, store = policyd
    spool_path = tmp_path / "tap-spool.jsonl"
    good = [StatementEvent(session_id="q", statement_seq=i, sql="SELECT 1",
                           verdict="allow").model_dump_json() for i in range(1, 10)]
    bad = '{"type":"statement","session_id":"q","statement_seq":"five","sql":1}'
    spool = Spool(spool_path)
    spool.append([*good[:4], bad, *good[4:]])
    spool.close()
    shipper = SpoolShipper(spool_path, GrpcSink(target), writer_id="tap-q", batch_size=8,
                           interval=0.01)
    ship_until_idle(shipper)
    with store.engine.connect() as c:
        seqs = [r[0] for r in c.execute(text(
            "SELECT statement_seq FROM audit_statements ORDER BY seq"))]
        gw = c.execute(text("SELECT action, detail FROM audit_gateway_events "
                            "WHERE action = 'event_quarantined'")).all()
    assert seqs == list(range(1, 10))
    assert len(gw) == 1
    detail = json.loads(gw[0][1]) if isinstance(gw[0][1], str) else gw[0][1]
    assert detail["spool_n"] == 5 and detail["writer_id"] == "tap-q"
    lines = shipper.quarantine_path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["event"] == bad
    assert json.loads(lines[0])["n"] == 5
    assert (shipper.quarantine_path.stat().st_mode & 0o777) == 0o600
    assert GrpcSink(target).position("tap-q") == 10
    key = load_or_create_key(tmp_path / "key", create=False)
    assert verify(store, CheckpointLog(tmp_path / "cp.jsonl"), key.public_key()).ok
