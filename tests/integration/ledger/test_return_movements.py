"""Returns routed by order routing become ledger movements (consumer ``ledger-returns``).

Each test publishes a real ``omni.routing.v1.ReturnRouted`` to JetStream, as
routing's outbox relay would, and watches the running ledger post it: through
GetStockLevels and ListMovements, the StockMoved events on OMNI_LEDGER, the
dead-letter stream and the audit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from omni.common.v1 import event_pb2, types_pb2
from omni.ledger.v1 import events_pb2 as ledger_events
from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import resources_pb2 as res
from omni.routing.v1 import events_pb2 as routing_events
from omni.routing.v1 import resources_pb2 as routing
from omnistock.db import Pool
from omnistock.messaging.dead_letters import DeadLetter, read_dead_letters, replay
from omnistock.messaging.envelope import MSG_ID_HEADER, OutgoingEvent, unpack, wrap
from omnistock.validation import ID_PATTERN
from services.ledger.audit import audit
from tests.conftest import LedgerStub, Network

T = TypeVar("T")

SUBJECT = "omni.routing.return.routed"
CONSUMER = "ledger-returns"
SELLABLE = types_pb2.STOCK_STATE_SELLABLE
DAMAGED = types_pb2.STOCK_STATE_DAMAGED
QUARANTINE = types_pb2.STOCK_STATE_QUARANTINE
IN_TRANSIT = types_pb2.STOCK_STATE_IN_TRANSIT

RESTOCK = routing.RETURN_DISPOSITION_RESTOCK
SEND_ON = routing.RETURN_DISPOSITION_SEND_TO_DISTRIBUTION_CENTRE
QUARANTINED = routing.RETURN_DISPOSITION_QUARANTINE
WRITE_OFF = routing.RETURN_DISPOSITION_WRITE_OFF


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], within: float = 20.0
) -> T:
    """Call ``probe`` until its result is accepted; fails with the last result seen."""
    deadline = time.monotonic() + within
    last = await probe()
    while not accept(last):
        assert time.monotonic() < deadline, f"not reached within {within} s; last: {last!r}"
        await asyncio.sleep(0.05)
        last = await probe()
    return last


def line(
    sku: str,
    quantity: int,
    disposition: routing.ReturnDisposition.ValueType,
    *,
    destination: str = "",
    transfer_id: str = "",
) -> routing.ReturnLine:
    return routing.ReturnLine(
        line_number=1,
        sku=sku,
        quantity=quantity,
        condition=routing.ITEM_CONDITION_SELLABLE,
        disposition=disposition,
        destination_location_id=destination,
        transfer_id=transfer_id,
        explanation="decided by the test",
    )


def returned(return_id: str, store: str, *lines: routing.ReturnLine) -> routing_events.ReturnRouted:
    created_at = Timestamp()
    created_at.GetCurrentTime()
    return routing_events.ReturnRouted(
        order_return=routing.OrderReturn(
            return_id=return_id,
            order_id=f"order-{return_id}",
            location_id=store,
            lines=lines,
            created_at=created_at,
        ),
        channel="web",
    )


def envelope_of(event: routing_events.ReturnRouted) -> event_pb2.EventEnvelope:
    """The envelope routing's relay would publish ``event`` in."""
    return wrap(OutgoingEvent(SUBJECT, event, event.order_return.return_id), "routing")


async def publish(js: JetStreamContext, envelope: event_pb2.EventEnvelope) -> None:
    # A fresh Nats-Msg-Id per publish: JetStream keeps every copy, so a copy
    # published twice reaches the ledger twice (as after the duplicate window).
    await js.publish(
        SUBJECT, envelope.SerializeToString(), headers={MSG_ID_HEADER: uuid.uuid4().hex}
    )


async def handled(pool: Pool, *envelopes: event_pb2.EventEnvelope) -> None:
    """Wait until the consumer committed every one of ``envelopes`` (its inbox has them)."""
    ids = [uuid.UUID(envelope.event_id) for envelope in envelopes]

    async def count() -> int:
        found: int = await pool.fetchval(
            "SELECT count(*) FROM ledger.inbox WHERE consumer = $1 AND event_id = ANY($2)",
            CONSUMER,
            ids,
        )
        return found

    await eventually(count, lambda found: found == len(ids))


async def levels(ledger: LedgerStub, sku: str, location: str) -> dict[int, int]:
    """On-hand per stock state of one SKU at one location."""
    response = await ledger.GetStockLevels(
        pb.GetStockLevelsRequest(skus=[sku], location_ids=[location], include_zero=True)
    )
    return {level.stock.state: level.on_hand for level in response.levels}


async def history(ledger: LedgerStub, sku: str, location: str) -> list[pb.MovementHistoryRow]:
    response = await ledger.ListMovements(
        pb.ListMovementsRequest(sku=sku, location_id=location, page_size=1000)
    )
    return list(response.rows)


async def receive(ledger: LedgerStub, network: Network, sku: str, store: str, units: int) -> None:
    await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[
                res.MovementInput(
                    key=network.next_key(),
                    sku=sku,
                    location_id=store,
                    receipt=res.Receipt(quantity=units),
                )
            ]
        )
    )


async def distribution_centre(ledger: LedgerStub, network: Network) -> str:
    location_id = f"dc-{network.tag}"
    await ledger.UpsertLocations(
        pb.UpsertLocationsRequest(
            request_id=f"dc-{network.tag}",
            locations=[
                res.Location(
                    location_id=location_id,
                    kind=types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE,
                    name=f"Test DC {location_id}",
                    city="Tilburg",
                    position=types_pb2.GeoPoint(latitude=51.56, longitude=5.09),
                )
            ],
        )
    )
    return location_id


async def stock_moved_since(
    js: JetStreamContext, start: int, sku: str
) -> list[ledger_events.StockMoved]:
    """The StockMoved events of ``sku`` published on OMNI_LEDGER from sequence ``start``."""
    subscription = await js.pull_subscribe(
        "omni.ledger.stock.moved",
        stream="OMNI_LEDGER",
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    found = []
    try:
        while True:
            try:
                batch = await subscription.fetch(500, timeout=1)
            except TimeoutError:
                break
            for message in batch:
                moved = unpack(
                    event_pb2.EventEnvelope.FromString(message.data), ledger_events.StockMoved
                )
                if moved is not None and moved.movement.sku == sku:
                    found.append(moved)
    finally:
        await subscription.unsubscribe()
    return found


async def test_a_restocked_return_adds_sellable_stock_at_the_store_and_is_published(
    ledger: LedgerStub, network: Network, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    await receive(ledger, network, sku, store, 4)
    return_id = f"R-{network.tag}"
    start = (await js.stream_info("OMNI_LEDGER")).state.last_seq + 1

    await publish(js, envelope_of(returned(return_id, store, line(sku, 2, RESTOCK))))

    final = await eventually(lambda: levels(ledger, sku, store), lambda got: got[SELLABLE] == 6)
    assert final == {SELLABLE: 6}
    *_, row = await history(ledger, sku, store)
    assert row.kind == res.MOVEMENT_KIND_RETURN
    assert row.reference == return_id
    assert (row.key.device_id, row.key.sequence) == (f"return:{return_id}", 1)
    assert (row.posting.quantity_delta, row.posting.on_hand_after) == (2, 6)

    async def published() -> list[ledger_events.StockMoved]:
        # The relay may publish the receipt's event after ``start`` too: only ours count.
        found = await stock_moved_since(js, start, sku)
        return [moved for moved in found if moved.movement.movement_id == row.movement_id]

    [moved] = await eventually(published, lambda found: len(found) > 0)
    assert moved.movement.kind == res.MOVEMENT_KIND_RETURN
    assert [p.on_hand_after for p in moved.movement.postings] == [6]


async def test_units_sent_to_a_distribution_centre_pass_through_the_store_into_transit(
    ledger: LedgerStub, network: Network, pool: Pool, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    dc = await distribution_centre(ledger, network)
    [sku] = await network.skus(1)
    await receive(ledger, network, sku, store, 5)
    return_id, transfer_id = f"R-{network.tag}", f"TR-{network.tag}"
    event = returned(
        return_id, store, line(sku, 3, SEND_ON, destination=dc, transfer_id=transfer_id)
    )

    envelope = envelope_of(event)
    await publish(js, envelope)
    await handled(pool, envelope)

    assert await levels(ledger, sku, store) == {SELLABLE: 5}
    assert await levels(ledger, sku, dc) == {IN_TRANSIT: 3}
    rows = await history(ledger, sku, store)
    assert [(r.kind, r.posting.quantity_delta, r.posting.on_hand_after) for r in rows[-2:]] == [
        (res.MOVEMENT_KIND_RETURN, 3, 8),
        (res.MOVEMENT_KIND_TRANSFER_OUT, -3, 5),
    ]
    assert [r.key.sequence for r in rows[-2:]] == [1, 2]
    # The transfer is a ledger transfer like any other: the DC receives it.
    await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[
                res.MovementInput(
                    key=network.next_key(),
                    sku=sku,
                    location_id=dc,
                    transfer_in=res.TransferIn(transfer_id=transfer_id, quantity=3),
                )
            ]
        )
    )
    assert await levels(ledger, sku, dc) == {IN_TRANSIT: 0, SELLABLE: 3}


async def test_quarantined_and_written_off_lines_land_in_their_states_in_one_batch(
    ledger: LedgerStub, network: Network, pool: Pool, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    opened, broken = await network.skus(2)
    # 64 characters: "return:<id>" would be too long for a device id.
    return_id = f"R-{network.tag}-" + "x" * (64 - len(f"R-{network.tag}-"))
    envelope = envelope_of(
        returned(
            return_id, store,
            line(opened, 1, QUARANTINED), line(broken, 2, WRITE_OFF), line(opened, 1, RESTOCK),
        )
    )  # fmt: skip

    await publish(js, envelope)
    await handled(pool, envelope)

    assert await levels(ledger, opened, store) == {SELLABLE: 1, QUARANTINE: 1}
    assert await levels(ledger, broken, store) == {DAMAGED: 0}
    written_off = await history(ledger, broken, store)
    assert [
        (r.kind, r.posting.stock.state, r.posting.quantity_delta, r.reason_code)
        for r in written_off
    ] == [
        (res.MOVEMENT_KIND_RETURN, DAMAGED, 2, ""),
        (res.MOVEMENT_KIND_ADJUSTMENT, DAMAGED, -2, "WRITTEN_OFF"),
    ]
    rows = sorted(written_off + await history(ledger, opened, store), key=lambda r: r.key.sequence)
    # One batch, one device id, the movements numbered in line order.
    assert [r.key.sequence for r in rows] == [1, 2, 3, 4]
    assert [r.posting.stock.sku for r in rows] == [opened, broken, broken, opened]
    [device] = {r.key.device_id for r in rows}
    assert device.startswith("return-sha256:") and ID_PATTERN.fullmatch(device)
    assert {r.reference for r in rows if r.kind == res.MOVEMENT_KIND_RETURN} == {return_id}


async def test_the_same_event_delivered_twice_counts_once(
    ledger: LedgerStub, network: Network, pool: Pool, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    [sku, marker_sku] = await network.skus(2)
    twice = envelope_of(returned(f"R-{network.tag}", store, line(sku, 2, RESTOCK)))
    marker = envelope_of(returned(f"M-{network.tag}", store, line(marker_sku, 1, RESTOCK)))

    await publish(js, twice)
    await publish(js, twice)
    await publish(js, marker)
    # The marker follows both copies on the stream; once it is in, both were handled.
    await handled(pool, twice, marker)

    assert await levels(ledger, sku, store) == {SELLABLE: 2}
    assert len(await history(ledger, sku, store)) == 1


async def test_a_return_published_again_under_a_new_event_id_is_a_replay(
    ledger: LedgerStub, network: Network, pool: Pool, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    dc = await distribution_centre(ledger, network)
    [sku] = await network.skus(1)
    event = returned(
        f"R-{network.tag}",
        store,
        line(sku, 2, RESTOCK),
        line(sku, 1, SEND_ON, destination=dc, transfer_id=f"TR-{network.tag}"),
    )
    first, second = envelope_of(event), envelope_of(event)  # two event ids, one return
    assert first.event_id != second.event_id

    await publish(js, first)
    await handled(pool, first)
    before = await history(ledger, sku, store)
    await publish(js, second)
    await handled(pool, second)

    assert await history(ledger, sku, store) == before
    assert await levels(ledger, sku, store) == {SELLABLE: 2}
    assert await levels(ledger, sku, dc) == {IN_TRANSIT: 1}


async def test_a_return_the_ledger_cannot_apply_is_dead_lettered_whole_and_can_be_replayed(
    ledger: LedgerStub, network: Network, pool: Pool, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    [known] = await network.skus(1)
    unknown = f"SKU-{network.tag}-later"
    envelope = envelope_of(
        returned(f"R-{network.tag}", store, line(known, 2, RESTOCK), line(unknown, 1, RESTOCK))
    )

    await publish(js, envelope)

    async def letters() -> list[DeadLetter]:
        found = await read_dead_letters(js, consumer=CONSUMER, last=100)
        return [letter for letter in found if letter.event_id == envelope.event_id]

    [letter] = await eventually(letters, lambda found: len(found) == 1, within=60)
    assert letter.original_subject == SUBJECT
    assert f"unknown sku {unknown!r}" in letter.error
    # All or nothing: the good line was not posted either.
    assert await levels(ledger, known, store) == {}
    assert await history(ledger, known, store) == []

    # Once the SKU exists, the operator's replay posts the whole return.
    await ledger.UpsertSkus(
        pb.UpsertSkusRequest(
            request_id=f"later-{network.tag}",
            skus=[res.Sku(sku=unknown, product_id=f"P-{network.tag}", name="Arrived later")],
        )
    )
    await replay(js, letter.sequence)
    await handled(pool, envelope)
    assert await levels(ledger, known, store) == {SELLABLE: 2}
    assert await levels(ledger, unknown, store) == {SELLABLE: 1}


async def test_the_ledger_still_balances_after_returns_of_every_disposition(
    ledger: LedgerStub, network: Network, pool: Pool, js: JetStreamContext
) -> None:
    [store] = await network.locations(1)
    dc = await distribution_centre(ledger, network)
    [sku] = await network.skus(1)
    sent_on = line(sku, 3, SEND_ON, destination=dc, transfer_id=f"T-{network.tag}")
    envelope = envelope_of(
        returned(
            f"R-{network.tag}", store,
            line(sku, 4, RESTOCK), sent_on, line(sku, 2, QUARANTINED), line(sku, 1, WRITE_OFF),
        )
    )  # fmt: skip

    await publish(js, envelope)
    await handled(pool, envelope)
    async with pool.acquire() as conn:
        report = await audit(conn)

    assert await levels(ledger, sku, store) == {SELLABLE: 4, QUARANTINE: 2, DAMAGED: 0}
    assert await levels(ledger, sku, dc) == {IN_TRANSIT: 3}
    assert len(await history(ledger, sku, store)) == 6
    assert report.ok, [str(finding) for finding in report.findings]
    assert report.postings_checked > 0
