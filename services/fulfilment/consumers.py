"""Event entrypoints of the fulfilment service.

``fulfilment-routing`` turns routing's facts into work: a routed or rerouted
order's new plan becomes one task per (source, kind); a cancellation stops
the tasks of the cancelled allocations that have not let their goods go.
"""

from __future__ import annotations

from typing import Any

from omni.common.v1 import event_pb2
from omni.routing.v1 import events_pb2 as routing_events
from omnistock.db import Connection
from omnistock.messaging.consumer import EventConsumer
from omnistock.service import ServiceContext, consumer
from services.fulfilment.handlers import SCHEMA, FulfilmentHandlers


def routing_consumer(context: ServiceContext, handlers: FulfilmentHandlers) -> EventConsumer:
    """The durable consumer of routing's order facts."""

    async def on_plan(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        await handlers.create_for_plan(conn, event.order)

    async def on_cancelled(conn: Connection, _: event_pb2.EventEnvelope, event: Any) -> None:
        cancelled = {(a.location_id, a.line_number) for a in event.cancelled_allocations}
        await handlers.cancel_for_order(
            conn, event.order.order_id, cancelled, event.reason_code or "ORDER_CANCELLED"
        )

    return consumer(
        context,
        name="fulfilment-routing",
        stream="OMNI_ROUTING",
        subjects=[
            "omni.routing.order.routed",
            "omni.routing.order.rerouted",
            "omni.routing.order.cancelled",
        ],
        schema=SCHEMA,
        handlers={
            routing_events.OrderRouted: on_plan,
            routing_events.OrderRerouted: on_plan,
            routing_events.OrderCancelled: on_cancelled,
        },
    )
