"""Unit tests of the ledger's movement rules: validation and postings, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from omnistock.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ledger.domain import (
    MAX_BATCH_SIZE,
    Adjustment,
    Balance,
    CustomerReturn,
    CycleCount,
    IdempotencyKey,
    MovementDetail,
    Positions,
    PostMovement,
    Receipt,
    Shipment,
    StateChange,
    StockKey,
    StockState,
    TransferIn,
    TransferOut,
    check_references,
    lock_order,
    validate_batch,
)

SELLABLE, DAMAGED, QUARANTINE, IN_TRANSIT = (
    StockState.SELLABLE, StockState.DAMAGED, StockState.QUARANTINE, StockState.IN_TRANSIT,
)  # fmt: skip


def move(
    detail: MovementDetail | None, sequence: int = 1, sku: str = "SKU-1", location: str = "store-a"
) -> PostMovement:
    return PostMovement(IdempotencyKey("scanner-1", sequence), sku, location, detail)


def fields_of(error: InvalidArgument) -> set[str]:
    return {violation.field for violation in error.violations}


def test_defaults_are_applied_where_a_state_may_be_omitted() -> None:
    [receipt] = validate_batch([move(Receipt(3))])
    assert receipt.detail == Receipt(3, SELLABLE)


def test_a_customer_return_must_say_which_state_the_goods_go_into() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_batch([move(CustomerReturn(1, None))])
    assert fields_of(caught.value) == {"movements[0].customer_return.state"}


@pytest.mark.parametrize(
    ("detail", "field"),
    [
        (Receipt(0), "movements[0].receipt.quantity"),
        (Receipt(1_000_001), "movements[0].receipt.quantity"),
        (Receipt(1, IN_TRANSIT), "movements[0].receipt.state"),
        (Adjustment(0, "FOUND"), "movements[0].adjustment.quantity_delta"),
        (Adjustment(2, "found"), "movements[0].adjustment.reason_code"),
        (TransferOut("TR-1", "store-a", 1), "movements[0].transfer_out.destination_location_id"),
        (TransferOut("", "store-b", 1), "movements[0].transfer_out.transfer_id"),
        (TransferIn("TR-1", 0), "movements[0].transfer_in.quantity"),
        (CycleCount(-1), "movements[0].cycle_count.counted_quantity"),
        (Shipment(-5), "movements[0].shipment.quantity"),
        (StateChange(1, SELLABLE, SELLABLE), "movements[0].state_change.to_state"),
        (StateChange(1, SELLABLE, IN_TRANSIT), "movements[0].state_change.to_state"),
        (StateChange(1, None, DAMAGED), "movements[0].state_change.from_state"),
        (None, "movements[0]"),
    ],
)
def test_each_bad_movement_is_named_by_its_field(detail: MovementDetail | None, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_batch([move(detail)])
    assert field in fields_of(caught.value)


def test_ids_keys_and_clocks_are_checked() -> None:
    future = datetime.now(UTC) + timedelta(hours=2)
    bad = [
        PostMovement(IdempotencyKey("", 1), "SKU-1", "store-a", Receipt(1)),
        PostMovement(IdempotencyKey("scanner", 0), "SKU-1", "store-a", Receipt(1)),
        PostMovement(IdempotencyKey("scanner", 1), "SKU 1", "store-a", Receipt(1)),
        PostMovement(IdempotencyKey("scanner", 2), "SKU-1", "", Receipt(1)),
        PostMovement(IdempotencyKey("scanner", 3), "SKU-1", "store-a", Receipt(1), future),
    ]
    with pytest.raises(InvalidArgument) as caught:
        validate_batch(bad)
    assert fields_of(caught.value) == {
        "movements[0].key.device_id",
        "movements[1].key.sequence",
        "movements[2].sku",
        "movements[3].location_id",
        "movements[4].occurred_at",
    }
    assert "movements[0].key.device_id: the device id is required" in caught.value.message
    assert "(and 4 more problems)" in caught.value.message


def test_batches_must_be_non_empty_bounded_and_free_of_repeated_keys() -> None:
    with pytest.raises(InvalidArgument, match="at least one"):
        validate_batch([])
    with pytest.raises(InvalidArgument, match=f"at most {MAX_BATCH_SIZE}"):
        validate_batch([move(Receipt(1), n) for n in range(1, MAX_BATCH_SIZE + 2)])
    with pytest.raises(InvalidArgument) as caught:
        validate_batch([move(Receipt(1), 7), move(Shipment(1), 7)])
    assert fields_of(caught.value) == {"movements[1].key"}


def test_unknown_references_are_not_found_and_all_named() -> None:
    movements = validate_batch(
        [move(Receipt(1), 1, sku="NOPE"), move(TransferOut("TR", "store-x", 1), 2)]
    )
    with pytest.raises(NotFound) as caught:
        check_references(movements, known_skus={"SKU-1"}, known_locations={"store-a"})
    assert caught.value.metadata["problems"] == "2"
    assert "unknown sku 'NOPE'" in caught.value.message
    assert "unknown location 'store-x'" in caught.value.message


def positions(**on_hand: int) -> Positions:
    """Balances keyed like ``store_a_sellable=5`` for SKU-1."""
    balances = {}
    for name, quantity in on_hand.items():
        location, state = name.rsplit("_", 1)
        key = StockKey("SKU-1", location.replace("_", "-"), StockState(state))
        balances[key] = Balance(quantity, 1 if quantity else 0)
    return Positions(balances)


def test_a_receipt_then_a_shipment_post_running_balances_and_versions() -> None:
    ledger = positions()
    [received] = ledger.apply(move(Receipt(10, SELLABLE)))
    [shipped] = ledger.apply(move(Shipment(4), 2))
    assert (received.quantity_delta, received.on_hand_after, received.balance_version) == (
        10,
        10,
        1,
    )
    assert (shipped.quantity_delta, shipped.on_hand_after, shipped.balance_version) == (-4, 6, 2)


def test_on_hand_never_goes_negative_and_a_refused_movement_changes_nothing() -> None:
    ledger = positions(store_a_sellable=3)
    with pytest.raises(FailedPrecondition) as caught:
        ledger.apply(move(Shipment(4)))
    assert caught.value.reason == "NEGATIVE_ON_HAND"
    assert caught.value.metadata["on_hand"] == "3"
    assert ledger.balances[StockKey("SKU-1", "store-a", SELLABLE)] == Balance(3, 1)


def test_a_cycle_count_posts_the_difference_even_when_it_is_zero() -> None:
    ledger = positions(store_a_sellable=7)
    [down] = ledger.apply(move(CycleCount(5, SELLABLE)))
    [same] = ledger.apply(move(CycleCount(5, SELLABLE), 2))
    [up] = ledger.apply(move(CycleCount(9, SELLABLE), 3))
    assert [p.quantity_delta for p in (down, same, up)] == [-2, 0, 4]
    assert up.on_hand_after == 9


def test_a_state_change_moves_units_between_states() -> None:
    ledger = positions(store_a_sellable=5)
    out_of, into = ledger.apply(move(StateChange(2, SELLABLE, DAMAGED, "DROPPED")))
    assert (out_of.stock.state, out_of.quantity_delta, out_of.on_hand_after) == (SELLABLE, -2, 3)
    assert (into.stock.state, into.quantity_delta, into.on_hand_after) == (DAMAGED, 2, 2)


def test_a_transfer_goes_through_transit_and_cannot_over_receive() -> None:
    ledger = positions(store_a_sellable=10)
    sent = ledger.apply(move(TransferOut("TR-9", "store-b", 6)))
    assert [(p.stock.location_id, p.stock.state, p.quantity_delta) for p in sent] == [
        ("store-a", SELLABLE, -6),
        ("store-b", IN_TRANSIT, 6),
    ]
    received = ledger.apply(move(TransferIn("TR-9", 4), 2, location="store-b"))
    assert [(p.stock.state, p.on_hand_after) for p in received] == [(IN_TRANSIT, 2), (SELLABLE, 4)]
    with pytest.raises(FailedPrecondition, match="only 2 are in transit"):
        ledger.apply(move(TransferIn("TR-9", 3), 3, location="store-b"))
    with pytest.raises(FailedPrecondition) as wrong_place:
        ledger.apply(move(TransferIn("TR-9", 1), 4, location="store-c"))
    assert wrong_place.value.reason == "WRONG_TRANSFER_DESTINATION"
    with pytest.raises(FailedPrecondition) as unknown:
        ledger.apply(move(TransferIn("TR-NONE", 1), 5, location="store-b"))
    assert unknown.value.reason == "UNKNOWN_TRANSFER"
    with pytest.raises(FailedPrecondition) as rerouted:
        ledger.apply(move(TransferOut("TR-9", "store-c", 1), 6))
    assert rerouted.value.reason == "TRANSFER_ROUTE_MISMATCH"


def test_rows_are_locked_in_one_global_order_whatever_the_batch_order() -> None:
    forwards = validate_batch(
        [move(Receipt(1), 1, sku="B", location="x"), move(Receipt(1), 2, sku="A", location="y")]
    )
    backwards = list(reversed(forwards))
    assert lock_order(forwards) == lock_order(backwards)
    assert lock_order(forwards)[0].sku == "A"


def test_the_content_digest_ignores_defaults_but_sees_every_real_difference() -> None:
    implicit = validate_batch([move(Receipt(3))])[0]
    explicit = validate_batch([move(Receipt(3, SELLABLE))])[0]
    other = validate_batch([move(Receipt(4))])[0]
    elsewhere = validate_batch([move(Receipt(3), location="store-b")])[0]
    assert implicit.content_digest() == explicit.content_digest()
    assert len({implicit.content_digest(), other.content_digest(), elsewhere.content_digest()}) == 3
    assert QUARANTINE.value == "quarantine"
