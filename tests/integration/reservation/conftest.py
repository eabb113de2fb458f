"""Fixtures of the reservation tests: the service beside the ledger, and a shop per test.

The reservation service runs in-process on a free port next to the ledger it
projects from; every test builds its own SKUs, stores and channel through the
public gRPC APIs and waits, as a real client would, for the ledger's events to
reach the reservation service.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TypeAlias, TypeVar

import pytest
from google.protobuf.duration_pb2 import Duration

from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import reservation_service_pb2_grpc as pb_grpc
from omni.reservation.v1 import resources_pb2 as res
from omnistock.grpc.client import ChannelFactory
from omnistock.service import RunningService, start_service
from omnistock.settings import Settings
from services.reservation.app import SPEC as RESERVATION
from tests.conftest import LedgerStub, Network, ReservationStub
from tests.integration.conftest import eventually, reservation_settings

T = TypeVar("T")
Kind: TypeAlias = "res.ReservationKind.ValueType"
CART: Kind = res.RESERVATION_KIND_CART
ORDER: Kind = res.RESERVATION_KIND_ORDER


@pytest.fixture
async def second_replica(
    settings: Settings, ledger_service: RunningService, channels: ChannelFactory
) -> AsyncIterator[ReservationStub]:
    """A second reservation replica on the same database and NATS, for one test."""
    service = await start_service(
        RESERVATION,
        reservation_settings(settings, ledger_service),
        grpc_port=0,
        serve_metrics_endpoint=False,
    )
    channel = channels.open(f"127.0.0.1:{service.grpc_port}")
    try:
        stub: ReservationStub = pb_grpc.ReservationServiceStub(channel)
        yield stub
    finally:
        await channel.close()
        await service.stop()


class Shop:
    """One test's stores, SKUs and channel, built through the public APIs."""

    def __init__(self, network: Network, reservations: ReservationStub) -> None:
        self.network = network
        self.ledger: LedgerStub = network.ledger
        self.reservations = reservations
        self.channel = f"web-{network.tag}"
        self.stores: list[str] = []
        self.skus: list[str] = []

    async def open(
        self,
        *,
        stores: int = 1,
        skus: int = 1,
        safety_stock: int = 0,
        low_stock_threshold: int = 0,
        cart_ttl_seconds: int = 1200,
    ) -> Shop:
        """Create the master data and the channel's rules once the service knows them."""
        self.stores = await self.network.locations(stores)
        self.skus = await self.network.skus(skus)
        await self.set_rules(
            safety_stock=safety_stock,
            low_stock_threshold=low_stock_threshold,
            cart_ttl_seconds=cart_ttl_seconds,
        )
        # SKUs arrive by event too; wait until availability answers for all of them.
        await eventually(
            lambda: self.availability(self.skus), lambda found: len(found.availability) > 0
        )
        return self

    async def add_sku(self) -> str:
        """One more SKU, once the reservation service knows it."""
        sku = (await self.network.skus(1))[0]
        await eventually(
            lambda: self.availability([sku]), lambda found: len(found.availability) > 0
        )
        return sku

    async def set_rules(
        self,
        *,
        safety_stock: int = 0,
        low_stock_threshold: int = 0,
        cart_ttl_seconds: int = 1200,
        locations: list[str] | None = None,
    ) -> None:
        """Set this shop's channel rules (waits until its stores are known)."""
        rules = res.ChannelRules(
            channel=self.channel,
            location_ids=self.stores if locations is None else locations,
            cart_ttl=Duration(seconds=cart_ttl_seconds),
            safety_stock=safety_stock,
            low_stock_threshold=low_stock_threshold,
        )
        await eventually(
            lambda: self.reservations.SetChannelRules(
                pb.SetChannelRulesRequest(request_id=_id("rules"), rules=rules)
            ),
            lambda _: True,
        )

    async def receive(self, sku: str, store: str, quantity: int) -> None:
        """A scanner posts a receipt of sellable goods."""
        await self.post(
            ledger_res.MovementInput(
                key=self.network.next_key(),
                sku=sku,
                location_id=store,
                receipt=ledger_res.Receipt(quantity=quantity),
            )
        )

    async def damage(self, sku: str, store: str, quantity: int) -> None:
        """A scanner reports goods damaged (an adjustment out of sellable)."""
        await self.post(
            ledger_res.MovementInput(
                key=self.network.next_key(),
                sku=sku,
                location_id=store,
                adjustment=ledger_res.Adjustment(
                    quantity_delta=-quantity, reason_code="DAMAGED_IN_STORE"
                ),
            )
        )

    async def post(self, *movements: ledger_res.MovementInput) -> None:
        """Post movements to the ledger."""
        await self.ledger.PostMovements(ledger_pb.PostMovementsRequest(movements=movements))

    async def stock(self, sku: str, store: str, quantity: int) -> None:
        """Receive ``quantity`` and wait until the reservation service counts it on hand."""
        before = await self.figure(sku, store)
        await self.receive(sku, store, quantity)
        await self.wait_on_hand(sku, store, before.on_hand + quantity)

    async def wait_on_hand(self, sku: str, store: str, on_hand: int) -> res.Availability:
        """Wait until the projection shows ``on_hand`` at (sku, store)."""
        return await eventually(
            lambda: self.figure(sku, store), lambda figure: figure.on_hand == on_hand
        )

    async def availability(
        self, skus: list[str], locations: list[str] | None = None
    ) -> pb.GetAvailabilityResponse:
        """GetAvailability for this shop's channel."""
        return await self.reservations.GetAvailability(
            pb.GetAvailabilityRequest(channel=self.channel, skus=skus, location_ids=locations or [])
        )

    async def figure(self, sku: str, store: str) -> res.Availability:
        """The channel's figure for (sku, store)."""
        found = await self.availability([sku], [store])
        return found.availability[0].locations[0]

    async def reserve(
        self,
        lines: list[tuple[str, str, int]],
        *,
        kind: Kind = CART,
        reference: str | None = None,
        request_id: str | None = None,
        ttl_seconds: int | None = None,
    ) -> res.Reservation:
        """Reserve ``lines`` of (sku, store, quantity) for this shop's channel."""
        response = await self.reservations.Reserve(
            reserve_request(
                self.channel,
                lines,
                kind=kind,
                reference=reference or _id("cart"),
                request_id=request_id or _id("reserve"),
                ttl_seconds=ttl_seconds,
            )
        )
        return response.reservation


def reserve_request(
    channel: str,
    lines: list[tuple[str, str, int]],
    *,
    kind: Kind = CART,
    reference: str = "cart-1",
    request_id: str = "",
    ttl_seconds: int | None = None,
) -> pb.ReserveRequest:
    """A ReserveRequest from (sku, location, quantity) lines."""
    request = pb.ReserveRequest(
        request_id=request_id or _id("reserve"),
        channel=channel,
        reference=reference,
        kind=kind,
        lines=[pb.ReserveLine(sku=s, location_id=loc, quantity=q) for s, loc, q in lines],
    )
    if ttl_seconds is not None:
        request.ttl.seconds = ttl_seconds
    return request


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def shop(network: Network, reservations: ReservationStub) -> Shop:
    """A shop with one store, one SKU and its own channel (nothing in stock yet)."""
    return await Shop(network, reservations).open()
