"""ListReservations through the real service: the holds behind one reference."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import resources_pb2 as res
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import ORDER, Shop


async def listed(
    shop: Shop,
    reference: str,
    statuses: list[res.ReservationStatus.ValueType] | None = None,
    channel: str | None = None,
) -> list[res.Reservation]:
    """ListReservations for ``reference`` (in the shop's channel unless told)."""
    response = await shop.reservations.ListReservations(
        pb.ListReservationsRequest(
            channel=channel or shop.channel, reference=reference, statuses=statuses or []
        )
    )
    return list(response.reservations)


async def test_listing_by_reference_returns_its_holds_newest_first(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 10)
    order = f"order-{shop.network.tag}"
    first = await shop.reserve([(sku, store, 1)], kind=ORDER, reference=order)
    await shop.reserve([(sku, store, 1)], reference=f"cart-{shop.network.tag}")
    second = await shop.reserve([(sku, store, 2)], reference=order)
    third = await shop.reserve([(sku, store, 3)], kind=ORDER, reference=order)

    found = await listed(shop, order)

    # Whole reservations, lines included, exactly as Reserve answered them.
    assert found == [third, second, first]
    assert await listed(shop, f"order-{shop.network.tag}-nothing") == []


async def test_the_status_filter_keeps_only_the_statuses_asked_for(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    order = f"order-{shop.network.tag}"
    older = await shop.reserve([(sku, store, 2)], kind=ORDER, reference=order)
    newer = await shop.reserve([(sku, store, 1)], kind=ORDER, reference=order)
    released = await shop.reservations.ReleaseReservation(
        pb.ReleaseReservationRequest(
            request_id=f"release-{older.reservation_id}",
            reservation_id=older.reservation_id,
            reason_code="ORDER_CANCELLED",
        )
    )

    active = await listed(shop, order, [res.RESERVATION_STATUS_ACTIVE])
    ended = await listed(shop, order, [res.RESERVATION_STATUS_RELEASED])
    either = await listed(
        shop, order, [res.RESERVATION_STATUS_RELEASED, res.RESERVATION_STATUS_ACTIVE]
    )

    assert active == [newer]
    assert ended == [released.reservation]
    assert either == [newer, released.reservation]
    assert await listed(shop, order) == [newer, released.reservation]
    assert await listed(shop, order, [res.RESERVATION_STATUS_EXPIRED]) == []


async def test_another_channels_hold_with_the_same_reference_is_not_listed(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    app = Shop(shop.network, shop.reservations)
    app.channel, app.stores, app.skus = f"app-{shop.network.tag}", shop.stores, shop.skus
    await app.set_rules()
    order = f"order-{shop.network.tag}"
    web_hold = await shop.reserve([(sku, store, 1)], kind=ORDER, reference=order)
    app_hold = await app.reserve([(sku, store, 2)], kind=ORDER, reference=order)

    assert await listed(shop, order) == [web_hold]
    assert await listed(shop, order, channel=app.channel) == [app_hold]


async def test_at_most_the_newest_hundred_are_listed(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 101)
    order = f"order-{shop.network.tag}"
    holds = await asyncio.gather(
        *(shop.reserve([(sku, store, 1)], kind=ORDER, reference=order) for _ in range(101))
    )
    # Holds placed in one group-committed batch share created_at; the id breaks ties.
    newest_first = sorted(
        holds, key=lambda r: (r.created_at.ToDatetime(), r.reservation_id), reverse=True
    )

    found = await listed(shop, order)

    assert len(found) == 100
    assert found == newest_first[:100]


BAD_REQUESTS: dict[str, tuple[dict[str, object], str]] = {
    "missing reference": ({"reference": ""}, "reference"),
    "malformed reference": ({"reference": "order 42\n"}, "reference"),
    "missing channel": ({"channel": ""}, "channel"),
    "malformed channel": ({"channel": "web shop!"}, "channel"),
    "unspecified status": (
        {"statuses": [res.RESERVATION_STATUS_ACTIVE, res.RESERVATION_STATUS_UNSPECIFIED]},
        "statuses[1]",
    ),
    "unknown status": ({"statuses": [99]}, "statuses[0]"),
    "too many statuses": ({"statuses": [res.RESERVATION_STATUS_ACTIVE] * 6}, "statuses"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
async def test_bad_input_is_invalid_argument_naming_the_field(case: str, shop: Shop) -> None:
    fields, field = BAD_REQUESTS[case]
    request = pb.ListReservationsRequest(channel=shop.channel, reference="order-1")
    for name, value in fields.items():
        if name == "statuses":
            assert isinstance(value, list)
            request.statuses.extend(value)
        else:
            setattr(request, name, value)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reservations.ListReservations(request)

    error = failure(refused.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.info is not None and error.info.reason == "INVALID_REQUEST"
    assert [path for path, _ in error.violations] == [field], error.violations


async def test_every_problem_of_a_request_is_named_at_once(shop: Shop) -> None:
    request = pb.ListReservationsRequest(
        channel="web shop!", reference="", statuses=[res.RESERVATION_STATUS_UNSPECIFIED]
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reservations.ListReservations(request)

    error = failure(refused.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [path for path, _ in error.violations] == ["channel", "reference", "statuses[0]"]
