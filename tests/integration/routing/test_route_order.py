"""RouteOrder through gRPC with real ledger and reservation services."""

from __future__ import annotations

import grpc
import pytest

from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from tests.integration.helpers import failure
from tests.integration.routing.conftest import (
    AMSTERDAM,
    GRONINGEN,
    NIEUWEGEIN,
    TILBURG,
    UTRECHT,
    World,
    held_allocations,
)


async def test_a_routed_order_holds_exactly_the_planned_stock(world: World) -> None:
    await world.build(
        {
            "utrecht": ("store", UTRECHT),
            "amsterdam": ("store", AMSTERDAM),
            "tilburg": ("dc", TILBURG),
        },
        skus=2,
    )
    jacket, scarf = world.skus
    for place in ("utrecht", "amsterdam", "tilburg"):
        await world.stock(jacket, place, 5)
    await world.stock(scarf, "amsterdam", 3)
    await world.stock(scarf, "tilburg", 3)
    await world.known_to_routing()

    order = await world.route([(jacket, 2), (scarf, 1)], to=NIEUWEGEIN)

    assert order.status == pb.ORDER_STATUS_ROUTED
    planned: dict[tuple[str, str], int] = {}
    for shipment in order.plan.shipments:
        for line in shipment.lines:
            planned[(line.sku, shipment.source_location_id)] = line.quantity
    # One parcel beats two: Tilburg has both and is cheaper than Utrecht + Amsterdam.
    assert planned == {(jacket, world.id("tilburg")): 2, (scarf, world.id("tilburg")): 1}
    assert held_allocations(order) == planned
    assert await world.held_lines(order.order_id) == planned
    assert await world.available(jacket, "tilburg") == 3
    assert await world.available(scarf, "tilburg") == 2
    verdicts = {c.location_id: c for c in order.plan.candidates}
    assert verdicts[world.id("tilburg")].outcome == pb.CANDIDATE_OUTCOME_CHOSEN
    # Utrecht has no scarf: a plan through it needs a second parcel.
    assert verdicts[world.id("utrecht")].outcome == pb.CANDIDATE_OUTCOME_MORE_EXPENSIVE
    assert verdicts[world.id("utrecht")].extra_cost_cents > 0
    assert (
        order.plan.rules_version
        == (await world.routing.GetRoutingRules(service_pb.GetRoutingRulesRequest())).rules.version
    )
    assert (await world.get(order.order_id)) == order


async def test_nearest_store_ships_a_single_item(world: World) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "groningen": ("store", GRONINGEN)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 1)
    await world.stock(sku, "groningen", 1)
    await world.known_to_routing()

    order = await world.route([(sku, 1)], to=NIEUWEGEIN)

    (shipment,) = order.plan.shipments
    assert shipment.source_location_id == world.id("utrecht")
    assert shipment.type == pb.FULFILMENT_TYPE_SHIP_FROM_STORE
    verdicts = {c.location_id: c for c in order.plan.candidates}
    groningen = verdicts[world.id("groningen")]
    assert groningen.outcome == pb.CANDIDATE_OUTCOME_MORE_EXPENSIVE
    assert groningen.extra_cost_cents == groningen.cost_cents - shipment.cost_cents


async def test_a_retry_replays_and_a_reused_order_id_is_refused(world: World) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 3)
    await world.known_to_routing()
    request = world.order([(sku, 1)])

    first = await world.routing.RouteOrder(request)
    again = await world.routing.RouteOrder(request)

    assert again == first
    assert await world.held_lines(request.order_id) == {(sku, world.id("utrecht")): 1}
    other = world.order([(sku, 2)], order_id=request.order_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.routing.RouteOrder(other)
    assert failure(caught.value).code == grpc.StatusCode.ALREADY_EXISTS
    assert await world.held_lines(request.order_id) == {(sku, world.id("utrecht")): 1}
