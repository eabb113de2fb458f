"""Fixtures of the routing tests: routing beside real ledger and reservation services.

Every test builds its own small retail network at real Dutch coordinates
through the ledger's and the reservation service's public APIs, stocks it with
receipts, and waits (as a real client would) until routing has heard of the
locations and reservation has projected the stock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from nats.js import JetStreamContext

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as res_pb
from omni.reservation.v1 import resources_pb2 as res
from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from omnistock.db import Pool
from omnistock.messaging.envelope import MSG_ID_HEADER, OutgoingEvent, wrap
from tests.conftest import LedgerStub, Network, ReservationStub
from tests.integration.conftest import RoutingStub, eventually

# Real places (latitude, longitude).
UTRECHT = (52.0907, 5.1214)
AMSTERDAM = (52.3740, 4.8897)
ROTTERDAM = (51.9225, 4.4792)
DEN_HAAG = (52.0767, 4.2986)
TILBURG = (51.5555, 5.0913)
GRONINGEN = (53.2194, 6.5665)
NIEUWEGEIN = (52.0292, 5.0806)  # a suburb of Utrecht


@dataclass(frozen=True)
class Place:
    """A location of a test's network."""

    location_id: str
    kind: str  # "store" or "dc"


class World:
    """One test's retail network, channel and stock, built through the public APIs."""

    def __init__(
        self, network: Network, reservations: ReservationStub, routing: RoutingStub, pool: Pool
    ) -> None:
        self.network = network
        self.pool = pool
        self.ledger: LedgerStub = network.ledger
        self.reservations = reservations
        self.routing = routing
        self.tag = network.tag
        self.channel = f"web-{self.tag}"
        self.places: list[str] = []
        self.skus: list[str] = []

    def id(self, name: str) -> str:
        """A location id unique to this test."""
        return f"{name}-{self.tag}"

    async def build(
        self,
        places: dict[str, tuple[str, tuple[float, float]]],
        *,
        skus: int = 1,
        capacity: dict[str, int] | None = None,
        no_ship: tuple[str, ...] = (),
        no_collect: tuple[str, ...] = (),
        sells_from: list[str] | None = None,
    ) -> World:
        """Create locations {name: (kind, (lat, lon))}, SKUs and the channel's rules."""
        capacity = capacity or {}
        locations = []
        for name, (kind, (lat, lon)) in places.items():
            store = kind == "store"
            locations.append(
                ledger_res.Location(
                    location_id=self.id(name),
                    kind=types_pb2.LOCATION_KIND_STORE
                    if store
                    else types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE,
                    name=f"{name.title()} ({kind})",
                    position=types_pb2.GeoPoint(latitude=lat, longitude=lon),
                    capabilities=ledger_res.LocationCapabilities(
                        ship_from_store=name not in no_ship,
                        click_and_collect=store and name not in no_collect,
                        accepts_returns=True,
                        daily_capacity=capacity.get(name, 0),
                    ),
                )
            )
        await self.ledger.UpsertLocations(
            ledger_pb.UpsertLocationsRequest(
                request_id=f"loc-{uuid.uuid4().hex[:12]}", locations=locations
            )
        )
        self.places = [loc.location_id for loc in locations]
        self.skus = await self.network.skus(skus)
        sellable = [self.id(n) for n in sells_from] if sells_from is not None else self.places
        rules = res.ChannelRules(
            channel=self.channel, location_ids=sellable, cart_ttl=Duration(seconds=1200)
        )
        await eventually(
            lambda: self.reservations.SetChannelRules(
                res_pb.SetChannelRulesRequest(
                    request_id=f"rules-{uuid.uuid4().hex[:12]}", rules=rules
                )
            ),
            lambda _: True,
        )
        # The reservation service learns new SKUs from the ledger's events: wait
        # for them, or an order routed at once meets "unknown SKU".
        await eventually(
            lambda: self.reservations.GetAvailability(
                res_pb.GetAvailabilityRequest(channel=self.channel, skus=self.skus)
            ),
            lambda found: len(found.availability) == len(self.skus),
        )
        return self

    async def stock(self, sku: str, name: str, quantity: int) -> None:
        """Receive ``quantity`` at a location and wait until reservation counts it."""
        location = self.id(name)
        # The reservation service learns new SKUs from the ledger's events.
        before = await eventually(lambda: self.available(sku, name), lambda _: True)
        await self.ledger.PostMovements(
            ledger_pb.PostMovementsRequest(
                movements=[
                    ledger_res.MovementInput(
                        key=self.network.next_key(),
                        sku=sku,
                        location_id=location,
                        receipt=ledger_res.Receipt(quantity=quantity),
                    )
                ]
            )
        )
        await eventually(
            lambda: self.available(sku, name), lambda units: units == before + quantity
        )

    async def available(self, sku: str, name: str) -> int:
        """The channel's available-to-promise of ``sku`` at a location."""
        found = await self.reservations.GetAvailability(
            res_pb.GetAvailabilityRequest(
                channel=self.channel, skus=[sku], location_ids=[self.id(name)]
            )
        )
        return found.availability[0].locations[0].available

    async def known_to_routing(self) -> None:
        """Wait until routing has heard of every location of the test.

        Routing learns locations from the ledger's events; a plan's reasons
        list only locations holding some of an order, so the wait looks at
        what routing keeps (test setup only; assertions go through the API).
        """

        async def known() -> int:
            count: int = await self.pool.fetchval(
                "SELECT count(*) FROM routing.locations WHERE location_id = ANY($1::text[])",
                self.places,
            )
            return count

        await eventually(known, lambda count: count == len(self.places))

    def order(
        self,
        lines: list[tuple[str, int]],
        *,
        to: tuple[float, float] | None = UTRECHT,
        pickup: str | None = None,
        split: bool = True,
        order_id: str | None = None,
        request_id: str | None = None,
        cart: str = "",
    ) -> service_pb.RouteOrderRequest:
        """A RouteOrder request for this test's channel."""
        request = service_pb.RouteOrderRequest(
            request_id=request_id or f"route-{uuid.uuid4().hex[:12]}",
            order_id=order_id or f"order-{uuid.uuid4().hex[:12]}",
            channel=self.channel,
            delivery_method=(
                pb.DELIVERY_METHOD_CLICK_AND_COLLECT if pickup else pb.DELIVERY_METHOD_SHIP_TO_HOME
            ),
            lines=[service_pb.OrderLineInput(sku=s, quantity=q) for s, q in lines],
            options=pb.RoutingOptions(allow_split=split),
            cart_reservation_id=cart,
        )
        if pickup:
            request.customer.pickup_location_id = self.id(pickup)
        elif to is not None:
            request.customer.CopyFrom(home(to))
        return request

    async def route(self, *args: object, **kwargs: object) -> pb.Order:
        """Route an order and return it."""
        response = await self.routing.RouteOrder(self.order(*args, **kwargs))  # type: ignore[arg-type]
        return response.order

    async def get(self, order_id: str) -> pb.Order:
        """GetOrder."""
        return (await self.routing.GetOrder(service_pb.GetOrderRequest(order_id=order_id))).order

    async def holds(self, order_id: str, *, active: bool = True) -> list[res.Reservation]:
        """The order's reservations (active ones by default)."""
        found = await self.reservations.ListReservations(
            res_pb.ListReservationsRequest(
                channel=self.channel,
                reference=order_id,
                statuses=[res.RESERVATION_STATUS_ACTIVE] if active else [],
            )
        )
        return list(found.reservations)

    async def held_lines(self, order_id: str) -> dict[tuple[str, str], int]:
        """Units the order holds now per (sku, location)."""
        out: dict[tuple[str, str], int] = {}
        for hold in await self.holds(order_id):
            for line in hold.lines:
                if line.status == res.LINE_STATUS_ACTIVE and line.held_quantity:
                    key = (line.sku, line.location_id)
                    out[key] = out.get(key, 0) + line.held_quantity
        return out


def home(point: tuple[float, float]) -> pb.Customer:
    """A home-delivery customer at ``point``."""
    return pb.Customer(
        position=types_pb2.GeoPoint(latitude=point[0], longitude=point[1]),
        postcode="3511 AB",
        country="NL",
    )


def held_allocations(order: pb.Order) -> dict[tuple[str, str], int]:
    """Units per (sku, location) of the order's HELD allocations."""
    out: dict[tuple[str, str], int] = {}
    for a in order.allocations:
        if a.status == pb.ALLOCATION_STATUS_HELD:
            out[(a.sku, a.location_id)] = out.get((a.sku, a.location_id), 0) + a.quantity
    return out


async def publish(
    js: JetStreamContext, subject: str, payload: Message, producer: str = "fulfilment"
) -> None:
    """Publish a fact as another service would (enveloped, with a message id)."""
    envelope = wrap(OutgoingEvent(subject, payload), producer)
    await js.publish(
        subject, envelope.SerializeToString(), headers={MSG_ID_HEADER: envelope.event_id}
    )


@pytest.fixture
async def world(
    network: Network, reservations: ReservationStub, routing: RoutingStub, pool: Pool
) -> World:
    """An empty world for one test (build it with ``World.build``)."""
    return World(network, reservations, routing, pool)
