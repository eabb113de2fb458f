"""Event entrypoints of the routing service: translate, then call a handler.

- ``routing-ledger`` keeps the locations the ledger announces (positions,
  capabilities, capacity), which the planner works on.
- ``routing-fulfilment`` follows each order's fulfilments: shipped and
  collected units, and sources that failed (rejected, short-picked, timed out,
  cancelled), which the routing worker then reroutes.
- ``routing-reservation`` follows holds that fell short (stock lost at the
  source), which are rerouted the same way.
"""

from __future__ import annotations

from typing import Any

from omni.common.v1 import event_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.ledger.v1 import events_pb2 as ledger_events
from omni.reservation.v1 import events_pb2 as reservation_events
from omnistock.db import Connection
from omnistock.logs import get_logger
from omnistock.messaging.consumer import EventConsumer
from omnistock.service import ServiceContext, consumer
from services.routing import convert, domain
from services.routing.domain import Quantity
from services.routing.handlers import SCHEMA, RoutingHandlers, new_ids

log = get_logger(__name__)


def _goods(event: Any) -> list[Quantity]:
    return [Quantity(line.sku, line.quantity) for line in event.lines]


def ledger_consumer(context: ServiceContext, handlers: RoutingHandlers) -> EventConsumer:
    """The durable consumer of the ledger's location announcements."""

    async def on_location(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        location = convert.location_in(event.location)
        if location is None:
            log.warning("location of unknown kind ignored", location_id=event.location.location_id)
            return
        await handlers.apply_location(conn, location)

    return consumer(
        context,
        name="routing-ledger",
        stream="OMNI_LEDGER",
        subjects=["omni.ledger.location.upserted"],
        schema=SCHEMA,
        handlers={ledger_events.LocationUpserted: on_location},
    )


def fulfilment_consumer(context: ServiceContext, handlers: RoutingHandlers) -> EventConsumer:
    """The durable consumer of fulfilment's facts about routed orders."""

    async def on_shipped(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        goods = _goods(event)
        await handlers.apply_fact(
            conn, event.order_id, lambda o: domain.record_shipped(o, event.location_id, goods)
        )

    async def on_collected(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        goods = _goods(event)
        await handlers.apply_fact(
            conn, event.order_id, lambda o: domain.record_collected(o, event.location_id, goods)
        )

    async def on_rejected(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.apply_fact(
            conn,
            event.order_id,
            lambda o: domain.record_failure(o, event.location_id, None, new_ids()),
            cause="FULFILMENT_REJECTED",
        )

    async def on_cancelled(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        # Work the order cancelled is CANCELLED already and unaffected; work a
        # location cancelled on its own is routed elsewhere (just its units).
        stopped = _goods(event)
        await handlers.apply_fact(
            conn,
            event.order_id,
            lambda o: domain.record_failure(o, event.location_id, stopped, new_ids()),
            cause="FULFILMENT_CANCELLED",
        )

    async def on_short(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        missing = [Quantity(line.sku, line.quantity) for line in event.short_lines]
        await handlers.apply_fact(
            conn,
            event.order_id,
            lambda o: domain.record_failure(o, event.location_id, missing, new_ids()),
            cause="SHORT_PICK",
        )

    async def on_expired(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        if event.cause == fulfilment_events.EXPIRY_CAUSE_PICKUP_NOT_COLLECTED:
            await handlers.apply_fact(
                conn,
                event.order_id,
                lambda o: domain.record_pickup_expired(o, event.location_id),
            )
            return
        await handlers.apply_fact(
            conn,
            event.order_id,
            lambda o: domain.record_failure(o, event.location_id, None, new_ids()),
            cause="TASK_EXPIRED",
        )

    return consumer(
        context,
        name="routing-fulfilment",
        stream="OMNI_FULFILMENT",
        subjects=[
            "omni.fulfilment.fulfilment.shipped",
            "omni.fulfilment.fulfilment.collected",
            "omni.fulfilment.fulfilment.rejected",
            "omni.fulfilment.fulfilment.cancelled",
            "omni.fulfilment.fulfilment.short_picked",
            "omni.fulfilment.fulfilment.expired",
        ],
        schema=SCHEMA,
        handlers={
            fulfilment_events.FulfilmentShipped: on_shipped,
            fulfilment_events.FulfilmentCollected: on_collected,
            fulfilment_events.FulfilmentRejected: on_rejected,
            fulfilment_events.FulfilmentCancelled: on_cancelled,
            fulfilment_events.FulfilmentShortPicked: on_short,
            fulfilment_events.FulfilmentExpired: on_expired,
        },
    )


def reservation_consumer(context: ServiceContext, handlers: RoutingHandlers) -> EventConsumer:
    """The durable consumer of order holds that fell short."""

    async def on_short(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        reservation = event.reservation
        lines = list(event.line_numbers)

        def change(order: domain.Order) -> domain.Order:
            changed, _ = domain.record_hold_short(
                order, reservation.reservation_id, lines, new_ids()
            )
            return changed

        await handlers.apply_fact(conn, reservation.reference, change, cause="HOLD_SHORT")

    return consumer(
        context,
        name="routing-reservation",
        stream="OMNI_RESERVATION",
        subjects=["omni.reservation.reservation.short"],
        schema=SCHEMA,
        handlers={reservation_events.ReservationShort: on_short},
    )
