"""Holds through the real service: place, refuse, extend, convert, release, read."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import resources_pb2 as res
from tests.integration.conftest import eventually
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import ORDER, Shop, reserve_request


async def test_a_hold_lowers_availability_and_a_release_gives_it_back(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)

    held = await shop.reserve([(sku, store, 3)])

    assert held.status == res.RESERVATION_STATUS_ACTIVE
    assert [(line.sku, line.held_quantity) for line in held.lines] == [(sku, 3)]
    assert held.HasField("expires_at")
    figure = await shop.figure(sku, store)
    assert (figure.on_hand, figure.reserved, figure.available) == (5, 3, 2)

    released = await shop.reservations.ReleaseReservation(
        pb.ReleaseReservationRequest(
            request_id=f"release-{held.reservation_id}",
            reservation_id=held.reservation_id,
            reason_code="CART_ABANDONED",
        )
    )
    assert released.reservation.status == res.RESERVATION_STATUS_RELEASED
    assert (await shop.figure(sku, store)).available == 5


async def test_short_stock_is_failed_precondition_naming_each_short_line(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 2)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reserve([(sku, store, 3)])

    error = failure(refused.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "INSUFFICIENT_STOCK"
    assert error.info.metadata["line_0_requested"] == "3"
    assert error.info.metadata["line_0_available"] == "2"
    assert error.info.metadata["line_0_sku"] == sku
    assert "asks 3" in error.message and "2 available" in error.message
    assert (await shop.figure(sku, store)).reserved == 0


async def test_a_multi_line_hold_is_all_or_nothing(shop: Shop) -> None:
    other = await shop.add_sku()
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 4)
    await shop.stock(other, store, 1)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reserve([(sku, store, 2), (other, store, 2)])

    error = failure(refused.value)
    assert error.info is not None and error.info.reason == "INSUFFICIENT_STOCK"
    assert error.info.metadata["short_lines"] == "1"
    assert error.info.metadata["line_1_sku"] == other
    assert (await shop.figure(sku, store)).reserved == 0
    assert (await shop.figure(other, store)).reserved == 0


async def test_safety_stock_is_kept_back_from_the_channel(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.set_rules(safety_stock=2)
    await shop.stock(sku, store, 5)

    figure = await shop.figure(sku, store)
    assert (figure.safety_stock, figure.available) == (2, 3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reserve([(sku, store, 4)])
    assert failure(refused.value).info.metadata["line_0_available"] == "3"  # type: ignore[union-attr]
    assert (await shop.reserve([(sku, store, 3)])).status == res.RESERVATION_STATUS_ACTIVE


async def test_a_cart_hold_is_extended_then_converted_without_letting_go(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 2)
    cart = await shop.reserve([(sku, store, 2)], ttl_seconds=120)

    extended = await shop.reservations.ExtendReservation(
        pb.ExtendReservationRequest(
            request_id=f"extend-{cart.reservation_id}",
            reservation_id=cart.reservation_id,
            ttl=Duration(seconds=3600),
        )
    )
    assert extended.reservation.expires_at.seconds >= cart.expires_at.seconds + 3000

    converted = await shop.reservations.ConvertReservation(
        pb.ConvertReservationRequest(
            request_id=f"convert-{cart.reservation_id}",
            reservation_id=cart.reservation_id,
            reference="order-123",
        )
    )
    order = converted.reservation
    assert (order.kind, order.reference) == (ORDER, "order-123")
    assert not order.HasField("expires_at")
    assert (await shop.figure(sku, store)).reserved == 2

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.reservations.ExtendReservation(
            pb.ExtendReservationRequest(
                request_id=f"extend-again-{cart.reservation_id}",
                reservation_id=cart.reservation_id,
            )
        )
    assert failure(refused.value).info.reason == "NOT_A_CART_HOLD"  # type: ignore[union-attr]


async def test_releasing_some_lines_keeps_the_others(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    other = await shop.add_sku()
    await shop.stock(sku, store, 3)
    await shop.stock(other, store, 3)
    held = await shop.reserve([(sku, store, 1), (other, store, 2)], kind=ORDER)

    after = await shop.reservations.ReleaseReservation(
        pb.ReleaseReservationRequest(
            request_id=f"release-{held.reservation_id}",
            reservation_id=held.reservation_id,
            line_numbers=[2],
        )
    )

    lines = {line.line_number: line.status for line in after.reservation.lines}
    assert lines == {1: res.LINE_STATUS_ACTIVE, 2: res.LINE_STATUS_RELEASED}
    assert after.reservation.status == res.RESERVATION_STATUS_ACTIVE
    assert (await shop.figure(other, store)).reserved == 0
    got = await shop.reservations.GetReservation(
        pb.GetReservationRequest(reservation_id=held.reservation_id)
    )
    assert got.reservation == after.reservation


async def test_a_location_the_channel_does_not_sell_from_is_refused(shop: Shop) -> None:
    sku = shop.skus[0]
    elsewhere = (await shop.network.locations(1))[0]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        # Retried while the new store is still unknown here (INVALID_ARGUMENT).
        await eventually(
            lambda: shop.reservations.Reserve(reserve_request(shop.channel, [(sku, elsewhere, 1)])),
            lambda _: True,
        )
    error = failure(refused.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "LOCATION_NOT_SELLABLE"
