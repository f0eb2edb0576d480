"""maskd's gRPC service: mask batches of result values for the tap.

Stateless: each MaskBatch carries the plan, the columns and the rows, so any
replica can answer any batch and a restarted maskd is used again at once.
The gateway key (for ``hmac`` columns) comes from a key file or the
``PGWARDEN_MASK_KEY`` environment variable (hex); without one maskd refuses
to start rather than invent a key that would break joins across replicas.

Logs carry the statement id, row and value counts, never a value.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from maskd.engine import ColumnMeta, Masker, MaskStats
from pgwarden import metrics
from pgwarden._proto import mask_pb2 as pb
from pgwarden._proto import mask_pb2_grpc as pb_grpc
from tap.hooks import ColumnRule, MaskPlan

log = structlog.get_logger("maskd")

SERVICE_NAME = "pgwarden.mask.v1.MaskService"
KEY_ENV = "PGWARDEN_MASK_KEY"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def load_key(key_file: Path | None = None) -> bytes:
    """The gateway masking key: a file (raw bytes, or hex text) or the hex
    in ``PGWARDEN_MASK_KEY``. At least 16 bytes."""
    if key_file is not None:
        raw = key_file.read_bytes().strip()
        try:
            key = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = raw
    else:
        env = os.environ.get(KEY_ENV, "")
        if not env:
            raise ValueError(f"no masking key: pass --key-file or set {KEY_ENV} (hex)")
        key = bytes.fromhex(env)
    if len(key) < 16:
        raise ValueError("the masking key must be at least 16 bytes")
    return key


def plan_from_pb(plan: pb.MaskPlan) -> MaskPlan:
    return MaskPlan(rules=tuple(ColumnRule(r.column, r.style or "last4") for r in plan.rules),
                    derived_columns=tuple(plan.derived_columns),
                    scan_content=plan.scan_content, unmasked=plan.unmasked)


def plan_to_pb(plan: MaskPlan) -> pb.MaskPlan:
    return pb.MaskPlan(rules=[pb.ColumnRule(column=r.column, style=r.style) for r in plan.rules],
                       derived_columns=list(plan.derived_columns),
                       scan_content=plan.scan_content, unmasked=plan.unmasked)


def columns_from_pb(columns: Any) -> list[ColumnMeta]:
    return [ColumnMeta(c.name, c.table_column or None, c.type_oid, c.format,
                       c.style or None, c.derived) for c in columns]


def columns_to_pb(columns: list[ColumnMeta]) -> list[pb.Column]:
    return [pb.Column(name=c.name, table_column=c.table_column or "", type_oid=c.type_oid,
                      format=c.format, style=c.style or "", derived=c.derived)
            for c in columns]


def stats_to_pb(stats: MaskStats) -> pb.MaskStats:
    return pb.MaskStats(rows=stats.rows, values=stats.values, by_column=stats.by_column,
                        by_rule=stats.by_rule)


def stats_from_pb(stats: pb.MaskStats) -> MaskStats:
    return MaskStats(rows=stats.rows, values=stats.values, by_column=dict(stats.by_column),
                     by_rule=dict(stats.by_rule))


def rows_from_pb(rows: Any, ncols: int) -> list[list[bytes | None]]:
    out: list[list[bytes | None]] = []
    for r in rows:
        values: list[bytes | None] = list(r.values)
        if len(values) != ncols:
            raise ValueError("a row's value count differs from the column count")
        nulls = r.nulls
        if nulls:
            if len(nulls) != ncols:
                raise ValueError("a row's null flags differ from the column count")
            values = [None if n else v for v, n in zip(values, nulls, strict=True)]
        out.append(values)
    return out


def rows_to_pb(rows: list[list[bytes | None]]) -> list[pb.Row]:
    out = []
    for r in rows:
        if None in r:
            out.append(pb.Row(values=[b"" if v is None else v for v in r],
                              nulls=[v is None for v in r]))
        else:
            out.append(pb.Row(values=cast(list[bytes], r)))
    return out


class MaskServicer(pb_grpc.MaskServiceServicer):
    """MaskBatch over the in-process engine; a small cache keeps the Masker
    (and its resolved column shapes) of recent plans."""

    def __init__(self, key: bytes, *, cache_size: int = 256) -> None:
        self.key = key
        self.cache_size = cache_size
        self._maskers: OrderedDict[bytes, Masker] = OrderedDict()

    def _masker(self, plan: pb.MaskPlan) -> Masker:
        fingerprint = plan.SerializeToString(deterministic=True)
        masker = self._maskers.get(fingerprint)
        if masker is None:
            masker = Masker(plan_from_pb(plan), self.key)
            self._maskers[fingerprint] = masker
            if len(self._maskers) > self.cache_size:
                self._maskers.popitem(last=False)
        else:
            self._maskers.move_to_end(fingerprint)
        return masker

    def mask_batch(self, request: pb.MaskBatchRequest) -> pb.MaskBatchResponse:
        """The work of one MaskBatch; raises ValueError on a bad batch."""
        masker = self._masker(request.plan)
        columns = columns_from_pb(request.columns)
        rm = masker.prepare(columns)
        response = pb.MaskBatchResponse()
        if request.rows:
            rows = rows_from_pb(request.rows, len(columns))
            masked = rm.mask_rows(rows) if rm.needs_work else rows
            response.rows.extend(rows_to_pb(masked))
            if not rm.needs_work:
                rm.rows += len(rows)
        if request.datarows:
            response.datarows.extend(rm.mask_datarows(request.datarows))
        stats = rm.stats
        for rule, n in stats.by_rule.items():
            metrics.MASKED_VALUES.labels(rule=rule).inc(n)
        response.stats.CopyFrom(stats_to_pb(stats))
        return response

    async def MaskBatch(self, request: pb.MaskBatchRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.MaskBatchResponse:
        try:
            response = self.mask_batch(request)
        except ValueError as exc:
            # Messages come from maskd's own checks and never quote a value.
            log.warning("mask_batch_rejected", statement_id=request.statement_id,
                        error=str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            log.exception("mask_batch_failed", statement_id=request.statement_id)
            await context.abort(grpc.StatusCode.INTERNAL, "maskd failed to mask the batch")
        log.debug("mask_batch", statement_id=request.statement_id,
                  rows=response.stats.rows, masked=response.stats.values)
        return response


class MaskServer:
    """maskd as an object tests and the CLI start and stop."""

    def __init__(self, listen: str, key: bytes) -> None:
        self.listen = listen
        self.servicer = MaskServicer(key)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        """The address a client dials."""
        if self.listen.startswith("unix:"):
            return self.listen
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        pb_grpc.add_MaskServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.servicer, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.port = self.server.add_insecure_port(self.listen)
        if not self.listen.startswith("unix:") and self.port == 0:
            raise OSError(f"maskd could not listen on {self.listen}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("maskd_started", listen=self.target)

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        log.info("maskd_stopped")

    async def serve_forever(self) -> None:
        await self.start()
        try:
            assert self.server is not None
            await self.server.wait_for_termination()
        finally:
            await self.stop()
