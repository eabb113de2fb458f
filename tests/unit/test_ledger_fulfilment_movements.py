"""The movements the ledger posts for fulfilment facts, keyed so a replay counts once."""

from __future__ import annotations

from services.ledger import domain
from services.ledger.domain import FulfilmentFact, Shipment, TransferIn, TransferOut

TASK = "5f0c7f5e-1d7a-4c63-9a53-1f2b3c4d5e6f"


def fact(name: str, location: str, transfer_to: str = "") -> FulfilmentFact:
    return FulfilmentFact(
        fact=name,
        fulfilment_id=TASK,
        order_id="order-1",
        location_id=location,
        lines=(("JKT-M", 2), ("SCF-OS", 1)),
        transfer_to=transfer_to,
    )


def test_a_shipment_to_a_customer_ships_each_line_with_the_order_as_reference() -> None:
    moves = domain.fulfilment_movements(fact("shipped", "store-utrecht"))
    assert [(m.sku, m.location_id, m.detail) for m in moves] == [
        ("JKT-M", "store-utrecht", Shipment(2, "order-1")),
        ("SCF-OS", "store-utrecht", Shipment(1, "order-1")),
    ]
    assert [str(m.key) for m in moves] == [f"fulfilment:{TASK}#1", f"fulfilment:{TASK}#2"]


def test_a_transfer_goes_out_at_the_source_and_in_at_the_pickup_store() -> None:
    out = domain.fulfilment_movements(fact("shipped", "dc-tilburg", transfer_to="store-leiden"))
    arrived = domain.fulfilment_movements(fact("received", "store-leiden"))
    collected = domain.fulfilment_movements(fact("collected", "store-leiden"))
    assert out[0].detail == TransferOut(TASK, "store-leiden", 2)
    assert arrived[0].detail == TransferIn(TASK, 2)
    assert collected[1].detail == Shipment(1, "order-1")
    keys = [m.key for m in out + arrived + collected]
    assert len(set(keys)) == len(keys)  # one fulfilment's facts never share a key
    assert domain.validate_batch(out)  # a valid batch for the ledger's own checks
