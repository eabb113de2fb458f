"""Idempotent Reserve, and bad input that is refused whole with nothing written."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from omni.reservation.v1 import reservation_service_pb2 as pb
from omnistock.db import Pool
from tests.conftest import ReservationStub
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import CART, ORDER, Shop, reserve_request


async def reservation_rows(pool: Pool) -> tuple[int, int, int, int]:
    """Rows a Reserve could write: reservations, lines, outbox events, idempotency keys."""
    row = await pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM reservation.reservations) AS reservations,
               (SELECT count(*) FROM reservation.reservation_lines) AS lines,
               (SELECT count(*) FROM reservation.outbox) AS outbox,
               (SELECT count(*) FROM reservation.idempotency_keys) AS keys
        """
    )
    assert row is not None
    return row["reservations"], row["lines"], row["outbox"], row["keys"]


async def test_the_same_request_id_holds_once_and_answers_the_same(
    shop: Shop, second_replica: ReservationStub
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    # All the stock: a retry that raced its first attempt and did not replay it
    # would find nothing left and answer INSUFFICIENT_STOCK.
    request = reserve_request(shop.channel, [(sku, store, 5)], request_id=f"rq-{shop.channel}")
    replicas = [shop.reservations, second_replica]

    answers = await asyncio.gather(*(replicas[i % 2].Reserve(request) for i in range(12)))
    again = await shop.reservations.Reserve(request)

    assert all(answer == answers[0] for answer in answers)
    assert again == answers[0]
    assert (await shop.figure(sku, store)).reserved == 5


async def test_concurrent_retries_of_a_release_all_get_its_answer(
    shop: Shop, second_replica: ReservationStub
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 3)
    held = await shop.reserve([(sku, store, 3)])
    request = pb.ReleaseReservationRequest(
        request_id=f"release-{held.reservation_id}", reservation_id=held.reservation_id
    )
    replicas = [shop.reservations, second_replica]

    answers = await asyncio.gather(*(replicas[i % 2].ReleaseReservation(request) for i in range(8)))

    assert all(answer == answers[0] for answer in answers)
    assert (await shop.figure(sku, store)).available == 3


async def test_the_same_request_id_with_other_content_is_already_exists(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    first = reserve_request(shop.channel, [(sku, store, 1)], request_id=f"rq2-{shop.channel}")
    await shop.reservations.Reserve(first)
    changed = reserve_request(shop.channel, [(sku, store, 2)], request_id=first.request_id)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reservations.Reserve(changed)

    error = failure(refused.value)
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.info is not None and error.info.reason == "REQUEST_ID_REUSED"
    assert (await shop.figure(sku, store)).reserved == 1


Options = dict[str, int | str]
BAD_REQUESTS: dict[str, tuple[list[tuple[str, str, int]], Options, str]] = {
    "unknown sku": ([("NO-SUCH-SKU", "{store}", 1)], {}, "lines[0].sku"),
    "unknown location": ([("{sku}", "no-such-store", 1)], {}, "lines[0].location_id"),
    "zero quantity": ([("{sku}", "{store}", 0)], {}, "lines[0].quantity"),
    "negative quantity": ([("{sku}", "{store}", -3)], {}, "lines[0].quantity"),
    "duplicate lines": ([("{sku}", "{store}", 1), ("{sku}", "{store}", 2)], {}, "lines[1]"),
    "no lines": ([], {}, "lines"),
    "absurd ttl": ([("{sku}", "{store}", 1)], {"ttl_seconds": 90 * 24 * 3600}, "ttl"),
    "ttl on an order hold": ([("{sku}", "{store}", 1)], {"ttl_seconds": 600, "kind": ORDER}, "ttl"),
    "no request id": ([("{sku}", "{store}", 1)], {"request_id": "-"}, "request_id"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    case: str, shop: Shop, pool: Pool
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    template, options, field = BAD_REQUESTS[case]
    lines = [(s.format(sku=sku, store=store), loc.format(sku=sku, store=store), q)
             for s, loc, q in template]  # fmt: skip
    request = reserve_request(
        shop.channel,
        lines,
        kind=ORDER if options.get("kind") == ORDER else CART,
        ttl_seconds=int(options["ttl_seconds"]) if "ttl_seconds" in options else None,
    )
    if options.get("request_id") == "-":
        request.request_id = ""
    before = await reservation_rows(pool)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reservations.Reserve(request)

    error = failure(refused.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert field in [path for path, _ in error.violations], error.violations
    assert await reservation_rows(pool) == before
    assert (await shop.figure(sku, store)).reserved == 0


async def test_availability_for_an_unknown_channel_is_not_found(shop: Shop) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reservations.GetAvailability(
            pb.GetAvailabilityRequest(channel="no-such-channel", skus=shop.skus)
        )
    error = failure(refused.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None and error.info.reason == "CHANNEL_NOT_FOUND"
