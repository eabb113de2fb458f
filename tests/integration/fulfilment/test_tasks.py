"""Routed orders become work at their locations; each step goes through the whole loop."""

from __future__ import annotations

import uuid

import grpc
import pytest

from omni.common.v1 import types_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as pb
from omni.fulfilment.v1 import resources_pb2 as res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.routing.v1 import resources_pb2 as routing_pb
from omni.routing.v1 import routing_service_pb2 as routing_service_pb
from omnistock.db import Pool
from services.fulfilment import storage
from services.fulfilment.domain import Kind, Status
from tests.integration.conftest import eventually
from tests.integration.fulfilment.conftest import FulfilmentStub
from tests.integration.helpers import failure
from tests.integration.routing.conftest import AMSTERDAM, NIEUWEGEIN, UTRECHT, World


async def queue(fulfilment: FulfilmentStub, location_id: str) -> list[res.Fulfilment]:
    found = await fulfilment.ListFulfilments(pb.ListFulfilmentsRequest(location_id=location_id))
    return list(found.fulfilments)


def rid() -> str:
    return f"step-{uuid.uuid4().hex[:12]}"


async def test_a_routed_order_appears_in_the_store_queue_and_a_rejection_moves_it(
    world: World, fulfilment: FulfilmentStub
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 2)
    await world.stock(sku, "amsterdam", 2)
    await world.known_to_routing()
    order = await world.route([(sku, 2)], to=NIEUWEGEIN)

    (task,) = await eventually(
        lambda: queue(fulfilment, world.id("utrecht")), lambda q: len(q) == 1
    )
    assert (task.order_id, task.type, task.status) == (
        order.order_id,
        res.FULFILMENT_TYPE_SHIP_FROM_STORE,
        res.FULFILMENT_STATUS_CREATED,
    )
    assert [(i.sku, i.quantity) for i in task.items] == [(sku, 2)]

    accepted = await fulfilment.AcceptFulfilment(
        pb.AcceptFulfilmentRequest(request_id=rid(), fulfilment_id=task.fulfilment_id)
    )
    assert accepted.fulfilment.status == res.FULFILMENT_STATUS_ACCEPTED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fulfilment.ShipFulfilment(
            pb.ShipFulfilmentRequest(
                request_id=rid(), fulfilment_id=task.fulfilment_id, carrier="postnl",
                tracking_number="3S1",
            )
        )  # fmt: skip
    seen = failure(caught.value)
    assert seen.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "accepted" in seen.message

    await fulfilment.RejectFulfilment(
        pb.RejectFulfilmentRequest(
            request_id=rid(), fulfilment_id=task.fulfilment_id, reason_code="NO_STAFF"
        )
    )

    (moved,) = await eventually(
        lambda: queue(fulfilment, world.id("amsterdam")), lambda q: len(q) == 1
    )
    assert moved.order_id == order.order_id
    rerouted = await world.get(order.order_id)
    assert list(rerouted.failed_location_ids) == [world.id("utrecht")]
    assert await world.held_lines(order.order_id) == {(sku, world.id("amsterdam")): 2}


async def test_ship_from_store_end_to_end_and_a_pickup_needs_its_code(
    world: World, fulfilment: FulfilmentStub
) -> None:
    await world.build({"utrecht": ("store", UTRECHT)}, skus=2)
    shipped_sku, collected_sku = world.skus
    await world.stock(shipped_sku, "utrecht", 3)
    await world.stock(collected_sku, "utrecht", 1)
    await world.known_to_routing()
    home = await world.route([(shipped_sku, 1)], to=NIEUWEGEIN)
    pickup = await world.route([(collected_sku, 1)], pickup="utrecht")

    tasks = await eventually(lambda: queue(fulfilment, world.id("utrecht")), lambda q: len(q) == 2)
    by_order = {t.order_id: t for t in tasks}
    ship_task, pickup_task = by_order[home.order_id], by_order[pickup.order_id]
    assert pickup_task.type == res.FULFILMENT_TYPE_PICKUP_AT_STORE

    for call in ("AcceptFulfilment", "ConfirmPick", "PackFulfilment", "ShipFulfilment"):
        request = {
            "AcceptFulfilment": pb.AcceptFulfilmentRequest,
            "ConfirmPick": pb.ConfirmPickRequest,
            "PackFulfilment": pb.PackFulfilmentRequest,
            "ShipFulfilment": pb.ShipFulfilmentRequest,
        }[call](request_id=rid(), fulfilment_id=ship_task.fulfilment_id)
        if call == "ConfirmPick":
            request.lines.add(sku=shipped_sku, picked_quantity=1)
        if call == "ShipFulfilment":
            request.carrier, request.tracking_number = "postnl", "3SXYZ"
        await getattr(fulfilment, call)(request)
    await eventually(
        lambda: world.get(home.order_id), lambda o: o.status == routing_pb.ORDER_STATUS_FULFILLED
    )

    async def sellable_at_utrecht() -> int:
        found = await world.ledger.GetStockLevels(
            ledger_pb.GetStockLevelsRequest(
                skus=[shipped_sku],
                location_ids=[world.id("utrecht")],
                states=[types_pb2.STOCK_STATE_SELLABLE],
            )
        )
        return sum(level.on_hand for level in found.levels)

    # The ledger posts the shipment: 3 received, 1 shipped.
    await eventually(sellable_at_utrecht, lambda units: units == 2)
    # And the reservation service consumed the hold instead of releasing it.
    assert await world.held_lines(home.order_id) == {}
    assert await world.available(shipped_sku, "utrecht") == 2

    await fulfilment.AcceptFulfilment(
        pb.AcceptFulfilmentRequest(request_id=rid(), fulfilment_id=pickup_task.fulfilment_id)
    )
    pick = pb.ConfirmPickRequest(request_id=rid(), fulfilment_id=pickup_task.fulfilment_id)
    pick.lines.add(sku=collected_sku, picked_quantity=1)
    await fulfilment.ConfirmPick(pick)
    ready = await fulfilment.MarkReadyForPickup(
        pb.MarkReadyForPickupRequest(request_id=rid(), fulfilment_id=pickup_task.fulfilment_id)
    )
    assert ready.fulfilment.status == res.FULFILMENT_STATUS_READY_FOR_PICKUP
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await fulfilment.CollectFulfilment(
            pb.CollectFulfilmentRequest(
                request_id=rid(), fulfilment_id=pickup_task.fulfilment_id, pickup_code="000000x"
            )
        )
    assert failure(wrong.value).code == grpc.StatusCode.PERMISSION_DENIED
    still = await fulfilment.GetFulfilment(
        pb.GetFulfilmentRequest(fulfilment_id=pickup_task.fulfilment_id)
    )
    assert still.fulfilment.status == res.FULFILMENT_STATUS_READY_FOR_PICKUP


async def test_a_cancelled_line_leaves_the_task_and_a_shipped_task_leaves_the_queue(
    world: World, fulfilment: FulfilmentStub
) -> None:
    await world.build({"utrecht": ("store", UTRECHT)}, skus=2)
    kept_sku, dropped_sku = world.skus
    await world.stock(kept_sku, "utrecht", 2)
    await world.stock(dropped_sku, "utrecht", 2)
    await world.known_to_routing()
    order = await world.route([(kept_sku, 1), (dropped_sku, 1)], to=NIEUWEGEIN)
    (task,) = await eventually(
        lambda: queue(fulfilment, world.id("utrecht")), lambda q: len(q) == 1
    )
    assert {i.sku for i in task.items} == {kept_sku, dropped_sku}

    await world.routing.CancelOrder(
        routing_service_pb.CancelOrderRequest(
            request_id=rid(), order_id=order.order_id, line_numbers=[2], reason_code="CHANGED_MIND"
        )
    )
    changed = await eventually(
        lambda: fulfilment.GetFulfilment(pb.GetFulfilmentRequest(fulfilment_id=task.fulfilment_id)),
        lambda found: len(found.fulfilment.items) == 1,
    )
    assert changed.fulfilment.status == res.FULFILMENT_STATUS_CREATED
    assert [i.sku for i in changed.fulfilment.items] == [kept_sku]
    assert await world.held_lines(order.order_id) == {(kept_sku, world.id("utrecht")): 1}

    fid = task.fulfilment_id
    await fulfilment.AcceptFulfilment(
        pb.AcceptFulfilmentRequest(request_id=rid(), fulfilment_id=fid)
    )
    pick = pb.ConfirmPickRequest(request_id=rid(), fulfilment_id=fid)
    pick.lines.add(sku=kept_sku, picked_quantity=1)
    await fulfilment.ConfirmPick(pick)
    await fulfilment.PackFulfilment(pb.PackFulfilmentRequest(request_id=rid(), fulfilment_id=fid))
    await fulfilment.ShipFulfilment(
        pb.ShipFulfilmentRequest(
            request_id=rid(), fulfilment_id=fid, carrier="postnl", tracking_number="3S2"
        )
    )
    # Done work leaves the store's queue; asking for shipped tasks still finds it.
    assert await queue(fulfilment, world.id("utrecht")) == []
    shipped = await fulfilment.ListFulfilments(
        pb.ListFulfilmentsRequest(
            location_id=world.id("utrecht"), statuses=[res.FULFILMENT_STATUS_SHIPPED]
        )
    )
    assert [f.fulfilment_id for f in shipped.fulfilments] == [fid]
    await eventually(
        lambda: world.get(order.order_id), lambda o: o.status == routing_pb.ORDER_STATUS_FULFILLED
    )


async def test_the_open_task_gauges_count_waiting_work_by_kind_and_status(
    world: World, fulfilment: FulfilmentStub, pool: Pool
) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 2)
    await world.known_to_routing()
    await world.route([(sku, 1)], to=NIEUWEGEIN)
    await eventually(lambda: queue(fulfilment, world.id("utrecht")), lambda q: len(q) == 1)
    async with pool.acquire() as conn:
        counts, oldest = await storage.open_task_figures(conn)
    assert counts[(Kind.SHIP_FROM_STORE, Status.CREATED)] >= 1
    assert oldest[Kind.SHIP_FROM_STORE] > 0
    assert all(status not in (Status.COLLECTED, Status.CANCELLED) for _, status in counts)
