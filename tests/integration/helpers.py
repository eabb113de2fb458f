"""Helpers shared by the integration tests."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from omni.common.v1 import event_pb2
from omnistock.db import Pool
from omnistock.grpc.errors import bad_request, error_info


@dataclass(frozen=True)
class RpcFailure:
    """What a failed call told the client."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None
    violations: list[tuple[str, str]]


def failure(error: grpc.aio.AioRpcError) -> RpcFailure:
    """Decode a failed call's status and rich error details."""
    found = bad_request(error)
    return RpcFailure(
        code=error.code(),
        message=error.details() or "",
        info=error_info(error),
        violations=[(v.field, v.description) for v in found.field_violations] if found else [],
    )


@dataclass(frozen=True)
class LedgerRowCounts:
    """How many rows the ledger holds, to prove a rejected request wrote nothing."""

    movements: int
    postings: int
    outbox: int
    balance_versions: int
    transfers: int


async def ledger_row_counts(pool: Pool) -> LedgerRowCounts:
    """Count every table a movement could write to."""
    row = await pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM ledger.movements) AS movements,
               (SELECT count(*) FROM ledger.postings) AS postings,
               (SELECT count(*) FROM ledger.outbox) AS outbox,
               (SELECT coalesce(sum(version), 0) FROM ledger.balances) AS balance_versions,
               (SELECT count(*) FROM ledger.transfers) AS transfers
        """
    )
    assert row is not None
    return LedgerRowCounts(
        row["movements"], row["postings"], row["outbox"], row["balance_versions"], row["transfers"]
    )


async def read_stream(
    js: JetStreamContext, stream: str, start: int
) -> list[event_pb2.EventEnvelope]:
    """Every event of ``stream`` from sequence ``start`` to its current end, in order."""
    end = (await js.stream_info(stream)).state.last_seq
    subscription = await js.pull_subscribe(
        "omni.>",
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    envelopes = []
    last = start - 1
    while last < end:
        for message in await subscription.fetch(500, timeout=5):
            envelopes.append(event_pb2.EventEnvelope.FromString(message.data))
            last = message.metadata.sequence.stream
            await message.ack()
    await subscription.unsubscribe()
    return envelopes
