"""Property tests: whatever movements arrive, the ledger's arithmetic holds."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from omnistock.errors import FailedPrecondition
from services.ledger.domain import (
    Adjustment,
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
)

AT_REST = [StockState.SELLABLE, StockState.DAMAGED, StockState.QUARANTINE]
LOCATIONS = ["store-a", "store-b", "dc-c"]
quantity = st.integers(min_value=1, max_value=50)
state = st.sampled_from(AT_REST)
transfer_id = st.sampled_from(["TR-1", "TR-2"])

details: st.SearchStrategy[MovementDetail] = st.one_of(
    st.builds(Receipt, quantity, state),
    st.builds(
        Adjustment,
        st.integers(min_value=-30, max_value=30).filter(bool),
        st.just("CORRECTION"),
        state,
    ),
    st.builds(Shipment, quantity),
    st.builds(CustomerReturn, quantity, state),
    st.builds(CycleCount, st.integers(min_value=0, max_value=60), state),
    st.builds(StateChange, quantity, state, state).filter(lambda s: s.from_state != s.to_state),
    st.builds(TransferOut, transfer_id, st.sampled_from(LOCATIONS), quantity),
    st.builds(TransferIn, transfer_id, quantity),
)

movements = st.lists(
    st.tuples(st.sampled_from(["SKU-1", "SKU-2"]), st.sampled_from(LOCATIONS), details),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(movements)
def test_balances_equal_the_sum_of_postings_and_never_go_negative(
    script: list[tuple[str, str, MovementDetail]],
) -> None:
    ledger = Positions({})
    sums: dict[StockKey, int] = defaultdict(int)
    versions: dict[StockKey, int] = defaultdict(int)
    for number, (sku, location, detail) in enumerate(script, start=1):
        if isinstance(detail, TransferOut) and detail.destination_location_id == location:
            continue  # validation rejects this before the rules run
        movement = PostMovement(IdempotencyKey("prop", number), sku, location, detail).normalised()
        before = {key: (b.on_hand, b.version) for key, b in ledger.balances.items()}
        try:
            postings = ledger.apply(movement)
        except FailedPrecondition:
            # A refused movement leaves every balance exactly as it was.
            after = {key: (b.on_hand, b.version) for key, b in ledger.balances.items()}
            assert {k: v for k, v in after.items() if v != (0, 0)} == {
                k: v for k, v in before.items() if v != (0, 0)
            }
            continue
        for posting in postings:
            sums[posting.stock] += posting.quantity_delta
            versions[posting.stock] += 1
            assert posting.on_hand_after == sums[posting.stock]
            assert posting.balance_version == versions[posting.stock]
    for key, balance in ledger.balances.items():
        assert balance.on_hand == sums[key] >= 0
        assert balance.version == versions[key]
    # Goods in transit are exactly what transfers sent and did not yet receive.
    in_transit = sum(
        b.on_hand for k, b in ledger.balances.items() if k.state is StockState.IN_TRANSIT
    )
    assert in_transit == sum(line.in_transit for line in ledger.transfers.values())
