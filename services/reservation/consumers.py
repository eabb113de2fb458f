"""Event entrypoints of the reservation service: translate, then call a handler.

- ``reservation-ledger`` projects sellable on-hand from the ledger's StockMoved
  and remembers the SKUs and locations it announces.
- ``reservation-fulfilment`` consumes order holds when goods leave, releases
  them when a fulfilment is cancelled or short-picked, and holds the goods a
  transfer brought to the pickup store until they are collected.
- :class:`AvailabilityFeed` listens (plain NATS, every replica) to the
  service's own AvailabilityChanged events and feeds the watch hub.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from omni.common.v1 import event_pb2, types_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.ledger.v1 import events_pb2 as ledger_events
from omni.ledger.v1 import resources_pb2 as ledger_resources
from omni.reservation.v1 import events_pb2
from omnistock import wire
from omnistock.contract import fulfilment_of
from omnistock.db import Connection
from omnistock.logs import get_logger
from omnistock.messaging.consumer import EventConsumer
from omnistock.messaging.envelope import occurred_at, unpack
from omnistock.service import ServiceContext, consumer
from services.reservation import convert
from services.reservation.handlers import (
    AVAILABILITY_SUBJECT,
    RULES_SUBJECT,
    SCHEMA,
    Posting,
    ReservationHandlers,
    StockMovedFacts,
)
from services.reservation.watch import AvailabilityHub

log = get_logger(__name__)
M = TypeVar("M", events_pb2.AvailabilityChanged, events_pb2.AvailabilityRulesChanged)

_MOVEMENT_KINDS = {
    value: name.removeprefix("MOVEMENT_KIND_").lower()
    for name, value in ledger_resources.MovementKind.items()
}


def stock_moved_facts(event: ledger_events.StockMoved) -> StockMovedFacts:
    """The sellable postings of a StockMoved, in the order the ledger wrote them."""
    movement = event.movement
    return StockMovedFacts(
        kind=_MOVEMENT_KINDS.get(movement.kind, "unspecified"),
        recorded_at=wire.to_datetime(movement.recorded_at),
        postings=tuple(
            Posting(
                p.stock.sku,
                p.stock.location_id,
                p.on_hand_after,
                p.balance_version,
                p.quantity_delta,
            )
            for p in movement.postings
            if p.stock.state == types_pb2.STOCK_STATE_SELLABLE
        ),
        fulfilment_id=fulfilment_of(movement.key.device_id),
    )


def ledger_consumer(context: ServiceContext, handlers: ReservationHandlers) -> EventConsumer:
    """The durable consumer of the ledger's facts."""

    async def on_stock_moved(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.apply_stock_moved(conn, stock_moved_facts(event))

    async def on_location(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.apply_location(conn, event.location.location_id, event.location.closed)

    async def on_sku(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.apply_sku(conn, event.sku.sku)

    return consumer(
        context,
        name="reservation-ledger",
        stream="OMNI_LEDGER",
        # One consumer for all three keeps their commit order: a SKU is known
        # before the first movement of it arrives.
        subjects=[
            "omni.ledger.stock.moved",
            "omni.ledger.location.upserted",
            "omni.ledger.sku.upserted",
        ],
        schema=SCHEMA,
        handlers={
            ledger_events.StockMoved: on_stock_moved,
            ledger_events.LocationUpserted: on_location,
            ledger_events.SkuUpserted: on_sku,
        },
    )


def fulfilment_consumer(context: ServiceContext, handlers: ReservationHandlers) -> EventConsumer:
    """The durable consumer of fulfilment's facts that end order holds."""

    async def on_left(conn: Connection, envelope: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.consume_for_fulfilment(
            conn,
            fulfilment_id=event.fulfilment_id,
            order_id=event.order_id,
            location_id=event.location_id,
            lines=[(line.sku, line.quantity) for line in event.lines],
        )

    async def on_cancelled(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.release_for_fulfilment(
            conn,
            order_id=event.order_id,
            location_id=event.location_id,
            skus=[line.sku for line in event.lines],
            reason_code=event.reason_code or "FULFILMENT_CANCELLED",
        )

    async def on_short(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.release_short_picked(
            conn,
            order_id=event.order_id,
            location_id=event.location_id,
            lines=[(line.sku, line.quantity) for line in event.short_lines],
            reason_code="SHORT_PICK",
        )

    async def on_transfer_received(
        conn: Connection, envelope: event_pb2.EventEnvelope, event: Any
    ) -> None:
        await handlers.hold_arrived_transfer(
            conn,
            fulfilment_id=event.fulfilment_id,
            order_id=event.order_id,
            location_id=event.location_id,
            lines=[(line.sku, line.quantity) for line in event.lines],
            received_at=occurred_at(envelope),
        )

    return consumer(
        context,
        name="reservation-fulfilment",
        stream="OMNI_FULFILMENT",
        subjects=[
            "omni.fulfilment.fulfilment.shipped",
            "omni.fulfilment.fulfilment.collected",
            "omni.fulfilment.fulfilment.cancelled",
            "omni.fulfilment.fulfilment.short_picked",
            "omni.fulfilment.fulfilment.transfer_received",
        ],
        schema=SCHEMA,
        handlers={
            fulfilment_events.FulfilmentShipped: on_left,
            fulfilment_events.FulfilmentCollected: on_left,
            fulfilment_events.FulfilmentCancelled: on_cancelled,
            fulfilment_events.FulfilmentShortPicked: on_short,
            fulfilment_events.TransferReceived: on_transfer_received,
        },
    )


class AvailabilityFeed:
    """Feeds this replica's watch hub from the availability events of every replica."""

    name = "reservation-availability-feed"

    def __init__(self, nats: Client, hub: AvailabilityHub, lag_check_interval: float) -> None:
        self._nats = nats
        self._hub = hub
        self._lag_check_interval = lag_check_interval
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Listen until :meth:`stop`."""
        subscriptions: list[NatsSubscription] = [
            await self._nats.subscribe(AVAILABILITY_SUBJECT, cb=self._on_availability),
            await self._nats.subscribe(RULES_SUBJECT, cb=self._on_rules),
        ]
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._lag_check_interval)
                self._hub.drop_lagging()
        finally:
            for subscription in subscriptions:
                await subscription.unsubscribe()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()

    async def _on_availability(self, message: Msg) -> None:
        event = _payload(message, events_pb2.AvailabilityChanged)
        if event is not None:
            self._hub.publish(convert.figure_in(f) for f in event.figures)

    async def _on_rules(self, message: Msg) -> None:
        if _payload(message, events_pb2.AvailabilityRulesChanged) is not None:
            self._hub.rules_changed()


def _payload(message: Msg, message_type: type[M]) -> M | None:
    try:
        envelope = event_pb2.EventEnvelope.FromString(message.data)
    except DecodeError:  # a foreign or broken message on our subject: log it, keep listening
        log.warning("reservation.feed_undecodable", subject=message.subject)
        return None
    return unpack(envelope, message_type)
