"""The fulfilment state machine: only legal steps, and each changes what it should."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnistock.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.fulfilment import domain
from services.fulfilment.domain import Fulfilment, Item, Kind, Status

SECRET = b"test-secret"


def task(kind: Kind = Kind.SHIP_FROM_STORE) -> Fulfilment:
    return Fulfilment(
        fulfilment_id="f-1",
        order_id="order-1",
        channel="web",
        location_id="store-utrecht",
        kind=kind,
        items=(Item(1, "JKT-M", 2), Item(2, "SCF-OS", 1)),
        pickup_location_id="store-utrecht" if kind.hands_over else "",
    )


def test_ship_from_store_walks_its_path() -> None:
    f = domain.accept(task())
    f, short = domain.confirm_pick(f, {"JKT-M": 2, "SCF-OS": 1})
    assert (f.status, short) == (Status.PICKED, {})
    f = domain.ship(domain.pack(f), "postnl", "3SABC123")
    assert (f.status, f.carrier, f.tracking_number) == (Status.SHIPPED, "postnl", "3SABC123")
    assert f.ended is False  # shipped is final for the store, but not an end of the machine
    with pytest.raises(FailedPrecondition) as refused:
        domain.cancel(f, "CUSTOMER_REQUEST")
    assert refused.value.reason == "ILLEGAL_TRANSITION"
    assert "shipped" in refused.value.message


def test_a_short_pick_reports_the_shortfall_and_goes_on() -> None:
    f, short = domain.confirm_pick(domain.accept(task()), {"JKT-M": 1, "SCF-OS": 1})
    assert f.status is Status.PICKED
    assert short == {"JKT-M": 1}
    assert domain.picked_items(f) == [("JKT-M", 1), ("SCF-OS", 1)]


def test_nothing_picked_ends_as_rejected() -> None:
    f, short = domain.confirm_pick(domain.accept(task()), {"JKT-M": 0, "SCF-OS": 0})
    assert (f.status, f.reason_code) == (Status.REJECTED, "NOTHING_PICKED")
    assert short == {"JKT-M": 2, "SCF-OS": 1}


def test_a_pick_must_name_every_sku_within_its_quantity() -> None:
    accepted = domain.accept(task())
    with pytest.raises(InvalidArgument) as caught:
        domain.confirm_pick(accepted, {"JKT-M": 3, "NOPE": 1})
    fields = {v.field for v in caught.value.violations}
    assert fields == {"lines[JKT-M]", "lines[SCF-OS]", "lines[NOPE]"}


def test_pickup_needs_the_right_code() -> None:
    f, _ = domain.confirm_pick(domain.accept(task(Kind.PICKUP_AT_STORE)), {"JKT-M": 2, "SCF-OS": 1})
    ready = domain.mark_ready(f, "042917", SECRET)
    assert ready.status is Status.READY_FOR_PICKUP
    assert b"042917" not in ready.pickup_code_hash
    with pytest.raises(PermissionDenied) as wrong:
        domain.collect(ready, "042918", SECRET)
    assert wrong.value.reason == "WRONG_PICKUP_CODE"
    assert domain.collect(ready, " 042917 ", SECRET).status is Status.COLLECTED


def test_a_transfer_is_received_before_it_is_ready() -> None:
    f, _ = domain.confirm_pick(
        domain.accept(task(Kind.TRANSFER_TO_STORE)), {"JKT-M": 2, "SCF-OS": 1}
    )
    shipped = domain.ship(domain.pack(f), "own-van", "TR-1")
    with pytest.raises(FailedPrecondition):
        domain.mark_ready(shipped, "123456", SECRET)
    with pytest.raises(FailedPrecondition):
        domain.cancel(shipped, "CUSTOMER_REQUEST")  # on the road
    received = domain.receive_transfer(shipped)
    assert domain.goods_location(received) == received.pickup_location_id
    ready = domain.mark_ready(received, "123456", SECRET)
    assert domain.expire_pickup(ready).status is Status.EXPIRED
    # Staff cannot cancel goods waiting at the pickup store; the order's cancellation can.
    with pytest.raises(FailedPrecondition):
        domain.cancel(ready, "NO_SPACE")
    assert domain.cancel_for_order(ready, "CUSTOMER_REQUEST").status is Status.CANCELLED


def test_a_transfer_whose_order_is_cancelled_on_the_road_ends_when_it_arrives() -> None:
    f, _ = domain.confirm_pick(
        domain.accept(task(Kind.TRANSFER_TO_STORE)), {"JKT-M": 2, "SCF-OS": 1}
    )
    shipped = domain.ship(domain.pack(f), "own-van", "TR-1")
    assert domain.goods_location(shipped) == shipped.location_id
    flagged = domain.cancel_for_order(shipped, "CUSTOMER_REQUEST")
    assert (flagged.status, flagged.cancel_on_arrival) == (Status.SHIPPED, True)
    assert domain.goods_location(flagged) == flagged.pickup_location_id
    arrived = domain.receive_transfer(flagged)
    assert arrived.status is Status.CANCELLED
    assert arrived.reason_code == "CUSTOMER_REQUEST"


def test_kinds_refuse_steps_that_are_not_theirs() -> None:
    picked, _ = domain.confirm_pick(
        domain.accept(task(Kind.PICKUP_AT_STORE)), {"JKT-M": 2, "SCF-OS": 1}
    )
    with pytest.raises(FailedPrecondition):
        domain.ship(domain.pack(picked), "postnl", "X")
    home, _ = domain.confirm_pick(domain.accept(task()), {"JKT-M": 2, "SCF-OS": 1})
    with pytest.raises(FailedPrecondition):
        domain.mark_ready(home, "123456", SECRET)
    with pytest.raises(FailedPrecondition):
        domain.receive_transfer(domain.ship(domain.pack(home), "postnl", "X"))


def test_timeouts() -> None:
    assert domain.expire_task(task()).status is Status.REJECTED
    with pytest.raises(FailedPrecondition):
        domain.expire_task(domain.accept(task()))
    assert domain.pickup_code(7) == "000007"
    assert len(domain.pickup_code(10**12 + 5)) == domain.PICKUP_CODE_DIGITS


Step = Callable[[Fulfilment], Fulfilment]
STEPS: dict[str, Step] = {
    "accept": domain.accept,
    "reject": lambda f: domain.reject(f, "NO_STAFF"),
    "pick all": lambda f: domain.confirm_pick(f, {i.sku: i.quantity for i in f.items})[0],
    "pick some": lambda f: domain.confirm_pick(f, {i.sku: i.quantity // 2 for i in f.items})[0],
    "pack": domain.pack,
    "ship": lambda f: domain.ship(f, "postnl", "X"),
    "receive": domain.receive_transfer,
    "ready": lambda f: domain.mark_ready(f, "111111", SECRET),
    "collect": lambda f: domain.collect(f, "111111", SECRET),
    "wrong code": lambda f: domain.collect(f, "222222", SECRET),
    "cancel": lambda f: domain.cancel(f, "CUSTOMER_REQUEST"),
    "expire task": domain.expire_task,
    "expire pickup": domain.expire_pickup,
}


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    steps=st.lists(st.sampled_from(sorted(STEPS)), max_size=12),
)
def test_any_sequence_keeps_the_machine_sound(kind: Kind, steps: list[str]) -> None:
    f = task(kind)
    for name in steps:
        before = f
        try:
            f = STEPS[name](f)
        except (FailedPrecondition, PermissionDenied):
            assert f == before  # a refused step changes nothing
            continue
        # Ended fulfilments never change again; goods never exceed what was asked.
        assert not before.ended
        assert all(0 <= item.picked <= item.quantity for item in f.items)
        if f.status is Status.COLLECTED:
            assert kind.hands_over
        if f.status in (Status.SHIPPED, Status.RECEIVED):
            assert kind.ships
        if f.status is Status.RECEIVED:
            assert kind is Kind.TRANSFER_TO_STORE


def test_a_task_goes_on_without_cancelled_lines_until_its_goods_leave() -> None:
    f = domain.accept(task())
    assert [i.sku for i in domain.drop_lines(f, {1}).items] == ["SCF-OS"]
    picked, _ = domain.confirm_pick(f, {"JKT-M": 2, "SCF-OS": 1})
    shipped = domain.ship(domain.pack(picked), "postnl", "3S")
    with pytest.raises(FailedPrecondition):
        domain.drop_lines(shipped, {1})
