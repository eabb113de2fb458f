"""An order's life after routing: reroutes, cancels, returns, carts, click-and-collect."""

from __future__ import annotations

import uuid

import grpc
import pytest
from nats.js import JetStreamContext

from omni.common.v1 import types_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.reservation.v1 import resources_pb2 as res
from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from tests.conftest import Network
from tests.integration.conftest import eventually
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import reserve_request
from tests.integration.routing.conftest import (
    AMSTERDAM,
    DEN_HAAG,
    GRONINGEN,
    NIEUWEGEIN,
    ROTTERDAM,
    TILBURG,
    UTRECHT,
    World,
    held_allocations,
    publish,
)


def _line(sku: str, quantity: int) -> fulfilment_events.FulfilmentLine:
    return fulfilment_events.FulfilmentLine(sku=sku, quantity=quantity)


async def test_a_rejection_reroutes_the_remainder_elsewhere(
    world: World, js: JetStreamContext
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 2)
    await world.stock(sku, "amsterdam", 2)
    await world.known_to_routing()
    order = await world.route([(sku, 2)], to=NIEUWEGEIN)
    assert held_allocations(order) == {(sku, world.id("utrecht")): 2}

    await publish(
        js,
        "omni.fulfilment.fulfilment.rejected",
        fulfilment_events.FulfilmentRejected(
            fulfilment_id=f"f-{uuid.uuid4().hex[:8]}",
            order_id=order.order_id,
            location_id=world.id("utrecht"),
            lines=[_line(sku, 2)],
            reason_code="NO_STAFF",
        ),
    )

    rerouted = await eventually(
        lambda: world.get(order.order_id), lambda o: o.plan.plan_number == 2
    )
    assert rerouted.status == pb.ORDER_STATUS_ROUTED
    assert list(rerouted.failed_location_ids) == [world.id("utrecht")]
    assert held_allocations(rerouted) == {(sku, world.id("amsterdam")): 2}
    failed = [a for a in rerouted.allocations if a.status == pb.ALLOCATION_STATUS_FAILED]
    assert [(a.location_id, a.quantity) for a in failed] == [(world.id("utrecht"), 2)]
    verdicts = {c.location_id: c.outcome for c in rerouted.plan.candidates}
    assert verdicts[world.id("utrecht")] == pb.CANDIDATE_OUTCOME_FAILED_BEFORE
    # Utrecht's hold is let go, Amsterdam's placed: exactly the plan is held.
    assert await world.held_lines(order.order_id) == {(sku, world.id("amsterdam")): 2}
    assert await world.available(sku, "utrecht") == 2


async def test_a_short_pick_reroutes_only_the_shortfall(world: World, js: JetStreamContext) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "groningen": ("dc", GRONINGEN)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 3)
    await world.stock(sku, "groningen", 5)
    await world.known_to_routing()
    order = await world.route([(sku, 3)], to=UTRECHT)
    assert held_allocations(order) == {(sku, world.id("utrecht")): 3}

    await publish(
        js,
        "omni.fulfilment.fulfilment.short_picked",
        fulfilment_events.FulfilmentShortPicked(
            fulfilment_id="f-1", order_id=order.order_id, location_id=world.id("utrecht"),
            short_lines=[_line(sku, 1)], reason_code="NOT_FOUND",
        ),
    )  # fmt: skip

    rerouted = await eventually(
        lambda: world.get(order.order_id), lambda o: o.plan.plan_number == 2
    )
    assert held_allocations(rerouted) == {
        (sku, world.id("utrecht")): 2,
        (sku, world.id("groningen")): 1,
    }
    assert (await world.held_lines(order.order_id))[(sku, world.id("groningen"))] == 1


async def test_when_every_source_fails_the_order_needs_attention(
    world: World, js: JetStreamContext
) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 1)
    await world.known_to_routing()
    order = await world.route([(sku, 1)])

    await publish(
        js,
        "omni.fulfilment.fulfilment.expired",
        fulfilment_events.FulfilmentExpired(
            fulfilment_id="f-1", order_id=order.order_id, location_id=world.id("utrecht"),
            lines=[_line(sku, 1)], cause=fulfilment_events.EXPIRY_CAUSE_TASK_NOT_ACCEPTED,
        ),
    )  # fmt: skip

    stuck = await eventually(
        lambda: world.get(order.order_id), lambda o: o.status == pb.ORDER_STATUS_NEEDS_ATTENTION
    )
    assert stuck.plan.unsourced[0].quantity == 1
    assert "line 1" in stuck.attention_reason
    assert await world.held_lines(order.order_id) == {}


async def test_a_cancel_releases_the_holds(world: World) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)}, skus=2)
    shirt, jeans = world.skus
    await world.stock(shirt, "utrecht", 2)
    await world.stock(jeans, "amsterdam", 2)
    await world.known_to_routing()
    order = await world.route([(shirt, 1), (jeans, 1)])
    assert len(await world.held_lines(order.order_id)) == 2

    partly = await world.routing.CancelOrder(
        service_pb.CancelOrderRequest(
            request_id=f"cancel-{order.order_id}-1", order_id=order.order_id,
            line_numbers=[2], reason_code="CUSTOMER_REQUEST",
        )
    )  # fmt: skip
    assert partly.order.status == pb.ORDER_STATUS_ROUTED
    assert await world.held_lines(order.order_id) == {(shirt, world.id("utrecht")): 1}
    assert await world.available(jeans, "amsterdam") == 2

    request = service_pb.CancelOrderRequest(
        request_id=f"cancel-{order.order_id}-2",
        order_id=order.order_id,
        reason_code="CUSTOMER_REQUEST",
    )
    whole = await world.routing.CancelOrder(request)
    assert whole.order.status == pb.ORDER_STATUS_CANCELLED
    assert [line.cancelled_quantity for line in whole.order.lines] == [1, 1]
    assert await world.held_lines(order.order_id) == {}
    assert await world.available(shirt, "utrecht") == 2
    assert await world.routing.CancelOrder(request) == whole  # a retry replays
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.routing.CancelOrder(
            service_pb.CancelOrderRequest(
                request_id="cancel-again", order_id=order.order_id, reason_code="CUSTOMER_REQUEST"
            )
        )
    assert failure(caught.value).code == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_return_to_store_restocks_that_store_in_the_ledger(
    world: World, js: JetStreamContext
) -> None:
    await world.build(
        {
            "utrecht": ("store", UTRECHT),
            "rotterdam": ("store", ROTTERDAM),
            "tilburg": ("dc", TILBURG),
        },
        skus=2,
    )
    carried, foreign = world.skus
    await world.stock(carried, "utrecht", 3)
    await world.stock(foreign, "utrecht", 3)
    await world.stock(carried, "rotterdam", 1)  # Rotterdam carries only the first SKU
    await world.known_to_routing()
    order = await world.route([(carried, 2), (foreign, 1)], to=UTRECHT)
    await publish(
        js,
        "omni.fulfilment.fulfilment.shipped",
        fulfilment_events.FulfilmentShipped(
            fulfilment_id="f-1", order_id=order.order_id, location_id=world.id("utrecht"),
            lines=[_line(carried, 2), _line(foreign, 1)], carrier="postnl", tracking_number="3S1",
        ),
    )  # fmt: skip
    await eventually(
        lambda: world.get(order.order_id), lambda o: o.status == pb.ORDER_STATUS_FULFILLED
    )

    answer = await world.routing.RouteReturn(
        service_pb.RouteReturnRequest(
            request_id=f"ret-{order.order_id}",
            return_id=f"ret-{order.order_id}",
            order_id=order.order_id,
            location_id=world.id("rotterdam"),
            lines=[
                service_pb.ReturnLineInput(
                    sku=carried, quantity=1, condition=pb.ITEM_CONDITION_SELLABLE
                ),
                service_pb.ReturnLineInput(
                    sku=carried, quantity=1, condition=pb.ITEM_CONDITION_DAMAGED
                ),
                service_pb.ReturnLineInput(
                    sku=foreign, quantity=1, condition=pb.ITEM_CONDITION_SELLABLE
                ),
            ],
        )
    )

    lines = answer.order_return.lines
    assert [line.disposition for line in lines] == [
        pb.RETURN_DISPOSITION_RESTOCK,
        pb.RETURN_DISPOSITION_WRITE_OFF,
        pb.RETURN_DISPOSITION_SEND_TO_DISTRIBUTION_CENTRE,
    ]
    # Sent to the nearest distribution centre taking returns (other tests' count too).
    centre = lines[2].destination_location_id
    assert lines[2].transfer_id

    async def rotterdam_levels() -> dict[tuple[str, int], int]:
        found = await world.ledger.GetStockLevels(
            ledger_pb.GetStockLevelsRequest(
                skus=[carried, foreign], location_ids=[world.id("rotterdam")]
            )
        )
        return {(level.stock.sku, level.stock.state): level.on_hand for level in found.levels}

    levels = await eventually(
        rotterdam_levels, lambda found: found.get((carried, types_pb2.STOCK_STATE_SELLABLE)) == 2
    )
    assert levels.get((foreign, types_pb2.STOCK_STATE_SELLABLE), 0) == 0  # sent on, not kept
    assert levels.get((carried, types_pb2.STOCK_STATE_DAMAGED), 0) == 0  # written off

    async def in_transit() -> int:
        found = await world.ledger.GetStockLevels(
            ledger_pb.GetStockLevelsRequest(
                skus=[foreign], location_ids=[centre], states=[types_pb2.STOCK_STATE_IN_TRANSIT]
            )
        )
        return sum(level.on_hand for level in found.levels)

    await eventually(in_transit, lambda units: units == 1)
    kept = await world.get(order.order_id)
    assert [line.returned_quantity for line in kept.lines] == [2, 1]
    assert kept.returns[0].return_id == answer.order_return.return_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        one_more = service_pb.ReturnLineInput(
            sku=carried, quantity=1, condition=pb.ITEM_CONDITION_SELLABLE
        )
        await world.routing.RouteReturn(
            service_pb.RouteReturnRequest(
                request_id="ret-too-many",
                return_id="ret-too-many",
                order_id=order.order_id,
                location_id=world.id("rotterdam"),
                lines=[one_more],
            )
        )
    assert failure(caught.value).code == grpc.StatusCode.FAILED_PRECONDITION


async def test_cart_holds_are_converted_not_held_twice(world: World) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 2)
    await world.stock(sku, "amsterdam", 5)
    await world.known_to_routing()
    cart = (
        await world.reservations.Reserve(
            reserve_request(
                world.channel, [(sku, world.id("utrecht"), 2)], reference=f"cart-{world.tag}"
            )
        )
    ).reservation
    assert await world.available(sku, "utrecht") == 0

    order = await world.route([(sku, 2)], to=NIEUWEGEIN, cart=cart.reservation_id)

    assert held_allocations(order) == {(sku, world.id("utrecht")): 2}
    (hold,) = await world.holds(order.order_id)
    assert hold.reservation_id == cart.reservation_id
    assert hold.kind == res.RESERVATION_KIND_ORDER
    assert await world.available(sku, "utrecht") == 0
    assert await world.available(sku, "amsterdam") == 5


async def test_click_and_collect_without_stock_plans_a_transfer(world: World) -> None:
    await world.build(
        {
            "utrecht": ("store", UTRECHT),
            "nieuwegein": ("store", NIEUWEGEIN),
            "tilburg": ("dc", TILBURG),
        },
    )
    (sku,) = world.skus
    await world.stock(sku, "tilburg", 10)
    await world.stock(sku, "nieuwegein", 1)
    await world.known_to_routing()

    order = await world.route([(sku, 1)], pickup="utrecht")

    (transfer,) = order.plan.shipments
    assert transfer.type == pb.FULFILMENT_TYPE_TRANSFER_TO_STORE
    assert transfer.source_location_id == world.id("tilburg")
    assert transfer.pickup_location_id == world.id("utrecht")
    assert order.plan.estimated_at.ToDatetime() > order.plan.planned_at.ToDatetime()
    assert [s.location_id for s in order.plan.nearby_stores] == [world.id("nieuwegein")]
    assert await world.held_lines(order.order_id) == {(sku, world.id("tilburg")): 1}


async def test_store_capacity_full_sends_the_next_order_elsewhere(world: World) -> None:
    await world.build(
        {"utrecht": ("store", UTRECHT), "den-haag": ("store", DEN_HAAG)}, capacity={"utrecht": 1}
    )
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 5)
    await world.stock(sku, "den-haag", 5)
    await world.known_to_routing()

    first = await world.route([(sku, 1)])
    second = await world.route([(sku, 1)])

    assert first.plan.shipments[0].source_location_id == world.id("utrecht")
    assert second.plan.shipments[0].source_location_id == world.id("den-haag")
    verdicts = {c.location_id: c.outcome for c in second.plan.candidates}
    assert verdicts[world.id("utrecht")] == pb.CANDIDATE_OUTCOME_OVER_CAPACITY


async def test_nothing_in_stock_keeps_the_order_as_needing_attention(world: World) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.known_to_routing()

    order = await world.route([(sku, 1)])

    assert order.status == pb.ORDER_STATUS_NEEDS_ATTENTION
    assert order.plan.unsourced[0].quantity == 1
    assert await world.held_lines(order.order_id) == {}


async def test_quote_holds_nothing(world: World, network: Network) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 1)
    await world.known_to_routing()

    quote = await world.routing.QuoteOrder(
        service_pb.QuoteOrderRequest(
            channel=world.channel,
            delivery_method=pb.DELIVERY_METHOD_CLICK_AND_COLLECT,
            customer=pb.Customer(pickup_location_id=world.id("utrecht")),
            lines=[service_pb.OrderLineInput(sku=sku, quantity=1)],
        )
    )

    assert quote.plan.shipments[0].type == pb.FULFILMENT_TYPE_PICKUP_AT_STORE
    assert "Collect at" in quote.plan.summary
    assert await world.available(sku, "utrecht") == 1
