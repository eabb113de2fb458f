"""Holds end: cart holds expire exactly once under racing sweepers; order holds are
consumed or released by fulfilment's events; shrinkage marks the newest holds short."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from google.protobuf.message import Message
from nats.js import JetStreamContext

from omni.common.v1 import event_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.reservation.v1 import events_pb2
from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import resources_pb2 as res
from omnistock.db import Pool
from omnistock.grpc.client import ChannelFactory
from omnistock.messaging.envelope import MSG_ID_HEADER, OutgoingEvent, unpack, wrap
from omnistock.service import RunningService
from omnistock.settings import Settings
from services.reservation.handlers import ReservationHandlers
from tests.integration.conftest import eventually, reservation_settings
from tests.integration.reservation.conftest import ORDER, Shop


async def events_about(pool: Pool, subject: str, reservation_ids: set[str]) -> list[str]:
    """Reservation ids of the outbox events on ``subject`` about ``reservation_ids``."""
    rows = await pool.fetch("SELECT envelope FROM reservation.outbox WHERE subject = $1", subject)
    found = []
    for row in rows:
        envelope = event_pb2.EventEnvelope.FromString(bytes(row["envelope"]))
        if envelope.ordering_key in reservation_ids:
            found.append(envelope.ordering_key)
    return found


async def test_racing_sweepers_expire_each_cart_hold_exactly_once(
    shop: Shop,
    pool: Pool,
    settings: Settings,
    ledger_service: RunningService,
    channels: ChannelFactory,
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 300)
    holds = await asyncio.gather(*(shop.reserve([(sku, store, 1)]) for _ in range(250)))
    ids = {hold.reservation_id for hold in holds}
    assert (await shop.figure(sku, store)).available == 50
    # Time passes for these holds only (the shortest real TTL is a minute).
    await pool.execute(
        "UPDATE reservation.reservations SET expires_at = now() - interval '1 second' "
        "WHERE reservation_id = ANY($1::uuid[])",
        [uuid.UUID(i) for i in ids],
    )
    # Besides the running service's sweeper, three more race for the same holds.
    extra = ReservationHandlers(
        pool,
        ledger_target=reservation_settings(settings, ledger_service).grpc_target("ledger"),
        channels=channels,
    )
    swept = await asyncio.gather(*(extra.expire_due(100) for _ in range(3)))

    await eventually(lambda: shop.figure(sku, store), lambda figure: figure.available == 300)
    expired = await events_about(pool, "omni.reservation.reservation.expired", ids)
    assert sorted(expired) == sorted(ids)  # one ReservationExpired per hold, none twice
    assert sum(swept) <= len(ids)
    statuses = await pool.fetch(
        "SELECT DISTINCT status FROM reservation.reservations WHERE reservation_id = ANY($1)",
        [uuid.UUID(i) for i in ids],
    )
    assert [row["status"] for row in statuses] == ["expired"]
    late = await asyncio.gather(
        shop.reservations.ExtendReservation(
            pb.ExtendReservationRequest(request_id=f"x-{holds[0].reservation_id}",
                                        reservation_id=holds[0].reservation_id)
        ),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(late[0], grpc.aio.AioRpcError)
    assert late[0].code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_damage_below_what_is_held_marks_the_newest_hold_short(
    shop: Shop, js: JetStreamContext
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    older = await shop.reserve([(sku, store, 2)], kind=ORDER)
    newer = await shop.reserve([(sku, store, 3)], kind=ORDER)
    short_seen = await js.pull_subscribe(
        "omni.reservation.reservation.short", stream="OMNI_RESERVATION"
    )

    await shop.damage(sku, store, 2)

    figure = await shop.wait_on_hand(sku, store, 3)
    assert (figure.reserved, figure.available) == (2, 1)
    got = await shop.reservations.GetReservation(
        pb.GetReservationRequest(reservation_id=newer.reservation_id)
    )
    assert got.reservation.status == res.RESERVATION_STATUS_SHORT
    kept = await shop.reservations.GetReservation(
        pb.GetReservationRequest(reservation_id=older.reservation_id)
    )
    assert kept.reservation.status == res.RESERVATION_STATUS_ACTIVE

    async def short_event_for_newer() -> bool:
        for message in await short_seen.fetch(100, timeout=2):
            await message.ack()
            envelope = event_pb2.EventEnvelope.FromString(message.data)
            event = unpack(envelope, events_pb2.ReservationShort)
            if event is not None and event.reservation.reservation_id == newer.reservation_id:
                return list(event.line_numbers) == [1]
        return False

    await eventually(short_event_for_newer, lambda seen: seen)
    await short_seen.unsubscribe()


async def publish_fulfilment(
    js: JetStreamContext, subject: str, payload: Message, *, times: int = 1
) -> None:
    """Publish a fulfilment event as the fulfilment service's relay would (``times`` over)."""
    envelope = wrap(OutgoingEvent(subject, payload), "fulfilment")
    for _ in range(times):
        await js.publish(
            subject, envelope.SerializeToString(), headers={MSG_ID_HEADER: envelope.event_id}
        )


async def test_each_fulfilment_records_the_units_it_consumed(
    shop: Shop, js: JetStreamContext, pool: Pool
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 10)
    order_id = f"order-{uuid.uuid4().hex[:8]}"
    hold = await shop.reserve([(sku, store, 10)], kind=ORDER, reference=order_id)

    first = fulfilment_events.FulfilmentShipped(
        fulfilment_id=f"a-{order_id}", order_id=order_id, location_id=store,
        lines=[fulfilment_events.FulfilmentLine(sku=sku, quantity=4)],
    )  # fmt: skip
    # The second lists the SKU on two lines, as a parcel split in two boxes may.
    second = fulfilment_events.FulfilmentShipped(
        fulfilment_id=f"b-{order_id}", order_id=order_id, location_id=store,
        lines=[fulfilment_events.FulfilmentLine(sku=sku, quantity=4),
               fulfilment_events.FulfilmentLine(sku=sku, quantity=2)],
    )  # fmt: skip
    await publish_fulfilment(js, "omni.fulfilment.fulfilment.shipped", first)
    await publish_fulfilment(js, "omni.fulfilment.fulfilment.shipped", second)

    async def status() -> int:
        got = await shop.reservations.GetReservation(
            pb.GetReservationRequest(reservation_id=hold.reservation_id)
        )
        return got.reservation.status

    assert await eventually(status, lambda s: s == res.RESERVATION_STATUS_CONSUMED)
    rows = await pool.fetch(
        "SELECT fulfilment_id, quantity FROM reservation.consumptions "
        "WHERE reservation_id = $1 ORDER BY fulfilment_id",
        uuid.UUID(hold.reservation_id),
    )
    assert [(r["fulfilment_id"], r["quantity"]) for r in rows] == [
        (f"a-{order_id}", 4),
        (f"b-{order_id}", 6),
    ]
    # The consumed units count as departing until the ledger's shipments (posted
    # from the same events) are projected; then nothing is reserved or on hand.
    final = await eventually(
        lambda: shop.figure(sku, store), lambda f: (f.on_hand, f.reserved) == (0, 0)
    )
    assert final.available == 0


async def test_fulfilment_events_consume_and_release_order_holds(
    shop: Shop, js: JetStreamContext, pool: Pool
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    other = await shop.add_sku()
    await shop.stock(sku, store, 5)
    await shop.stock(other, store, 5)
    order_id = f"order-{uuid.uuid4().hex[:8]}"
    hold = await shop.reserve([(sku, store, 3), (other, store, 2)], kind=ORDER,
                              reference=order_id)  # fmt: skip

    shipped = fulfilment_events.FulfilmentShipped(
        fulfilment_id=f"f-{order_id}", order_id=order_id, location_id=store,
        lines=[fulfilment_events.FulfilmentLine(sku=sku, quantity=3)],
    )  # fmt: skip
    # Published twice with one event id, as a relay that crashed before marking would.
    await publish_fulfilment(js, "omni.fulfilment.fulfilment.shipped", shipped, times=2)
    cancelled = fulfilment_events.FulfilmentCancelled(
        fulfilment_id=f"f2-{order_id}", order_id=order_id, location_id=store,
        lines=[fulfilment_events.FulfilmentLine(sku=other, quantity=2)],
        reason_code="ORDER_CANCELLED",
    )  # fmt: skip
    await publish_fulfilment(js, "omni.fulfilment.fulfilment.cancelled", cancelled)

    async def lines() -> dict[str, int]:
        got = await shop.reservations.GetReservation(
            pb.GetReservationRequest(reservation_id=hold.reservation_id)
        )
        return {line.sku: line.status for line in got.reservation.lines}

    final = await eventually(lines, lambda found: res.LINE_STATUS_ACTIVE not in found.values())
    assert final == {sku: res.LINE_STATUS_CONSUMED, other: res.LINE_STATUS_RELEASED}
    # The shipped units count as departing until the ledger's shipment is projected.
    await eventually(
        lambda: shop.figure(sku, store), lambda f: (f.on_hand, f.reserved, f.available) == (2, 0, 2)
    )
    assert (await shop.figure(other, store)).reserved == 0
    consumed = await pool.fetchval(
        "SELECT sum(quantity) FROM reservation.consumptions WHERE fulfilment_id = $1",
        f"f-{order_id}",
    )
    assert consumed == 3
