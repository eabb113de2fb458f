"""The omnichannel journey (`omni demo journey`, `make demo`) against the process stack.

The demo network is loaded the way `omni dev run` loads it; the journey runs
once as a function and once more as the CLI command on the same stack (fresh
ids per run), and afterwards the ledger audit, the holds and every channel's
availability check out.
"""

from __future__ import annotations

from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import resources_pb2 as reservation_res
from omni.routing.v1 import resources_pb2 as routing_res
from services.demo.journey import (
    BROTHER_STORE,
    PICKUP_STORE,
    SKU,
    JourneyConfig,
    run_journey,
)
from services.demo.network import load_demo, read_demo
from tests.e2e.harness import ProcessStack, assert_consistent, order_of, run_cli


async def test_the_journey_goes_through_every_service_and_everything_adds_up(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    demo = read_demo()
    summary = await load_demo(stack.channel("ledger"), stack.channel("reservation"), demo)
    assert summary.locations == 14
    (web,) = [channel for channel in demo["channels"] if channel["id"] == "web"]

    lines: list[str] = []
    result = await run_journey(JourneyConfig.from_settings(stack.settings), lines.append)
    told = "\n".join(lines)

    assert result.low_stock_seen == web["low_stock_threshold"]
    assert "(low stock)" in told
    pickup = await order_of(stack, result.pickup_order_id)
    assert pickup.status == routing_res.ORDER_STATUS_FULFILLED
    assert [(a.type, a.location_id, a.pickup_location_id) for a in pickup.allocations] == [
        (routing_res.FULFILMENT_TYPE_TRANSFER_TO_STORE, result.transfer_source_id, PICKUP_STORE)
    ]
    assert result.transfer_source_id.startswith("dc-")
    assert result.cart_converted
    assert len(result.pickup_code) == 6 and result.pickup_code.isdigit()
    shipped = await order_of(stack, result.shipped_order_id)
    assert shipped.status == routing_res.ORDER_STATUS_FULFILLED
    assert result.ship_source_id == BROTHER_STORE
    assert [(r.return_id, r.location_id) for r in shipped.returns] == [
        (result.return_id, result.return_location_id)
    ]
    assert result.return_location_id not in (BROTHER_STORE, "")
    assert set(result.hold_statuses.values()) <= {"consumed", "released"}
    # The other shopper's cart was let go; the customer's cart became the order's
    # hold and was consumed when the jacket left the distribution centre.
    assert result.hold_statuses[result.other_cart_reservation_id] == "released"
    assert result.hold_statuses[result.cart_reservation_id] == "consumed"
    # The transfer's goods were held at the pickup store until collected.
    holds = await stack.reservations.ListReservations(
        reservation_pb.ListReservationsRequest(channel="web", reference=result.pickup_order_id)
    )
    assert sorted(
        (line.location_id, line.quantity, reservation_res.LineStatus.Name(line.status))
        for hold in holds.reservations
        for line in hold.lines
    ) == [
        (result.transfer_source_id, 1, "LINE_STATUS_CONSUMED"),
        (PICKUP_STORE, 1, "LINE_STATUS_CONSUMED"),
    ]
    await assert_consistent(stack)

    # Again, as `make demo` runs it, on the same stack: fresh ids, same story.
    exit_code, output = await run_cli(stack, "demo", "journey", "--timeout", "30")
    assert exit_code == 0, output
    assert "went through every service and everything adds up" in output
    assert SKU in output
    await assert_consistent(stack)
