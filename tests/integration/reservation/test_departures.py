"""A shipment's two events meet however they arrive, even after a projection resync;
a transfer's receipt waits for its shipment when another replica handles that.

The reservation service hears of a shipment twice: fulfilment's event consumes
the order hold, and the ledger's StockMoved lowers on-hand. Until both are in,
the units count as departing. After a crash the ledger's event can come back
late, once a resync has moved on-hand past its version; it must still end the
departure, or the units would stay out of sale for good. These tests call the
service's handlers on the real database, in the order a redelivery produces.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import resources_pb2 as res
from omnistock.db import Connection, Pool, unit_of_work
from omnistock.grpc.client import ChannelFactory
from omnistock.settings import Settings
from services.reservation.handlers import (
    Posting,
    ReservationHandlers,
    ShipmentNotSeenYet,
    StockMovedFacts,
)
from tests.conftest import Network, ReservationStub
from tests.integration.reservation.conftest import ORDER, Shop


async def test_a_departure_the_projection_went_past_still_ends_the_departing_units(
    shop: Shop, pool: Pool, settings: Settings, channels: ChannelFactory
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    order_id = f"order-{uuid.uuid4().hex[:8]}"
    await shop.reserve([(sku, store, 2)], kind=ORDER, reference=order_id)
    handlers = ReservationHandlers(
        pool, ledger_target=settings.grpc_target("ledger"), channels=channels
    )
    fulfilment_id = f"f-{uuid.uuid4().hex[:8]}"

    async def consume(conn: Connection) -> None:
        await handlers.consume_for_fulfilment(
            conn,
            fulfilment_id=fulfilment_id,
            order_id=order_id,
            location_id=store,
            lines=[(sku, 2)],
        )

    await unit_of_work(pool, consume)
    consumed = await shop.figure(sku, store)
    assert (consumed.on_hand, consumed.reserved, consumed.available) == (5, 2, 3)

    known: int = await pool.fetchval(
        "SELECT ledger_version FROM reservation.stock WHERE sku = $1 AND location_id = $2",
        sku,
        store,
    )
    # The shipment's StockMoved, redelivered after a resync went past its version.
    late = StockMovedFacts(
        kind="shipment",
        recorded_at=datetime.now(UTC),
        postings=(Posting(sku, store, 3, known, -2),),
        fulfilment_id=fulfilment_id,
    )

    async def apply(conn: Connection) -> None:
        await handlers.apply_stock_moved(conn, late)

    await unit_of_work(pool, apply)
    after = await shop.figure(sku, store)
    # On-hand is the projection's (the resync's), untouched; nothing is departing.
    assert (after.on_hand, after.reserved, after.available) == (5, 0, 5)
    left = await pool.fetchval(
        "SELECT count(*) FROM reservation.departures WHERE fulfilment_id = $1", fulfilment_id
    )
    assert left == 0


async def test_a_transfers_receipt_before_its_shipment_is_retried_then_holds_the_goods(
    network: Network,
    reservations: ReservationStub,
    pool: Pool,
    settings: Settings,
    channels: ChannelFactory,
) -> None:
    shop = await Shop(network, reservations).open(stores=2)
    sku, (source, pickup) = shop.skus[0], shop.stores
    await shop.stock(sku, source, 3)
    order_id = f"order-{uuid.uuid4().hex[:8]}"
    await shop.reserve([(sku, source, 2)], kind=ORDER, reference=order_id)
    handlers = ReservationHandlers(
        pool, ledger_target=settings.grpc_target("ledger"), channels=channels
    )
    transfer_id = f"t-{uuid.uuid4().hex[:8]}"

    async def receive(conn: Connection, at: datetime, fulfilment_id: str = transfer_id) -> None:
        await handlers.hold_arrived_transfer(
            conn,
            fulfilment_id=fulfilment_id,
            order_id=order_id,
            location_id=pickup,
            lines=[(sku, 2)],
            received_at=at,
        )

    # Another replica has not handled the shipment yet: this delivery fails, to be retried.
    with pytest.raises(ShipmentNotSeenYet):
        await unit_of_work(pool, lambda conn: receive(conn, datetime.now(UTC)))

    async def ship(conn: Connection) -> None:
        await handlers.consume_for_fulfilment(
            conn, fulfilment_id=transfer_id, order_id=order_id, location_id=source,
            lines=[(sku, 2)],
        )  # fmt: skip

    await unit_of_work(pool, ship)
    await unit_of_work(pool, lambda conn: receive(conn, datetime.now(UTC)))
    holds = await shop.reservations.ListReservations(
        pb.ListReservationsRequest(
            channel=shop.channel, reference=order_id, statuses=[res.RESERVATION_STATUS_ACTIVE]
        )
    )
    assert [(line.location_id, line.held_quantity) for h in holds.reservations
            for line in h.lines] == [(pickup, 2)]  # fmt: skip

    # A receipt whose shipment never used a hold gives up after the wait: nothing held.
    late = datetime.now(UTC) - timedelta(minutes=1)
    await unit_of_work(pool, lambda conn: receive(conn, late, f"t-{uuid.uuid4().hex[:8]}"))
    again = await shop.reservations.ListReservations(
        pb.ListReservationsRequest(
            channel=shop.channel, reference=order_id, statuses=[res.RESERVATION_STATUS_ACTIVE]
        )
    )
    assert len(again.reservations) == 1
