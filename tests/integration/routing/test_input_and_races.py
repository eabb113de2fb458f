"""Bad input is refused whole with nothing held; a race with other buyers is re-planned."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc
import pytest

from omni.common.v1 import types_pb2
from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from omnistock.db import Pool
from omnistock.grpc.client import ChannelFactory
from omnistock.service import RunningService
from services.routing.clients import Availability, ReservationClient
from services.routing.handlers import RoutingHandlers
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import ORDER, reserve_request
from tests.integration.routing.conftest import AMSTERDAM, NIEUWEGEIN, TILBURG, UTRECHT, World


class OtherBuyerFirst(ReservationClient):
    """The real reservation client; after routing's first availability read another
    channel buyer takes the stock, through the real reservation service."""

    def __init__(
        self, target: str, channels: ChannelFactory, world: World, take: tuple[str, str, int]
    ) -> None:
        super().__init__(target, channels)
        self.world, self.take, self.reads = world, take, 0

    async def availability(self, channel: str, skus: Sequence[str]) -> Availability:
        found = await super().availability(channel, skus)
        self.reads += 1
        if self.reads == 1:
            sku, location, quantity = self.take
            await self.world.reservations.Reserve(
                reserve_request(self.world.channel, [(sku, location, quantity)], kind=ORDER,
                                reference=f"other-{uuid.uuid4().hex[:8]}")
            )  # fmt: skip
        return found


async def test_stock_taken_between_plan_and_hold_is_planned_again(
    world: World,
    pool: Pool,
    ledger_service: RunningService,
    reservation_service: RunningService,
    channels: ChannelFactory,
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 1)
    await world.stock(sku, "amsterdam", 1)
    await world.known_to_routing()
    handlers = RoutingHandlers(
        pool,
        reservation_target=f"127.0.0.1:{reservation_service.grpc_port}",
        ledger_target=f"127.0.0.1:{ledger_service.grpc_port}",
        channels=channels,
    )
    handlers.reservations = OtherBuyerFirst(
        f"127.0.0.1:{reservation_service.grpc_port}", channels, world, (sku, world.id("utrecht"), 1)
    )
    try:
        order = await handlers.route_order(world.order([(sku, 1)], to=NIEUWEGEIN))
    finally:
        await handlers.close()

    assert order.plan.replans == 1
    assert [s.source_location_id for s in order.plan.shipments] == [world.id("amsterdam")]
    assert await world.held_lines(order.order_id) == {(sku, world.id("amsterdam")): 1}


def _bad(world: World, sku: str) -> dict[str, tuple[service_pb.RouteOrderRequest, str]]:
    """Malformed orders and the field each must be refused on."""
    no_lines = world.order([(sku, 1)])
    del no_lines.lines[:]
    zero = world.order([(sku, 0)])
    unknown = world.order([(f"NOPE-{world.tag}", 1)])
    no_point = world.order([(sku, 1)], to=None)
    at_dc = world.order([(sku, 1)], pickup="tilburg")
    no_collect = world.order([(sku, 1)], pickup="amsterdam")
    missing_method = world.order([(sku, 1)])
    missing_method.delivery_method = pb.DELIVERY_METHOD_UNSPECIFIED
    nowhere = world.order([(sku, 1)], to=None)
    nowhere.customer.position.CopyFrom(types_pb2.GeoPoint(latitude=123.0, longitude=5.0))
    return {
        "no lines": (no_lines, "lines"),
        "quantity 0": (zero, "lines[0].quantity"),
        "unknown sku": (unknown, "lines[0].sku"),
        "no delivery point": (no_point, "customer.position"),
        "latitude out of range": (nowhere, "customer.position"),
        "collect at a distribution centre": (at_dc, "customer.pickup_location_id"),
        "collect where it is not offered": (no_collect, "customer.pickup_location_id"),
        "no delivery method": (missing_method, "delivery_method"),
    }


async def test_bad_orders_are_refused_whole_and_nothing_is_held(world: World) -> None:
    await world.build(
        {
            "utrecht": ("store", UTRECHT),
            "amsterdam": ("store", AMSTERDAM),
            "tilburg": ("dc", TILBURG),
        },
        no_collect=("amsterdam",),
    )
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 5)
    await world.known_to_routing()

    for name, (request, field) in _bad(world, sku).items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.routing.RouteOrder(request)
        seen = failure(caught.value)
        assert seen.code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert field in [path for path, _ in seen.violations], (name, seen.violations)
        assert await world.holds(request.order_id, active=False) == [], name
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await world.get(request.order_id)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND, name
    assert await world.available(sku, "utrecht") == 5


async def test_bad_rules_are_refused_and_good_ones_get_a_new_version(world: World) -> None:
    await world.build({"utrecht": ("store", UTRECHT)})
    await world.known_to_routing()
    current = (await world.routing.GetRoutingRules(service_pb.GetRoutingRulesRequest())).rules
    bad = pb.RoutingRules()
    bad.CopyFrom(current)
    bad.split_margin_percent = 150
    bad.time_zone = "Mars/Olympus"
    bad.excluded_location_ids.append(f"nowhere-{world.tag}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.routing.SetRoutingRules(
            service_pb.SetRoutingRulesRequest(request_id=f"rules-{world.tag}-bad", rules=bad)
        )
    seen = failure(caught.value)
    assert seen.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"rules.split_margin_percent", "rules.time_zone", "rules"} <= {
        p for p, _ in seen.violations
    }

    good = pb.RoutingRules()
    good.CopyFrom(current)
    good.split_margin_percent = current.split_margin_percent or 10
    changed = await world.routing.SetRoutingRules(
        service_pb.SetRoutingRulesRequest(request_id=f"rules-{world.tag}-good", rules=good)
    )
    assert changed.rules.version == current.version + 1
    assert (
        await world.routing.GetRoutingRules(service_pb.GetRoutingRulesRequest())
    ).rules == changed.rules
