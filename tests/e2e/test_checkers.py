"""A stack with settings of its own, and the checkers catching what they look for.

The stack runs with a pickup window of two seconds: an order nobody collects
expires, its hold ends and the jacket is on sale again, and everything checks
out. Then, on that stack's own database, each checker is shown the fault it
exists for (an order hold no order stands for, a projection that drifted from
the ledger, a balance that no longer sums its postings) and must name it.
"""

from __future__ import annotations

from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import resources_pb2 as reservation_res
from omni.routing.v1 import resources_pb2 as routing_res
from tests.e2e.harness import (
    Place,
    ScenarioNetwork,
    StackStarter,
    assert_consistent,
    audit_problems,
    availability_problems,
    eventually,
    hold_problems,
    order_of,
    task_for,
)

UTRECHT = (52.0907, 5.1214)
PICKUP_WINDOW_SECONDS = 2.0


async def test_an_uncollected_pickup_expires_and_the_checkers_name_each_fault(
    start_process_stack: StackStarter,
) -> None:
    window_days = PICKUP_WINDOW_SECONDS / 86400
    async with start_process_stack({"OMNI_FULFILMENT_PICKUP_WINDOW_DAYS": window_days}) as stack:
        net = await ScenarioNetwork(stack).build([Place("utrecht", "store", UTRECHT)])
        (sku,) = net.skus
        await net.receive(sku, "utrecht", 2)
        routed = (await stack.routing.RouteOrder(net.order([(sku, 1)], pickup="utrecht"))).order
        task = await task_for(stack, net.id("utrecht"), routed.order_id)
        assert task.type == fulfilment_res.FULFILMENT_TYPE_PICKUP_AT_STORE
        for step, request in (
            ("AcceptFulfilment", fulfilment_pb.AcceptFulfilmentRequest),
            ("ConfirmPick", fulfilment_pb.ConfirmPickRequest),
            ("MarkReadyForPickup", fulfilment_pb.MarkReadyForPickupRequest),
        ):
            message = request(request_id=net.request_id(step), fulfilment_id=task.fulfilment_id)
            if isinstance(message, fulfilment_pb.ConfirmPickRequest):
                message.lines.add(sku=sku, picked_quantity=1)
            await getattr(stack.fulfilment, step)(message)
        assert await net.available(sku, "utrecht") == 1

        # Nobody comes: the pickup expires, the hold ends, the jacket is for sale again.
        expired = await eventually(
            lambda: stack.fulfilment.GetFulfilment(
                fulfilment_pb.GetFulfilmentRequest(fulfilment_id=task.fulfilment_id)
            ),
            lambda found: found.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_EXPIRED,
            what="the uncollected pickup expires",
        )
        assert expired.fulfilment.reason_code == "NOT_COLLECTED"
        order = await eventually(
            lambda: order_of(stack, routed.order_id),
            lambda o: o.status == routing_res.ORDER_STATUS_CANCELLED,
            what="the order ends with its expired pickup",
        )
        assert [a.status for a in order.allocations] == [routing_res.ALLOCATION_STATUS_EXPIRED]
        await eventually(
            lambda: net.available(sku, "utrecht"), lambda units: units == 2, what="back on sale"
        )
        await assert_consistent(stack)

        # An order hold that no order stands for.
        stray = await stack.reservations.Reserve(
            reservation_pb.ReserveRequest(
                request_id=net.request_id("stray"),
                channel=net.channel,
                reference=f"order-nobody-{net.tag}",
                kind=reservation_res.RESERVATION_KIND_ORDER,
                lines=[
                    reservation_pb.ReserveLine(sku=sku, location_id=net.id("utrecht"), quantity=1)
                ],
            )
        )
        problems = await hold_problems(stack)
        assert len(problems) == 1
        assert stray.reservation.reservation_id in problems[0]
        assert "which routing does not know" in problems[0]
        assert await hold_problems(stack, channels={"another-channel"}) == []
        await stack.reservations.ReleaseReservation(
            reservation_pb.ReleaseReservationRequest(
                request_id=net.request_id("release"),
                reservation_id=stray.reservation.reservation_id,
                reason_code="TEST_OVER",
            )
        )
        await assert_consistent(stack)

        # A projection that drifted from the ledger, then a ledger that does not balance.
        pool = await stack.pool()
        await pool.execute("UPDATE reservation.stock SET on_hand = on_hand + 1 WHERE sku = $1", sku)
        drifted = await availability_problems(stack)
        assert drifted and all(sku in problem for problem in drifted)
        assert any("ledger on-hand - held - safety gives" in problem for problem in drifted)
        assert await audit_problems(stack) == []
        await pool.execute("UPDATE ledger.balances SET on_hand = on_hand + 1 WHERE sku = $1", sku)
        findings = await audit_problems(stack)
        assert len(findings) == 1
        assert "balance says 3, postings sum to 2" in findings[0]
