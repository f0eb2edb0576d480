"""The tap's client of maskd: one call per batch, with a deadline.

Any failure (maskd down, slow past the deadline, a rejected batch) raises
:class:`MaskUnavailable`. The tap must then replace the result with an
ErrorResponse (``exc.sqlstate``, ``str(exc)``) and never forward the rows
unmasked (PCI DSS 10.7.2: failures of security controls are handled by
failing closed). A maskd that comes back is used again on the next call:
the channel reconnects by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from maskd.engine import ColumnMeta, MaskError, MaskStats
from maskd.server import (
    MAX_MESSAGE_BYTES,
    columns_to_pb,
    plan_to_pb,
    rows_from_pb,
    rows_to_pb,
    stats_from_pb,
)
from pgwarden._proto import mask_pb2 as pb
from pgwarden._proto import mask_pb2_grpc as pb_grpc
from tap.hooks import MaskPlan

__all__ = ["MaskClient", "MaskUnavailable"]


class MaskUnavailable(MaskError):
    """maskd could not mask the batch; the result must be refused.

    ``sqlstate`` is what the tap puts in the ErrorResponse (58000:
    system_error, the class PostgreSQL uses for failures outside SQL). The
    message names the gRPC status only, never a value."""

    sqlstate = "58000"

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        super().__init__(
            f"result withheld: the masking service is unavailable ({code}"
            f"{': ' + detail if detail else ''}); retry the statement later")


class MaskClient:
    """Async client of MaskService. Create once per tap, share by sessions."""

    def __init__(self, target: str, *, deadline: float = 1.0) -> None:
        self.target = target
        self.deadline = deadline
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.MaskServiceStub | None = None

    async def start(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ])
            self._stub = pb_grpc.MaskServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> MaskClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, request: pb.MaskBatchRequest) -> pb.MaskBatchResponse:
        if self._stub is None:
            await self.start()
        assert self._stub is not None
        try:
            response: pb.MaskBatchResponse = await self._stub.MaskBatch(
                request, timeout=self.deadline, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() if exc.code() is grpc.StatusCode.INVALID_ARGUMENT else ""
            raise MaskUnavailable(exc.code().name, detail or "") from None
        except grpc.aio.UsageError as exc:  # channel closed under us
            raise MaskUnavailable("CHANNEL_CLOSED") from exc
        return response

    async def mask_rows(self, plan: MaskPlan, columns: Sequence[ColumnMeta],
                        rows: Sequence[Sequence[bytes | None]], *, statement_id: str = "",
                        ) -> tuple[list[list[bytes | None]], MaskStats]:
        """Masked copies of ``rows`` (field values, None = NULL) and stats."""
        request = pb.MaskBatchRequest(
            statement_id=statement_id, plan=plan_to_pb(plan), columns=columns_to_pb(
                list(columns)), rows=rows_to_pb([list(r) for r in rows]))
        response = await self._call(request)
        try:
            out = rows_from_pb(response.rows, len(columns))
        except ValueError as exc:
            raise MaskUnavailable("BAD_RESPONSE", str(exc)) from None
        if len(out) != len(rows):
            raise MaskUnavailable("BAD_RESPONSE", "row count differs")
        return out, stats_from_pb(response.stats)

    async def mask_datarows(self, plan: MaskPlan, columns: Sequence[ColumnMeta],
                            bodies: Sequence[bytes], *, statement_id: str = "",
                            ) -> tuple[list[bytes], MaskStats]:
        """Masked DataRow bodies (after 'D' and length), re-framed, and stats."""
        request = pb.MaskBatchRequest(
            statement_id=statement_id, plan=plan_to_pb(plan),
            columns=columns_to_pb(list(columns)), datarows=list(bodies))
        response = await self._call(request)
        if len(response.datarows) != len(bodies):
            raise MaskUnavailable("BAD_RESPONSE", "row count differs")
        return list(response.datarows), stats_from_pb(response.stats)
