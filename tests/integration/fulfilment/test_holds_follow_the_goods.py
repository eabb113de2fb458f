"""Order holds follow the goods: through a transfer, a short pick and a pickup nobody collects.

After each story the order holds exactly what is still waiting for the
customer, and every channel's availability is on-hand minus held.
"""

from __future__ import annotations

import uuid

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from omni.common.v1 import event_pb2, types_pb2
from omni.fulfilment.v1 import events_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as pb
from omni.fulfilment.v1 import resources_pb2 as res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.reservation.v1 import events_pb2 as reservation_events
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.routing.v1 import resources_pb2 as routing_pb
from omni.routing.v1 import routing_service_pb2 as routing_service_pb
from omnistock.db import Pool
from omnistock.messaging.envelope import unpack
from tests.integration.conftest import eventually
from tests.integration.fulfilment.conftest import FulfilmentStub
from tests.integration.helpers import read_stream
from tests.integration.routing.conftest import AMSTERDAM, NIEUWEGEIN, TILBURG, UTRECHT, World

READY_SUBJECT = "omni.fulfilment.fulfilment.ready_for_pickup"


def rid() -> str:
    return f"step-{uuid.uuid4().hex[:12]}"


async def task_at(fulfilment: FulfilmentStub, location_id: str, order_id: str) -> res.Fulfilment:
    async def tasks() -> list[res.Fulfilment]:
        found = await fulfilment.ListFulfilments(pb.ListFulfilmentsRequest(location_id=location_id))
        return [f for f in found.fulfilments if f.order_id == order_id]

    (task,) = await eventually(tasks, lambda found: len(found) == 1)
    return task


async def send_off(fulfilment: FulfilmentStub, task: res.Fulfilment, picked: int) -> None:
    """Accept, pick ``picked`` units of the task's one SKU, pack and ship."""
    fid = task.fulfilment_id
    await fulfilment.AcceptFulfilment(
        pb.AcceptFulfilmentRequest(request_id=rid(), fulfilment_id=fid)
    )
    pick = pb.ConfirmPickRequest(request_id=rid(), fulfilment_id=fid, reason_code="NOT_ON_SHELF")
    pick.lines.add(sku=task.items[0].sku, picked_quantity=picked)
    await fulfilment.ConfirmPick(pick)
    await fulfilment.PackFulfilment(pb.PackFulfilmentRequest(request_id=rid(), fulfilment_id=fid))
    await fulfilment.ShipFulfilment(
        pb.ShipFulfilmentRequest(
            request_id=rid(), fulfilment_id=fid, carrier="postnl", tracking_number="3SABC"
        )
    )


async def pickup_code(js: JetStreamContext, fulfilment_id: str) -> str:
    """The code the customer's channel learns from FulfilmentReadyForPickup."""

    async def last_ready() -> events_pb2.FulfilmentReadyForPickup | None:
        try:
            message = await js.get_last_msg("OMNI_FULFILMENT", READY_SUBJECT)
        except NotFoundError:  # nothing relayed yet
            return None
        assert message.data is not None
        envelope = event_pb2.EventEnvelope.FromString(message.data)
        return unpack(envelope, events_pb2.FulfilmentReadyForPickup)

    ready = await eventually(
        last_ready, lambda event: event is not None and event.fulfilment_id == fulfilment_id
    )
    assert ready is not None
    return ready.pickup_code


async def sellable(world: World, sku: str, name: str) -> int:
    found = await world.ledger.GetStockLevels(
        ledger_pb.GetStockLevelsRequest(
            skus=[sku], location_ids=[world.id(name)], states=[types_pb2.STOCK_STATE_SELLABLE]
        )
    )
    return sum(level.on_hand for level in found.levels)


async def test_goods_a_transfer_brings_stay_held_at_the_pickup_store_until_collected(
    world: World, fulfilment: FulfilmentStub, js: JetStreamContext
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "tilburg": ("dc", TILBURG)})
    (sku,) = world.skus
    await world.stock(sku, "tilburg", 5)
    await world.known_to_routing()
    order = await world.route([(sku, 2)], pickup="utrecht")
    assert await world.held_lines(order.order_id) == {(sku, world.id("tilburg")): 2}

    transfer = await task_at(fulfilment, world.id("tilburg"), order.order_id)
    assert transfer.type == res.FULFILMENT_TYPE_TRANSFER_TO_STORE
    await send_off(fulfilment, transfer, picked=2)
    # In transit: the DC's hold is used, the goods are nobody's to sell.
    await eventually(lambda: world.held_lines(order.order_id), lambda held: held == {})
    await eventually(lambda: sellable(world, sku, "tilburg"), lambda units: units == 3)

    await fulfilment.ReceiveTransfer(
        pb.ReceiveTransferRequest(request_id=rid(), fulfilment_id=transfer.fulfilment_id)
    )
    # Arrived: on the pickup store's shelf, held for this order, not for sale.
    await eventually(
        lambda: world.held_lines(order.order_id),
        lambda held: held == {(sku, world.id("utrecht")): 2},
    )
    await eventually(lambda: sellable(world, sku, "utrecht"), lambda units: units == 2)
    assert await world.available(sku, "utrecht") == 0

    await fulfilment.MarkReadyForPickup(
        pb.MarkReadyForPickupRequest(request_id=rid(), fulfilment_id=transfer.fulfilment_id)
    )
    code = await pickup_code(js, transfer.fulfilment_id)
    collected = await fulfilment.CollectFulfilment(
        pb.CollectFulfilmentRequest(
            request_id=rid(), fulfilment_id=transfer.fulfilment_id, pickup_code=code
        )
    )
    assert collected.fulfilment.status == res.FULFILMENT_STATUS_COLLECTED

    await eventually(
        lambda: world.get(order.order_id),
        lambda o: o.status == routing_pb.ORDER_STATUS_FULFILLED,
    )
    await eventually(lambda: world.held_lines(order.order_id), lambda held: held == {})
    await eventually(lambda: sellable(world, sku, "utrecht"), lambda units: units == 0)
    assert await world.available(sku, "utrecht") == 0
    assert await world.available(sku, "tilburg") == 3


async def test_a_short_pick_lets_go_of_the_missing_units_and_ships_the_rest(
    world: World, fulfilment: FulfilmentStub
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 3)
    await world.stock(sku, "amsterdam", 5)
    await world.known_to_routing()
    order = await world.route([(sku, 3)], to=NIEUWEGEIN)
    assert await world.held_lines(order.order_id) == {(sku, world.id("utrecht")): 3}

    store_task = await task_at(fulfilment, world.id("utrecht"), order.order_id)
    await send_off(fulfilment, store_task, picked=2)

    # The missing unit is held in Amsterdam and is work there; the store holds nothing.
    await eventually(
        lambda: world.held_lines(order.order_id),
        lambda held: held == {(sku, world.id("amsterdam")): 1},
    )
    other_task = await task_at(fulfilment, world.id("amsterdam"), order.order_id)
    assert [(i.sku, i.quantity) for i in other_task.items] == [(sku, 1)]
    await eventually(lambda: sellable(world, sku, "utrecht"), lambda units: units == 1)
    # The store still counts the unit it could not find (a cycle count settles it),
    # and nothing holds it for this order any more.
    assert await world.available(sku, "utrecht") == 1

    await send_off(fulfilment, other_task, picked=1)
    await eventually(
        lambda: world.get(order.order_id),
        lambda o: o.status == routing_pb.ORDER_STATUS_FULFILLED,
    )
    await eventually(lambda: world.held_lines(order.order_id), lambda held: held == {})
    assert await world.available(sku, "amsterdam") == 4


async def test_a_pickup_nobody_collects_expires_and_its_stock_is_for_sale_again(
    world: World, fulfilment: FulfilmentStub, pool: Pool
) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 2)
    await world.known_to_routing()
    order = await world.route([(sku, 2)], pickup="utrecht")
    task = await task_at(fulfilment, world.id("utrecht"), order.order_id)
    fid = task.fulfilment_id
    await fulfilment.AcceptFulfilment(
        pb.AcceptFulfilmentRequest(request_id=rid(), fulfilment_id=fid)
    )
    pick = pb.ConfirmPickRequest(request_id=rid(), fulfilment_id=fid)
    pick.lines.add(sku=sku, picked_quantity=2)
    await fulfilment.ConfirmPick(pick)
    await fulfilment.MarkReadyForPickup(
        pb.MarkReadyForPickupRequest(request_id=rid(), fulfilment_id=fid)
    )
    assert await world.available(sku, "utrecht") == 0

    # A week passes: the task's collect-by time is behind us.
    await pool.execute(
        "UPDATE fulfilment.fulfilments SET collect_by = now() - interval '1 second' "
        "WHERE fulfilment_id = $1",
        uuid.UUID(fid),
    )

    expired = await eventually(
        lambda: fulfilment.GetFulfilment(pb.GetFulfilmentRequest(fulfilment_id=fid)),
        lambda found: found.fulfilment.status == res.FULFILMENT_STATUS_EXPIRED,
    )
    assert expired.fulfilment.reason_code == "NOT_COLLECTED"
    await eventually(lambda: world.held_lines(order.order_id), lambda held: held == {})
    await eventually(lambda: world.available(sku, "utrecht"), lambda units: units == 2)
    assert await sellable(world, sku, "utrecht") == 2  # the goods stayed in the store
    closed = await world.get(order.order_id)
    assert closed.status == routing_pb.ORDER_STATUS_CANCELLED


async def test_shipped_units_are_never_offered_again_while_the_ledger_catches_up(
    world: World, fulfilment: FulfilmentStub, js: JetStreamContext
) -> None:
    # The reservation service hears of a shipment twice: fulfilment's event uses
    # the hold, the ledger's movement lowers on-hand. Between the two, the units
    # must not count as available again.
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 3)
    await world.known_to_routing()
    order = await world.route([(sku, 1)], to=NIEUWEGEIN)
    assert await world.available(sku, "utrecht") == 2
    start = (await js.stream_info("OMNI_RESERVATION")).state.last_seq + 1

    await send_off(fulfilment, await task_at(fulfilment, world.id("utrecht"), order.order_id), 1)
    await eventually(lambda: sellable(world, sku, "utrecht"), lambda units: units == 2)
    await eventually(lambda: world.held_lines(order.order_id), lambda held: held == {})

    published = [
        figure
        for envelope in await read_stream(js, "OMNI_RESERVATION", start)
        if (changed := unpack(envelope, reservation_events.AvailabilityChanged)) is not None
        for figure in changed.figures
        if figure.sku == sku and figure.location_id == world.id("utrecht")
    ]
    assert published, "the shipment changed no figure"
    assert max(f.available for f in published) == 2, [
        (f.available, f.reserved, f.on_hand) for f in published
    ]
    final = await world.reservations.GetAvailability(
        reservation_pb.GetAvailabilityRequest(
            channel=world.channel, skus=[sku], location_ids=[world.id("utrecht")]
        )
    )
    (figure,) = final.availability[0].locations
    assert (figure.on_hand, figure.reserved, figure.available) == (2, 0, 2)


async def test_a_transfer_whose_order_is_cancelled_on_the_road_becomes_the_stores_stock(
    world: World, fulfilment: FulfilmentStub
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "tilburg": ("dc", TILBURG)})
    (sku,) = world.skus
    await world.stock(sku, "tilburg", 5)
    await world.known_to_routing()
    order = await world.route([(sku, 2)], pickup="utrecht")
    transfer = await task_at(fulfilment, world.id("tilburg"), order.order_id)
    await send_off(fulfilment, transfer, picked=2)
    # On the road, the transfer is in the pickup store's queue: it will receive it.
    incoming = await task_at(fulfilment, world.id("utrecht"), order.order_id)
    assert incoming.fulfilment_id == transfer.fulfilment_id

    cancelled = await world.routing.CancelOrder(
        routing_service_pb.CancelOrderRequest(
            request_id=rid(), order_id=order.order_id, reason_code="CUSTOMER_REQUEST"
        )
    )
    assert cancelled.order.status == routing_pb.ORDER_STATUS_CANCELLED
    # The goods still arrive: the store receives them into its own stock, for sale.
    await eventually(
        lambda: fulfilment.GetFulfilment(
            pb.GetFulfilmentRequest(fulfilment_id=transfer.fulfilment_id)
        ),
        lambda found: found.fulfilment.cancel_on_arrival,
    )
    received = await fulfilment.ReceiveTransfer(
        pb.ReceiveTransferRequest(request_id=rid(), fulfilment_id=transfer.fulfilment_id)
    )
    assert received.fulfilment.status == res.FULFILMENT_STATUS_CANCELLED
    await eventually(lambda: sellable(world, sku, "utrecht"), lambda units: units == 2)
    await eventually(lambda: world.available(sku, "utrecht"), lambda units: units == 2)
    assert await world.held_lines(order.order_id) == {}
    assert await world.available(sku, "tilburg") == 3


async def test_a_transfer_waiting_at_the_pickup_store_lets_its_goods_go_when_the_order_is_cancelled(
    world: World, fulfilment: FulfilmentStub
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "tilburg": ("dc", TILBURG)})
    (sku,) = world.skus
    await world.stock(sku, "tilburg", 5)
    await world.known_to_routing()
    order = await world.route([(sku, 2)], pickup="utrecht")
    transfer = await task_at(fulfilment, world.id("tilburg"), order.order_id)
    await send_off(fulfilment, transfer, picked=2)
    await fulfilment.ReceiveTransfer(
        pb.ReceiveTransferRequest(request_id=rid(), fulfilment_id=transfer.fulfilment_id)
    )
    await eventually(
        lambda: world.held_lines(order.order_id),
        lambda held: held == {(sku, world.id("utrecht")): 2},
    )

    await world.routing.CancelOrder(
        routing_service_pb.CancelOrderRequest(
            request_id=rid(), order_id=order.order_id, reason_code="CUSTOMER_REQUEST"
        )
    )
    ended = await eventually(
        lambda: fulfilment.GetFulfilment(
            pb.GetFulfilmentRequest(fulfilment_id=transfer.fulfilment_id)
        ),
        lambda found: found.fulfilment.status == res.FULFILMENT_STATUS_CANCELLED,
    )
    assert ended.fulfilment.cancel_on_arrival
    await eventually(lambda: world.held_lines(order.order_id), lambda held: held == {})
    await eventually(lambda: world.available(sku, "utrecht"), lambda units: units == 2)
    assert await sellable(world, sku, "utrecht") == 2
