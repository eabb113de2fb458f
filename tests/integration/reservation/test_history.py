"""A history-based proof that holds never oversell, in the manner of Jepsen's bank test.

Concurrent clients, through gRPC against two replicas, reserve (cart and order,
multi-line), extend, release, convert and let cart holds expire, while scanners
post receipts and damages at the ledger. Every call and its outcome is recorded.
Afterwards a checker proves from that history and from the service's own event
log (the OMNI_RESERVATION stream, which commits with every change):

- at no moment were more units held than on hand at any (sku, location): every
  AvailabilityChanged figure, in stream order, has reserved <= on_hand, and
  reserved equals what the checker's own replay of the hold events says is held;
- versions of a SKU's figures only increase;
- every acknowledged hold exists as acknowledged, and every refused one left
  nothing behind (no reservation under its reference);
- the final availability equals ledger on-hand - held - safety stock.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
from nats.js import JetStreamContext

from omni.common.v1 import event_pb2, types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import events_pb2
from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import resources_pb2 as res
from omnistock.db import Pool
from tests.conftest import ReservationStub
from tests.integration.conftest import eventually
from tests.integration.helpers import failure, read_stream
from tests.integration.reservation.conftest import CART, ORDER, Shop, reserve_request

SAFETY = 1
Key = tuple[str, str]


@dataclass
class History:
    """What the clients did and what they were told."""

    acknowledged: dict[str, res.Reservation] = field(default_factory=dict)  # by reference
    refused: list[str] = field(default_factory=list)  # references of refused holds
    ended_calls: int = 0
    scanner_moves: int = 0


async def run_clients(
    shop: Shop, replicas: list[ReservationStub], keys: list[Key], pool: Pool, history: History
) -> None:
    rng = random.Random(20261123)

    async def client(number: int) -> None:
        stub = replicas[number % len(replicas)]
        mine: list[str] = []
        for step in range(25):
            reference = f"h-{shop.channel}-{number}-{step}"
            action = rng.random()
            if action < 0.55 or not mine:
                lines = [
                    (s, loc, rng.randint(1, 3)) for s, loc in rng.sample(keys, rng.randint(1, 3))
                ]
                kind = CART if rng.random() < 0.6 else ORDER
                try:
                    answer = await stub.Reserve(
                        reserve_request(shop.channel, lines, kind=kind, reference=reference)
                    )
                except grpc.aio.AioRpcError as error:
                    info = failure(error).info
                    assert info is not None and info.reason == "INSUFFICIENT_STOCK", error
                    history.refused.append(reference)
                    continue
                history.acknowledged[reference] = answer.reservation
                mine.append(answer.reservation.reservation_id)
                continue
            target = rng.choice(mine)
            choice = rng.random()
            try:
                if choice < 0.35:
                    await stub.ReleaseReservation(
                        pb.ReleaseReservationRequest(
                            request_id=f"rel-{reference}", reservation_id=target
                        )
                    )
                elif choice < 0.55:
                    await stub.ExtendReservation(
                        pb.ExtendReservationRequest(
                            request_id=f"ext-{reference}", reservation_id=target
                        )
                    )
                elif choice < 0.75:
                    await stub.ConvertReservation(
                        pb.ConvertReservationRequest(
                            request_id=f"cnv-{reference}", reservation_id=target
                        )
                    )
                else:
                    # The clock runs out for this hold (the shortest real TTL is a
                    # minute): the sweepers of both replicas race to expire it.
                    await pool.execute(
                        "UPDATE reservation.reservations SET expires_at = now() "
                        "WHERE reservation_id = $1 AND kind = 'cart' AND status = 'active'",
                        uuid.UUID(target),
                    )
            except grpc.aio.AioRpcError as error:
                # Acting on a hold that already ended (expired, released, short) is
                # refused cleanly; anything else is a failure of the test.
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                history.ended_calls += 1

    async def scanner(number: int) -> None:
        for step in range(20):
            sku, loc = rng.choice(keys)
            key = ledger_res.IdempotencyKey(
                device_id=f"hist-{shop.network.tag}-{number}", sequence=step + 1
            )
            if rng.random() < 0.6:
                movement = ledger_res.MovementInput(
                    key=key, sku=sku, location_id=loc,
                    receipt=ledger_res.Receipt(quantity=rng.randint(1, 4)),
                )  # fmt: skip
            else:
                movement = ledger_res.MovementInput(
                    key=key, sku=sku, location_id=loc,
                    adjustment=ledger_res.Adjustment(
                        quantity_delta=-rng.randint(1, 3), reason_code="DAMAGED_IN_STORE"
                    ),
                )  # fmt: skip
            try:
                await shop.ledger.PostMovements(
                    ledger_pb.PostMovementsRequest(movements=[movement])
                )
                history.scanner_moves += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error  # below zero
            await asyncio.sleep(rng.random() * 0.05)

    await asyncio.gather(*(client(n) for n in range(12)), *(scanner(n) for n in range(3)))


_SNAPSHOT_EVENTS = (
    events_pb2.ReservationCreated,
    events_pb2.ReservationExtended,
    events_pb2.ReservationReleased,
    events_pb2.ReservationExpired,
    events_pb2.ReservationConverted,
    events_pb2.ReservationConsumed,
    events_pb2.ReservationShort,
)


def check_history(envelopes: list[event_pb2.EventEnvelope], keys: set[Key]) -> dict[Key, int]:
    """Replay hold events per key and check every availability figure against the replay."""
    held_by_line: dict[tuple[str, int], int] = {}
    held: dict[Key, int] = defaultdict(int)
    versions: dict[str, int] = {}
    figures_checked = 0
    for envelope in envelopes:
        name = envelope.event_type.rsplit(".", 1)[-1]
        event_type = getattr(events_pb2, name)
        payload = event_type()
        envelope.payload.Unpack(payload)
        if isinstance(payload, _SNAPSHOT_EVENTS):
            reservation = payload.reservation
            for line in reservation.lines:
                key = (line.sku, line.location_id)
                if key not in keys:
                    continue
                line_id = (reservation.reservation_id, line.line_number)
                held[key] += line.held_quantity - held_by_line.get(line_id, 0)
                held_by_line[line_id] = line.held_quantity
        elif isinstance(payload, events_pb2.AvailabilityChanged):
            for figure in payload.figures:
                key = (figure.sku, figure.location_id)
                if key not in keys or figure.channel:
                    continue
                assert figure.version >= versions.get(figure.sku, 0), figure
                versions[figure.sku] = figure.version
                assert figure.reserved <= figure.on_hand, f"oversold at {key}: {figure}"
                assert figure.reserved == held[key], f"{key}: replay {held[key]}, said {figure}"
                figures_checked += 1
    assert figures_checked > 100, figures_checked
    return dict(held)


async def test_the_history_of_concurrent_holds_and_movements_never_oversells(
    shop: Shop,
    second_replica: ReservationStub,
    pool: Pool,
    js: JetStreamContext,
) -> None:
    stores = [shop.stores[0], *(await shop.network.locations(1))]
    shop.stores = stores
    await shop.set_rules()
    await eventually(
        lambda: shop.reservations.SetLocationSafetyStock(
            pb.SetLocationSafetyStockRequest(
                request_id=f"safety-{shop.channel}",
                safety_stock=res.LocationSafetyStock(location_id=stores[1], safety_stock=SAFETY),
            )
        ),
        lambda _: True,
    )
    skus = [shop.skus[0], await shop.add_sku()]
    keys = [(sku, loc) for sku in skus for loc in stores]
    for sku, loc in keys:
        await shop.stock(sku, loc, 12)
    start = (await js.stream_info("OMNI_RESERVATION")).state.last_seq + 1
    history = History()

    await asyncio.wait_for(
        run_clients(shop, [shop.reservations, second_replica], keys, pool, history),
        timeout=120,
    )
    # Let the sweepers finish expiring what the clients let run out, and the
    # projection catch up with the last scanner movements.
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM reservation.reservations "
            "WHERE status = 'active' AND kind = 'cart' AND expires_at <= now()"
        ),
        lambda due: due == 0,
    )
    ledger_levels = await shop.ledger.GetStockLevels(
        ledger_pb.GetStockLevelsRequest(skus=skus, location_ids=stores,
                                        states=[types_pb2.STOCK_STATE_SELLABLE])
    )  # fmt: skip
    on_hand = {(lv.stock.sku, lv.stock.location_id): lv.on_hand for lv in ledger_levels.levels}
    for sku, loc in keys:
        await shop.wait_on_hand(sku, loc, on_hand.get((sku, loc), 0))
    await asyncio.sleep(1.0)  # the relay publishes the last events

    held = check_history(await read_stream(js, "OMNI_RESERVATION", start), set(keys))

    assert len(history.acknowledged) > 20 and len(history.refused) > 5, history
    for reference, acknowledged in history.acknowledged.items():
        stored = await shop.reservations.GetReservation(
            pb.GetReservationRequest(reservation_id=acknowledged.reservation_id)
        )
        assert [(x.sku, x.location_id, x.quantity) for x in stored.reservation.lines] == [
            (x.sku, x.location_id, x.quantity) for x in acknowledged.lines
        ]
        assert stored.reservation.reference in (reference, acknowledged.reference)
    leftovers = await pool.fetchval(
        "SELECT count(*) FROM reservation.reservations WHERE reference = ANY($1::text[])",
        history.refused,
    )
    assert leftovers == 0
    active = await pool.fetch(
        "SELECT l.sku, l.location_id, sum(l.quantity - l.consumed_quantity) AS held "
        "FROM reservation.reservation_lines l JOIN reservation.reservations r "
        "USING (reservation_id) WHERE r.channel = $1 AND l.status = 'active' "
        "GROUP BY l.sku, l.location_id",
        shop.channel,
    )
    assert {(r["sku"], r["location_id"]): r["held"] for r in active if r["held"]} == {
        key: units for key, units in held.items() if units
    }
    for sku, loc in keys:
        figure = await shop.figure(sku, loc)
        safety = SAFETY if loc == stores[1] else 0
        expected = max(0, on_hand.get((sku, loc), 0) - held.get((sku, loc), 0) - safety)
        assert (figure.reserved, figure.available) == (held.get((sku, loc), 0), expected)
