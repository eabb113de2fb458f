"""Event entrypoints of the stock ledger: translate, then call a handler.

- ``ledger-returns`` posts the movements of the returns order routing routed
  (``ReturnRouted`` on ``omni.routing.return.routed``): all lines of one return
  in one batch, in the consumer's transaction, so the inbox record and the
  movements commit together.

A return the ledger cannot apply (unknown SKU or location, an invalid line, a
key reused with other content, stock that is not there) raises: the consumer
retries it a bounded number of times and then moves it to ``omni.dlq.ledger-
returns``, from where an operator replays it once the cause is fixed.
"""

from __future__ import annotations

from typing import Any

from omni.common.v1 import event_pb2
from omni.routing.v1 import events_pb2 as routing_events
from omnistock.db import Connection
from omnistock.errors import DomainError
from omnistock.logs import get_logger
from omnistock.messaging.consumer import EventConsumer
from omnistock.service import ServiceContext, consumer
from services.ledger import convert
from services.ledger.handlers import SCHEMA, LedgerHandlers

log = get_logger(__name__)

RETURNS_CONSUMER = "ledger-returns"
ROUTING_STREAM = "OMNI_ROUTING"
RETURN_ROUTED_SUBJECT = "omni.routing.return.routed"


def returns_consumer(context: ServiceContext, handlers: LedgerHandlers) -> EventConsumer:
    """The durable consumer of order routing's routed returns."""

    async def on_return_routed(
        conn: Connection, envelope: event_pb2.EventEnvelope, event: Any
    ) -> None:
        routed = convert.routed_return_in(event)
        try:
            await handlers.record_return(conn, routed)
        except DomainError as error:
            # Named here with the return; the consumer retries, then dead-letters.
            log.warning(
                "ledger.return_refused",
                return_id=routed.return_id,
                order_id=event.order_return.order_id,
                location_id=routed.location_id,
                reason=error.reason,
                error=error.message,
            )
            raise

    return consumer(
        context,
        name=RETURNS_CONSUMER,
        stream=ROUTING_STREAM,
        subjects=[RETURN_ROUTED_SUBJECT],
        schema=SCHEMA,
        handlers={routing_events.ReturnRouted: on_return_routed},
    )
