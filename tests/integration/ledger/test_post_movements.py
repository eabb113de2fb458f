"""PostMovements against the real service: replays, conflicts, bad batches, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import resources_pb2 as res
from omnistock.db import Pool
from tests.conftest import LedgerStub, Network
from tests.integration.helpers import failure, ledger_row_counts

SELLABLE = types_pb2.STOCK_STATE_SELLABLE


def receipt(key: res.IdempotencyKey, sku: str, location: str, quantity: int) -> res.MovementInput:
    return res.MovementInput(
        key=key, sku=sku, location_id=location, receipt=res.Receipt(quantity=quantity)
    )


def shipment(key: res.IdempotencyKey, sku: str, location: str, quantity: int) -> res.MovementInput:
    return res.MovementInput(
        key=key, sku=sku, location_id=location, shipment=res.Shipment(quantity=quantity)
    )


async def on_hand(ledger: LedgerStub, sku: str, location: str, state: int = SELLABLE) -> int:
    response = await ledger.GetStockLevels(
        pb.GetStockLevelsRequest(skus=[sku], location_ids=[location], include_zero=True)
    )
    return sum(level.on_hand for level in response.levels if level.stock.state == state)


async def test_a_replayed_scanner_batch_returns_the_first_answer_and_counts_nothing_twice(
    ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    batch = pb.PostMovementsRequest(
        movements=[
            receipt(network.next_key(), sku, store, 10),
            shipment(network.next_key(), sku, store, 3),
        ]
    )

    first = await ledger.PostMovements(batch)
    again = await ledger.PostMovements(batch)

    assert [r.replayed for r in first.results] == [False, False]
    assert [r.replayed for r in again.results] == [True, True]
    assert [r.movement for r in again.results] == [r.movement for r in first.results]
    assert first.results[1].movement.postings[0].on_hand_after == 7
    assert await on_hand(ledger, sku, store) == 7


async def test_a_buffer_replayed_with_new_movements_counts_only_the_new_ones(
    ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    old = receipt(network.next_key(), sku, store, 5)
    await ledger.PostMovements(pb.PostMovementsRequest(movements=[old]))

    response = await ledger.PostMovements(
        pb.PostMovementsRequest(movements=[old, receipt(network.next_key(), sku, store, 2)])
    )

    assert [r.replayed for r in response.results] == [True, False]
    assert await on_hand(ledger, sku, store) == 7


async def test_a_key_reused_for_other_content_is_already_exists_and_writes_nothing(
    ledger: LedgerStub, network: Network, pool: Pool
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    key = network.next_key()
    await ledger.PostMovements(pb.PostMovementsRequest(movements=[receipt(key, sku, store, 4)]))
    before = await ledger_row_counts(pool)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.PostMovements(
            pb.PostMovementsRequest(
                movements=[
                    receipt(network.next_key(), sku, store, 1),  # new and valid ...
                    receipt(key, sku, store, 40),  # ... but this key meant 4 units before
                ]
            )
        )

    rejected = failure(caught.value)
    assert rejected.code == grpc.StatusCode.ALREADY_EXISTS
    assert rejected.info is not None and rejected.info.reason == "IDEMPOTENCY_KEY_REUSED"
    assert rejected.info.metadata["index"] == "1"
    assert await ledger_row_counts(pool) == before
    assert await on_hand(ledger, sku, store) == 4


BuildBatch: TypeAlias = Callable[[Network, str, str], list[res.MovementInput]]
BAD_BATCHES: dict[str, tuple[BuildBatch, grpc.StatusCode, str | None]] = {
    "zero receipt quantity": (
        lambda n, sku, loc: [receipt(n.next_key(), sku, loc, 0)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].receipt.quantity",
    ),
    "negative shipment quantity": (
        lambda n, sku, loc: [shipment(n.next_key(), sku, loc, -2)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].shipment.quantity",
    ),
    "missing key": (
        lambda n, sku, loc: [
            res.MovementInput(sku=sku, location_id=loc, receipt=res.Receipt(quantity=1))
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].key.device_id",
    ),
    "no movement kind": (
        lambda n, sku, loc: [res.MovementInput(key=n.next_key(), sku=sku, location_id=loc)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0]",
    ),
    "malformed sku": (
        lambda n, sku, loc: [receipt(n.next_key(), "bad sku with spaces", loc, 1)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].sku",
    ),
    "adjustment without reason": (
        lambda n, sku, loc: [
            res.MovementInput(
                key=n.next_key(), sku=sku, location_id=loc,
                adjustment=res.Adjustment(quantity_delta=-1),
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].adjustment.reason_code",
    ),
    "duplicate key in batch": (
        lambda n, sku, loc: (
            lambda key: [receipt(key, sku, loc, 1), receipt(key, sku, loc, 1)]
        )(n.next_key()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[1].key",
    ),
    "oversized batch": (
        lambda n, sku, loc: [receipt(n.next_key(), sku, loc, 1) for _ in range(501)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements",
    ),
    "unknown location (after valid movements)": (
        lambda n, sku, loc: [
            receipt(n.next_key(), sku, loc, 5),
            receipt(n.next_key(), sku, "store-atlantis", 5),
        ],
        grpc.StatusCode.NOT_FOUND,
        None,
    ),
    "unknown sku": (
        lambda n, sku, loc: [receipt(n.next_key(), "NO-SUCH-SKU", loc, 5)],
        grpc.StatusCode.NOT_FOUND,
        None,
    ),
    "shipping more than on hand (after a receipt in the same batch)": (
        lambda n, sku, loc: [
            receipt(n.next_key(), sku, loc, 2),
            shipment(n.next_key(), sku, loc, 3),
        ],
        grpc.StatusCode.FAILED_PRECONDITION,
        None,
    ),
    "reference longer than 128 characters": (
        lambda n, sku, loc: [
            res.MovementInput(
                key=n.next_key(), sku=sku, location_id=loc,
                receipt=res.Receipt(quantity=1, reference="x" * 129),
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].receipt.reference",
    ),
    "NUL character in a reference": (
        lambda n, sku, loc: [
            res.MovementInput(
                key=n.next_key(), sku=sku, location_id=loc,
                shipment=res.Shipment(quantity=1, reference="ORDER\x001"),
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].shipment.reference",
    ),
    "device id with a trailing newline": (
        lambda n, sku, loc: [
            receipt(res.IdempotencyKey(device_id=n.device + "\n", sequence=1), sku, loc, 1)
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].key.device_id",
    ),
    "occurred_at outside the timestamp range": (
        lambda n, sku, loc: [
            res.MovementInput(
                key=n.next_key(), sku=sku, location_id=loc, receipt=res.Receipt(quantity=1),
                occurred_at=Timestamp(seconds=10**13),
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "movements[0].occurred_at",
    ),
    "receiving a transfer that was never sent": (
        lambda n, sku, loc: [
            res.MovementInput(
                key=n.next_key(), sku=sku, location_id=loc,
                transfer_in=res.TransferIn(transfer_id="TR-NEVER-SENT", quantity=1),
            )
        ],
        grpc.StatusCode.FAILED_PRECONDITION,
        None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_BATCHES), ids=list(BAD_BATCHES))
async def test_a_bad_batch_is_rejected_whole_with_a_clear_error_and_nothing_written(
    case: str, ledger: LedgerStub, network: Network, pool: Pool
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    build, expected_code, expected_field = BAD_BATCHES[case]
    before = await ledger_row_counts(pool)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.PostMovements(pb.PostMovementsRequest(movements=build(network, sku, store)))

    rejected = failure(caught.value)
    assert rejected.code == expected_code
    assert rejected.info is not None and rejected.info.reason.isupper()
    assert rejected.message  # a sentence for a person, not just a code
    if expected_field is not None:
        assert expected_field in [field for field, _ in rejected.violations]
    assert await ledger_row_counts(pool) == before
    assert await on_hand(ledger, sku, store) == 0


async def test_every_problem_of_a_batch_is_reported_at_once(
    ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.PostMovements(
            pb.PostMovementsRequest(
                movements=[
                    receipt(network.next_key(), sku, store, 0),
                    shipment(network.next_key(), "", store, 1),
                    receipt(res.IdempotencyKey(device_id="d", sequence=0), sku, store, 1),
                ]
            )
        )

    fields = {field for field, _ in failure(caught.value).violations}
    assert {"movements[0].receipt.quantity", "movements[1].sku", "movements[2].key.sequence"} <= (
        fields
    )


async def test_shrinking_below_zero_names_the_stock_and_quantities(
    ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    await ledger.PostMovements(
        pb.PostMovementsRequest(movements=[receipt(network.next_key(), sku, store, 3)])
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.PostMovements(
            pb.PostMovementsRequest(movements=[shipment(network.next_key(), sku, store, 5)])
        )

    rejected = failure(caught.value)
    assert rejected.info is not None and rejected.info.reason == "NEGATIVE_ON_HAND"
    assert dict(rejected.info.metadata) == {
        "index": "0",
        "sku": sku,
        "location_id": store,
        "state": "sellable",
        "on_hand": "3",
        "requested_delta": "-5",
    }
    assert "only 3 are on hand" in rejected.message


async def test_many_concurrent_scanners_on_one_stock_sum_exactly(
    ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    scanners, movements_each = 16, 12

    async def scanner(number: int) -> None:
        device = f"{network.device}-{number}"
        for sequence in range(1, movements_each + 1):
            key = res.IdempotencyKey(device_id=device, sequence=sequence)
            batch = pb.PostMovementsRequest(movements=[receipt(key, sku, store, number + 1)])
            await ledger.PostMovements(batch)
            if sequence % 4 == 0:  # a flaky network: the scanner replays its last movement
                await ledger.PostMovements(batch)

    await asyncio.gather(*(scanner(n) for n in range(scanners)))

    expected = sum((n + 1) * movements_each for n in range(scanners))
    assert await on_hand(ledger, sku, store) == expected
    history = await ledger.ListMovements(
        pb.ListMovementsRequest(sku=sku, location_id=store, page_size=1000)
    )
    assert len(history.rows) == scanners * movements_each
    # Versions count 1..n without gaps and running balances chain.
    versions = [row.posting.balance_version for row in history.rows]
    assert versions == list(range(1, scanners * movements_each + 1))
    running = 0
    for row in history.rows:
        running += row.posting.quantity_delta
        assert row.posting.on_hand_after == running


async def test_concurrent_opposite_transfers_do_not_deadlock(
    ledger: LedgerStub, network: Network
) -> None:
    a, b = await network.locations(2)
    skus = await network.skus(3)
    await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[receipt(network.next_key(), s, loc, 100) for s in skus for loc in (a, b)]
        )
    )

    async def transfers(source: str, destination: str, device: str) -> None:
        for sequence in range(1, 9):
            await ledger.PostMovements(
                pb.PostMovementsRequest(
                    movements=[
                        res.MovementInput(
                            key=res.IdempotencyKey(device_id=device, sequence=sequence * 10 + i),
                            sku=sku,
                            location_id=source,
                            transfer_out=res.TransferOut(
                                transfer_id=f"TR-{device}-{sequence}",
                                destination_location_id=destination,
                                quantity=1,
                            ),
                        )
                        for i, sku in enumerate(reversed(skus) if source == a else skus)
                    ]
                )
            )

    await asyncio.wait_for(
        asyncio.gather(
            transfers(a, b, f"{network.device}-ab"), transfers(b, a, f"{network.device}-ba")
        ),
        timeout=30,
    )
    for sku in skus:
        assert await on_hand(ledger, sku, a) == 92
        assert await on_hand(ledger, sku, a, types_pb2.STOCK_STATE_IN_TRANSIT) == 8


async def test_a_transfer_is_in_transit_until_received(
    ledger: LedgerStub, network: Network
) -> None:
    dc, store = await network.locations(2)
    [sku] = await network.skus(1)
    transfer = "TR-" + network.tag
    await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[
                receipt(network.next_key(), sku, dc, 20),
                res.MovementInput(
                    key=network.next_key(), sku=sku, location_id=dc,
                    transfer_out=res.TransferOut(
                        transfer_id=transfer, destination_location_id=store, quantity=6
                    ),
                ),
            ]
        )
    )  # fmt: skip
    assert await on_hand(ledger, sku, dc) == 14
    assert await on_hand(ledger, sku, store, types_pb2.STOCK_STATE_IN_TRANSIT) == 6

    arrive = res.MovementInput(
        key=network.next_key(), sku=sku, location_id=store,
        transfer_in=res.TransferIn(transfer_id=transfer, quantity=4),
    )  # fmt: skip
    await ledger.PostMovements(pb.PostMovementsRequest(movements=[arrive]))

    assert await on_hand(ledger, sku, store) == 4
    assert await on_hand(ledger, sku, store, types_pb2.STOCK_STATE_IN_TRANSIT) == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        too_many = res.MovementInput(
            key=network.next_key(), sku=sku, location_id=store,
            transfer_in=res.TransferIn(transfer_id=transfer, quantity=3),
        )  # fmt: skip
        await ledger.PostMovements(pb.PostMovementsRequest(movements=[too_many]))
    info = failure(caught.value).info
    assert info is not None and info.reason == "RECEIVED_MORE_THAN_SENT"


async def test_a_cycle_count_records_the_difference(ledger: LedgerStub, network: Network) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    await ledger.PostMovements(
        pb.PostMovementsRequest(movements=[receipt(network.next_key(), sku, store, 9)])
    )
    count = res.MovementInput(
        key=network.next_key(), sku=sku, location_id=store,
        cycle_count=res.CycleCount(counted_quantity=6),
    )  # fmt: skip

    response = await ledger.PostMovements(pb.PostMovementsRequest(movements=[count]))

    posting = response.results[0].movement.postings[0]
    assert (posting.quantity_delta, posting.on_hand_after) == (-3, 6)
    assert response.results[0].movement.counted_quantity == 6


async def test_stock_as_of_a_past_time(ledger: LedgerStub, network: Network) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    await ledger.PostMovements(
        pb.PostMovementsRequest(movements=[receipt(network.next_key(), sku, store, 10)])
    )
    await asyncio.sleep(0.05)
    between = Timestamp()
    between.GetCurrentTime()
    await asyncio.sleep(0.05)
    await ledger.PostMovements(
        pb.PostMovementsRequest(movements=[shipment(network.next_key(), sku, store, 4)])
    )

    past = await ledger.GetStockLevels(
        pb.GetStockLevelsRequest(skus=[sku], location_ids=[store], as_of=between)
    )
    now = await ledger.GetStockLevels(pb.GetStockLevelsRequest(skus=[sku], location_ids=[store]))
    before_anything = Timestamp(seconds=between.seconds - 3600)
    empty = await ledger.GetStockLevels(
        pb.GetStockLevelsRequest(skus=[sku], location_ids=[store], as_of=before_anything)
    )

    assert [level.on_hand for level in past.levels] == [10]
    assert past.as_of == between
    assert [level.on_hand for level in now.levels] == [6]
    assert list(empty.levels) == []


async def test_history_pages_in_ledger_order(ledger: LedgerStub, network: Network) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[receipt(network.next_key(), sku, store, q) for q in range(1, 8)]
        )
    )
    rows: list[pb.MovementHistoryRow] = []
    token = ""
    pages = 0
    while True:
        page = await ledger.ListMovements(
            pb.ListMovementsRequest(sku=sku, page_size=3, page_token=token)
        )
        rows += page.rows
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert pages == 3
    assert [row.posting.on_hand_after for row in rows] == [1, 3, 6, 10, 15, 21, 28]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.ListMovements(pb.ListMovementsRequest(page_size=3))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_first_transfers_on_different_routes_cannot_both_win(
    ledger: LedgerStub, network: Network
) -> None:
    a, b, c, d = await network.locations(4)
    [sku] = await network.skus(1)
    await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[receipt(network.next_key(), sku, loc, 500) for loc in (a, c)]
        )
    )
    pairs = 15

    def send(transfer: str, source: str, destination: str, quantity: int) -> Awaitable[object]:
        request = pb.PostMovementsRequest(
            movements=[
                res.MovementInput(
                    key=network.next_key(), sku=sku, location_id=source,
                    transfer_out=res.TransferOut(
                        transfer_id=transfer, destination_location_id=destination,
                        quantity=quantity,
                    ),
                )
            ]
        )  # fmt: skip
        return ledger.PostMovements(request)

    # Two systems reuse each transfer number on different routes, at the same moment.
    calls = []
    for n in range(pairs):
        calls += [send(f"TR-{network.tag}-{n}", a, b, 10), send(f"TR-{network.tag}-{n}", c, d, 3)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    for n in range(pairs):
        first, second = outcomes[2 * n], outcomes[2 * n + 1]
        lost = [o for o in (first, second) if isinstance(o, grpc.aio.AioRpcError)]
        assert len(lost) == 1, f"transfer {n}: both routes were accepted"
        info = failure(lost[0]).info
        assert info is not None and info.reason == "TRANSFER_ROUTE_MISMATCH"
    # Whatever won, what is in transit is exactly what the winners sent.
    winners_ab = sum(1 for o in outcomes[0::2] if isinstance(o, pb.PostMovementsResponse))
    in_transit_b = await on_hand(ledger, sku, b, types_pb2.STOCK_STATE_IN_TRANSIT)
    in_transit_d = await on_hand(ledger, sku, d, types_pb2.STOCK_STATE_IN_TRANSIT)
    assert (in_transit_b, in_transit_d) == (10 * winners_ab, 3 * (pairs - winners_ab))
    for n in range(pairs):
        won_ab = isinstance(outcomes[2 * n], pb.PostMovementsResponse)
        destination, quantity = (b, 10) if won_ab else (d, 3)
        arrive = res.MovementInput(
            key=network.next_key(), sku=sku, location_id=destination,
            transfer_in=res.TransferIn(transfer_id=f"TR-{network.tag}-{n}", quantity=quantity),
        )  # fmt: skip
        await ledger.PostMovements(pb.PostMovementsRequest(movements=[arrive]))
    assert await on_hand(ledger, sku, b) + await on_hand(ledger, sku, d) == in_transit_b + (
        in_transit_d
    )


QUERY_ERRORS = {
    "unknown stock state filter": pb.GetStockLevelsRequest(
        skus=["A"], states=[types_pb2.StockState.ValueType(99)]
    ),
    "unspecified stock state filter": pb.GetStockLevelsRequest(
        skus=["A"], states=[types_pb2.STOCK_STATE_UNSPECIFIED]
    ),
    "no filter at all": pb.GetStockLevelsRequest(),
    "as of in the future": pb.GetStockLevelsRequest(
        skus=["A"], as_of=Timestamp(seconds=4_000_000_000)
    ),
    "malformed sku filter": pb.GetStockLevelsRequest(skus=["A\x00"]),
}


@pytest.mark.parametrize("case", list(QUERY_ERRORS), ids=list(QUERY_ERRORS))
async def test_bad_stock_queries_are_invalid_argument(ledger: LedgerStub, case: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.GetStockLevels(QUERY_ERRORS[case])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("token", ["ffffffffffffffffffff", "p-1", "p0", "12", "pzz"])
async def test_foreign_page_tokens_are_invalid_argument(ledger: LedgerStub, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.ListMovements(pb.ListMovementsRequest(sku="A", page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_batch_with_hundreds_of_problems_still_gets_a_readable_invalid_argument(
    ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    bad = [
        receipt(res.IdempotencyKey(device_id="", sequence=n + 1), sku, store, 0) for n in range(500)
    ]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.PostMovements(pb.PostMovementsRequest(movements=bad))

    rejected = failure(caught.value)
    assert rejected.code == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED
    assert len(rejected.violations) == 50
    assert rejected.info is not None
    assert rejected.info.metadata["violations"] == "1000"
    assert rejected.info.metadata["violations_shown"] == "50"
