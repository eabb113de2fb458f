"""The four services as separate processes: an order goes through all of them.

A ship-from-store order is routed, worked at the store (accept, pick, pack,
ship) through the fulfilment service, issued by the ledger from fulfilment's
event, and its hold consumed by the reservation service; afterwards the ledger
audit, the holds and every availability figure check out. The same loop then
survives SIGKILLs of services and of nats-server in the middle of it, and a
short pick lets go of just the missing unit and routes it to another store.
"""

from __future__ import annotations

from omni.common.v1 import types_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.routing.v1 import resources_pb2 as routing_res
from tests.e2e.harness import (
    Place,
    ProcessStack,
    ScenarioNetwork,
    assert_consistent,
    eventually,
    order_of,
    run_cli,
    ship_task,
    task_for,
)

UTRECHT = (52.0907, 5.1214)
NIEUWEGEIN = (52.0292, 5.0806)  # a suburb of Utrecht
AMSTERDAM = (52.3740, 4.8897)
GRONINGEN = (53.2194, 6.5665)


async def sellable(stack: ProcessStack, sku: str, location_id: str) -> int:
    """The ledger's sellable on-hand of ``sku`` at a location."""
    found = await stack.ledger.GetStockLevels(
        ledger_pb.GetStockLevelsRequest(
            skus=[sku], location_ids=[location_id], states=[types_pb2.STOCK_STATE_SELLABLE]
        )
    )
    return sum(level.on_hand for level in found.levels)


async def test_a_ship_from_store_order_goes_through_every_process(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    net = await ScenarioNetwork(stack).build(
        [Place("utrecht", "store", UTRECHT), Place("north", "dc", GRONINGEN)]
    )
    (sku,) = net.skus
    await net.receive(sku, "utrecht", 3)
    await net.receive(sku, "north", 5)

    routed = (await stack.routing.RouteOrder(net.order([(sku, 2)], to=NIEUWEGEIN))).order
    assert routed.status == routing_res.ORDER_STATUS_ROUTED
    assert [
        (s.source_location_id, s.type, [(line.sku, line.quantity) for line in s.lines])
        for s in routed.plan.shipments
    ] == [(net.id("utrecht"), routing_res.FULFILMENT_TYPE_SHIP_FROM_STORE, [(sku, 2)])]

    task = await task_for(stack, net.id("utrecht"), routed.order_id)
    assert task.type == fulfilment_res.FULFILMENT_TYPE_SHIP_FROM_STORE
    assert [(item.sku, item.quantity) for item in task.items] == [(sku, 2)]
    await ship_task(stack, task)

    order = await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the order is fulfilled",
    )
    assert [(line.quantity, line.fulfilled_quantity) for line in order.lines] == [(2, 2)]
    # The ledger issued the shipment from fulfilment's event: 3 received, 2 shipped.
    await eventually(
        lambda: sellable(stack, sku, net.id("utrecht")),
        lambda units: units == 1,
        what="the ledger posts the shipment",
    )
    await assert_consistent(stack)
    exit_code, output = await run_cli(stack, "ledger", "audit")
    assert exit_code == 0, output
    assert "ledger balances" in output


async def test_the_loop_survives_sigkills_of_services_and_of_nats_server(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    net = await ScenarioNetwork(stack).build([Place("utrecht", "store", UTRECHT)])
    (sku,) = net.skus
    await net.receive(sku, "utrecht", 2)

    # Routing does not need fulfilment to route; the task waits in JetStream.
    await stack.kill("fulfilment")
    routed = (await stack.routing.RouteOrder(net.order([(sku, 1)], to=NIEUWEGEIN))).order
    assert routed.status == routing_res.ORDER_STATUS_ROUTED
    await stack.restart("fulfilment")
    task = await task_for(stack, net.id("utrecht"), routed.order_id)

    # Without NATS the steps still commit; their events wait in the outbox.
    await stack.kill_nats()
    try:
        for step, request in (
            ("AcceptFulfilment", fulfilment_pb.AcceptFulfilmentRequest),
            ("PackFulfilment", fulfilment_pb.PackFulfilmentRequest),
        ):
            if step == "PackFulfilment":
                pick = fulfilment_pb.ConfirmPickRequest(
                    request_id=net.request_id("pick"), fulfilment_id=task.fulfilment_id
                )
                pick.lines.add(sku=sku, picked_quantity=1)
                await stack.fulfilment.ConfirmPick(pick)
            await getattr(stack.fulfilment, step)(
                request(request_id=net.request_id(step), fulfilment_id=task.fulfilment_id)
            )
    finally:
        await stack.restart_nats()

    # The ledger is down when the goods leave; it posts the shipment once back.
    await stack.kill("ledger")
    shipped = await stack.fulfilment.ShipFulfilment(
        fulfilment_pb.ShipFulfilmentRequest(
            request_id=net.request_id("ship"),
            fulfilment_id=task.fulfilment_id,
            carrier="postnl",
            tracking_number="3SKILLED",
        )
    )
    assert shipped.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_SHIPPED
    await stack.restart("ledger")

    await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the order is fulfilled after the restarts",
    )
    await eventually(
        lambda: sellable(stack, sku, net.id("utrecht")),
        lambda units: units == 1,
        what="the ledger posts the shipment once",
    )
    await assert_consistent(stack)


async def test_a_short_pick_lets_go_of_the_missing_unit_and_routes_it_elsewhere(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    net = await ScenarioNetwork(stack).build(
        [Place("utrecht", "store", UTRECHT), Place("amsterdam", "store", AMSTERDAM)]
    )
    (sku,) = net.skus
    await net.receive(sku, "utrecht", 2)
    await net.receive(sku, "amsterdam", 2)
    routed = (await stack.routing.RouteOrder(net.order([(sku, 2)], to=NIEUWEGEIN))).order
    assert [s.source_location_id for s in routed.plan.shipments] == [net.id("utrecht")]

    first = await task_for(stack, net.id("utrecht"), routed.order_id)
    await stack.fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(
            request_id=net.request_id("accept"), fulfilment_id=first.fulfilment_id
        )
    )
    short = fulfilment_pb.ConfirmPickRequest(
        request_id=net.request_id("pick"),
        fulfilment_id=first.fulfilment_id,
        reason_code="NOT_FOUND",
    )
    short.lines.add(sku=sku, picked_quantity=1)
    await stack.fulfilment.ConfirmPick(short)

    # The missing unit is routed to Amsterdam; Utrecht holds only what it picked.
    second = await task_for(stack, net.id("amsterdam"), routed.order_id)
    assert [(item.sku, item.quantity) for item in second.items] == [(sku, 1)]
    await assert_consistent(stack)
    holds = await stack.reservations.ListReservations(
        reservation_pb.ListReservationsRequest(channel=net.channel, reference=routed.order_id)
    )
    assert sorted(
        (line.location_id, line.held_quantity, line.released_quantity)
        for hold in holds.reservations
        for line in hold.lines
    ) == sorted([(net.id("utrecht"), 1, 1), (net.id("amsterdam"), 1, 0)])

    await stack.fulfilment.PackFulfilment(
        fulfilment_pb.PackFulfilmentRequest(
            request_id=net.request_id("pack"), fulfilment_id=first.fulfilment_id
        )
    )
    await stack.fulfilment.ShipFulfilment(
        fulfilment_pb.ShipFulfilmentRequest(
            request_id=net.request_id("ship"),
            fulfilment_id=first.fulfilment_id,
            carrier="postnl",
            tracking_number="3SSHORT",
        )
    )
    await ship_task(stack, second)
    order = await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the order is fulfilled from two stores",
    )
    assert [(line.quantity, line.fulfilled_quantity) for line in order.lines] == [(2, 2)]
    assert list(order.failed_location_ids) == [net.id("utrecht")]
    await assert_consistent(stack)
