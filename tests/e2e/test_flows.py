"""The flows across all four processes where something goes other than planned.

A store rejects its task and another store fulfils the order; an order is
cancelled while the store is picking it; a customer gives the wrong pickup code,
then the right one. After each, the ledger audit passes, no hold is left that
routing does not stand for, and every figure is on-hand - held - safety stock.
"""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import nats
import pytest
from nats.js.errors import NotFoundError
from prometheus_client.parser import text_string_to_metric_families

from omni.common.v1 import event_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.routing.v1 import resources_pb2 as routing_res
from omni.routing.v1 import routing_service_pb2 as routing_pb
from omnistock.messaging.envelope import unpack
from tests.e2e.harness import (
    Place,
    ProcessStack,
    ScenarioNetwork,
    assert_consistent,
    eventually,
    order_of,
    ship_task,
    task_for,
)
from tests.e2e.test_processes import AMSTERDAM, NIEUWEGEIN, UTRECHT

READY_SUBJECT = "omni.fulfilment.fulfilment.ready_for_pickup"


async def two_stores(stack: ProcessStack) -> tuple[ScenarioNetwork, str]:
    net = await ScenarioNetwork(stack).build(
        [Place("utrecht", "store", UTRECHT), Place("amsterdam", "store", AMSTERDAM)]
    )
    (sku,) = net.skus
    await net.receive(sku, "utrecht", 2)
    await net.receive(sku, "amsterdam", 2)
    return net, sku


async def test_a_store_that_rejects_sends_the_order_to_another_store_that_ships_it(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    net, sku = await two_stores(stack)
    routed = (await stack.routing.RouteOrder(net.order([(sku, 2)], to=NIEUWEGEIN))).order
    first = await task_for(stack, net.id("utrecht"), routed.order_id)
    await stack.fulfilment.RejectFulfilment(
        fulfilment_pb.RejectFulfilmentRequest(
            request_id=net.request_id("reject"),
            fulfilment_id=first.fulfilment_id,
            reason_code="NO_STAFF",
        )
    )

    second = await task_for(stack, net.id("amsterdam"), routed.order_id)
    await ship_task(stack, second)
    order = await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the order is fulfilled from Amsterdam",
    )
    assert list(order.failed_location_ids) == [net.id("utrecht")]
    await assert_consistent(stack, skus=[sku], channels=[net.channel])
    assert await net.available(sku, "utrecht") == 2  # the rejected hold was let go
    assert await net.available(sku, "amsterdam") == 0


async def test_an_order_cancelled_while_the_store_picks_it_lets_go_of_everything(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    net, sku = await two_stores(stack)
    routed = (await stack.routing.RouteOrder(net.order([(sku, 2)], to=NIEUWEGEIN))).order
    task = await task_for(stack, net.id("utrecht"), routed.order_id)
    await stack.fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(
            request_id=net.request_id("accept"), fulfilment_id=task.fulfilment_id
        )
    )
    assert await net.available(sku, "utrecht") == 0

    await stack.routing.CancelOrder(
        routing_pb.CancelOrderRequest(
            request_id=net.request_id("cancel"),
            order_id=routed.order_id,
            reason_code="CUSTOMER_REQUEST",
        )
    )
    stopped = await eventually(
        lambda: stack.fulfilment.GetFulfilment(
            fulfilment_pb.GetFulfilmentRequest(fulfilment_id=task.fulfilment_id)
        ),
        lambda found: found.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_CANCELLED,
        what="the store's task is cancelled",
    )
    assert stopped.fulfilment.reason_code == "CUSTOMER_REQUEST"
    # The picker's next scan is refused: the task names its state.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.fulfilment.ConfirmPick(
            fulfilment_pb.ConfirmPickRequest(
                request_id=net.request_id("pick"),
                fulfilment_id=task.fulfilment_id,
                lines=[fulfilment_pb.PickedLine(sku=sku, picked_quantity=2)],
            )
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in (refused.value.details() or "")
    order = await order_of(stack, routed.order_id)
    assert order.status == routing_res.ORDER_STATUS_CANCELLED
    await assert_consistent(stack, skus=[sku], channels=[net.channel])
    assert await net.available(sku, "utrecht") == 2


async def ready_event(
    stack: ProcessStack, fulfilment_id: str
) -> fulfilment_events.FulfilmentReadyForPickup:
    """What the customer's channel hears when the goods are ready (with the code)."""
    client = await nats.connect(stack.nats_url)
    try:
        js = client.jetstream()

        async def last() -> fulfilment_events.FulfilmentReadyForPickup | None:
            try:
                message = await js.get_last_msg("OMNI_FULFILMENT", READY_SUBJECT)
            except NotFoundError:
                return None
            assert message.data is not None
            envelope = event_pb2.EventEnvelope.FromString(message.data)
            return unpack(envelope, fulfilment_events.FulfilmentReadyForPickup)

        found = await eventually(
            last,
            lambda event: event is not None and event.fulfilment_id == fulfilment_id,
            what="the channel hears the pickup is ready",
        )
    finally:
        await client.close()
    assert found is not None
    return found


async def wrong_codes_counted(stack: ProcessStack) -> float:
    """omni_fulfilment_wrong_pickup_codes_total as the service's /metrics shows it."""
    port = stack.services["fulfilment"].metrics_port
    url = f"http://127.0.0.1:{port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for family in text_string_to_metric_families(text):
        if family.name == "omni_fulfilment_wrong_pickup_codes":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError("the fulfilment service does not export its wrong-code counter")


async def test_a_wrong_pickup_code_is_refused_and_the_right_one_hands_the_goods_over(
    process_stack: ProcessStack,
) -> None:
    stack = process_stack
    net, sku = await two_stores(stack)
    routed = (await stack.routing.RouteOrder(net.order([(sku, 1)], pickup="utrecht"))).order
    task = await task_for(stack, net.id("utrecht"), routed.order_id)
    assert task.type == fulfilment_res.FULFILMENT_TYPE_PICKUP_AT_STORE
    fulfilment = stack.fulfilment
    await fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(
            request_id=net.request_id("accept"), fulfilment_id=task.fulfilment_id
        )
    )
    await fulfilment.ConfirmPick(
        fulfilment_pb.ConfirmPickRequest(
            request_id=net.request_id("pick"),
            fulfilment_id=task.fulfilment_id,
            lines=[fulfilment_pb.PickedLine(sku=sku, picked_quantity=1)],
        )
    )
    ready = await fulfilment.MarkReadyForPickup(
        fulfilment_pb.MarkReadyForPickupRequest(
            request_id=net.request_id("ready"), fulfilment_id=task.fulfilment_id
        )
    )
    assert ready.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_READY_FOR_PICKUP
    code = (await ready_event(stack, task.fulfilment_id)).pickup_code
    wrong = f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"
    refused_before = await wrong_codes_counted(stack)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fulfilment.CollectFulfilment(
            fulfilment_pb.CollectFulfilmentRequest(
                request_id=net.request_id("collect"),
                fulfilment_id=task.fulfilment_id,
                pickup_code=wrong,
            )
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "pickup code" in (refused.value.details() or "")
    still = await fulfilment.GetFulfilment(
        fulfilment_pb.GetFulfilmentRequest(fulfilment_id=task.fulfilment_id)
    )
    assert still.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_READY_FOR_PICKUP
    assert (await order_of(stack, routed.order_id)).status == routing_res.ORDER_STATUS_ROUTED
    assert await wrong_codes_counted(stack) == refused_before + 1

    collected = await fulfilment.CollectFulfilment(
        fulfilment_pb.CollectFulfilmentRequest(
            request_id=net.request_id("collect"),
            fulfilment_id=task.fulfilment_id,
            pickup_code=code,
        )
    )
    assert collected.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_COLLECTED
    await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the order is fulfilled at the counter",
    )
    await assert_consistent(stack, skus=[sku], channels=[net.channel])
    assert await net.available(sku, "utrecht") == 1
