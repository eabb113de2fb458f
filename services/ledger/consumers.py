"""Event entrypoints of the stock ledger: translate, then call a handler.

- ``ledger-returns`` posts the movements of the returns order routing routed
  (``ReturnRouted`` on ``omni.routing.return.routed``): all lines of one return
  in one batch, in the consumer's transaction, so the inbox record and the
  movements commit together.
- ``ledger-fulfilment`` posts the goods fulfilment moves: a shipment to a
  customer (or a transfer out to a pickup store) when a fulfilment ships, the
  transfer in when the pickup store receives it, and a shipment from the
  pickup store when the customer collects; keyed ``fulfilment:<id>``.

A return the ledger cannot apply (unknown SKU or location, an invalid line, a
key reused with other content, stock that is not there) raises: the consumer
retries it a bounded number of times and then moves it to ``omni.dlq.ledger-
returns``, from where an operator replays it once the cause is fixed.
"""

from __future__ import annotations

from typing import Any

from omni.common.v1 import event_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.fulfilment.v1 import resources_pb2 as fulfilment_resources
from omni.routing.v1 import events_pb2 as routing_events
from omnistock.db import Connection
from omnistock.errors import DomainError
from omnistock.logs import get_logger
from omnistock.messaging.consumer import EventConsumer
from omnistock.service import ServiceContext, consumer
from services.ledger import convert, domain
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


def fulfilment_consumer(context: ServiceContext, handlers: LedgerHandlers) -> EventConsumer:
    """The durable consumer of goods leaving and arriving for fulfilments."""

    def fact(
        name: str, event: Any, location_id: str, transfer_to: str = ""
    ) -> domain.FulfilmentFact:
        return domain.FulfilmentFact(
            fact=name,
            fulfilment_id=event.fulfilment_id,
            order_id=event.order_id,
            location_id=location_id,
            lines=tuple((line.sku, line.quantity) for line in event.lines),
            transfer_to=transfer_to,
        )

    async def on_shipped(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        transfer = event.type == fulfilment_resources.FULFILMENT_TYPE_TRANSFER_TO_STORE
        destination = event.destination_location_id if transfer else ""
        await handlers.record_fulfilment(
            conn, fact("shipped", event, event.location_id, destination)
        )

    async def on_received(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.record_fulfilment(conn, fact("received", event, event.location_id))

    async def on_collected(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.record_fulfilment(conn, fact("collected", event, event.location_id))

    return consumer(
        context,
        name="ledger-fulfilment",
        stream="OMNI_FULFILMENT",
        subjects=[
            "omni.fulfilment.fulfilment.shipped",
            "omni.fulfilment.fulfilment.transfer_received",
            "omni.fulfilment.fulfilment.collected",
        ],
        schema=SCHEMA,
        handlers={
            fulfilment_events.FulfilmentShipped: on_shipped,
            fulfilment_events.TransferReceived: on_received,
            fulfilment_events.FulfilmentCollected: on_collected,
        },
    )
