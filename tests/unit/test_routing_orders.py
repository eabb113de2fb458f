"""Unit tests of routing's order model: validation, fulfilment facts, cancels, returns.

Pure: orders, allocations and locations are built by hand; no I/O. The network
uses real Dutch city centres; the distances (km) that matter below are:

    Utrecht-Tilburg 59.639   Utrecht-Eindhoven 76.141   Utrecht-Zwolle 80.991
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from omnistock.errors import FailedPrecondition, InvalidArgument
from services.routing.domain import (
    LIVE,
    MAX_QUANTITY,
    MAX_RULE_LOCATIONS,
    Allocation,
    AllocationStatus,
    Customer,
    Disposition,
    ItemCondition,
    LineInput,
    Order,
    OrderInput,
    OrderLine,
    OrderStatus,
    Quantity,
    ReturnedLine,
    ReturnInput,
    cancel_lines,
    cancellable_units,
    check_cancel,
    check_order,
    check_pickup_store,
    check_return_request,
    check_return_store,
    check_rules,
    dispose,
    match_return,
    nearest_centre,
    open_needs,
    open_units,
    record_collected,
    record_failure,
    record_hold_short,
    record_pickup_expired,
    record_return,
    record_shipped,
    settle,
    transferred_to_pickup,
)
from services.routing.planner import (
    FulfilmentType,
    GeoPoint,
    Location,
    Method,
    Need,
    Rules,
    SourceKind,
)

NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=5)

CITY: dict[str, GeoPoint] = {
    "amsterdam": GeoPoint(52.374, 4.890),
    "utrecht": GeoPoint(52.091, 5.122),
    "rotterdam": GeoPoint(51.922, 4.479),
    "eindhoven": GeoPoint(51.441, 5.470),
    "tilburg": GeoPoint(51.555, 5.091),
    "zwolle": GeoPoint(52.512, 6.094),
    "nieuwegein": GeoPoint(52.029, 5.081),
}

STORE, DC = SourceKind.STORE, SourceKind.DISTRIBUTION_CENTRE
SFS = FulfilmentType.SHIP_FROM_STORE
SFDC = FulfilmentType.SHIP_FROM_DISTRIBUTION_CENTRE
PICKUP = FulfilmentType.PICKUP_AT_STORE
TRANSFER = FulfilmentType.TRANSFER_TO_STORE
HELD = AllocationStatus.HELD
SHIPPED = AllocationStatus.SHIPPED
COLLECTED = AllocationStatus.COLLECTED
FAILED = AllocationStatus.FAILED
CANCELLED = AllocationStatus.CANCELLED
EXPIRED = AllocationStatus.EXPIRED


# -- builders ------------------------------------------------------------------------


def store(
    location_id: str,
    city: str,
    *,
    collect: bool = True,
    returns: bool = True,
    closed: bool = False,
) -> Location:
    """A store in ``city``; by default it ships, offers click-and-collect and takes returns."""
    return Location(
        location_id,
        STORE,
        f"Store {city.title()}",
        CITY[city],
        ship_from_store=True,
        click_and_collect=collect,
        accepts_returns=returns,
        closed=closed,
    )


def centre(location_id: str, city: str, *, returns: bool = True, closed: bool = False) -> Location:
    """A distribution centre in ``city``; by default it takes returns."""
    return Location(
        location_id, DC, f"DC {city.title()}", CITY[city], accepts_returns=returns, closed=closed
    )


def by_id(*locations: Location) -> dict[str, Location]:
    return {loc.location_id: loc for loc in locations}


def alloc(
    allocation_id: str,
    line_number: int,
    sku: str,
    location_id: str,
    quantity: int,
    type: FulfilmentType = SFS,
    *,
    pickup: str = "",
    reservation: str = "res-1",
    reservation_line: int = 1,
    status: AllocationStatus = HELD,
    fulfilled: int = 0,
) -> Allocation:
    return Allocation(
        allocation_id=allocation_id,
        line_number=line_number,
        sku=sku,
        location_id=location_id,
        quantity=quantity,
        type=type,
        pickup_location_id=pickup,
        reservation_id=reservation,
        reservation_line=reservation_line,
        status=status,
        plan_number=1,
        fulfilled=fulfilled,
    )


def order(
    lines: Sequence[tuple[str, int]],
    allocations: Sequence[Allocation] = (),
    *,
    method: Method = Method.SHIP_TO_HOME,
    pickup: str = "",
    status: OrderStatus = OrderStatus.ROUTED,
) -> Order:
    """An order of ``lines`` (sku, quantity), numbered from 1."""
    customer = (
        Customer(pickup_location_id=pickup)
        if method is Method.CLICK_AND_COLLECT
        else Customer(position=CITY["utrecht"], postcode="3511 AB", country="NL")
    )
    return Order(
        order_id="ord-1",
        channel="web",
        method=method,
        customer=customer,
        lines=tuple(OrderLine(n, sku, q) for n, (sku, q) in enumerate(lines, start=1)),
        status=status,
        plan_number=1,
        allocations=tuple(allocations),
        created_at=NOW,
        updated_at=NOW,
    )


def home_order() -> Order:
    """Ship to home: 2 of sku-a from the Amsterdam store, 1 of sku-b from the Tilburg DC."""
    return order(
        [("sku-a", 2), ("sku-b", 1)],
        [
            alloc("a1", 1, "sku-a", "s-ams", 2, SFS, reservation_line=1),
            alloc("a2", 2, "sku-b", "dc-til", 1, SFDC, reservation_line=2),
        ],
    )


def collect_order() -> Order:
    """Click-and-collect at Utrecht: 1 of sku-a off its shelf, 2 of sku-b transferred in."""
    return order(
        [("sku-a", 1), ("sku-b", 2)],
        [
            alloc("p1", 1, "sku-a", "s-utr", 1, PICKUP, pickup="s-utr", reservation_line=1),
            alloc("t1", 2, "sku-b", "dc-til", 2, TRANSFER, pickup="s-utr", reservation_line=2),
        ],
        method=Method.CLICK_AND_COLLECT,
        pickup="s-utr",
    )


def ids(prefix: str = "new") -> Iterator[str]:
    """Fresh allocation ids, as the consumers hand them out."""
    return (f"{prefix}-{i}" for i in itertools.count(1))


def allocation(o: Order, allocation_id: str) -> Allocation:
    found = [a for a in o.allocations if a.allocation_id == allocation_id]
    assert len(found) == 1, o.allocations
    return found[0]


def statuses(o: Order) -> dict[str, AllocationStatus]:
    return {a.allocation_id: a.status for a in o.allocations}


def fields(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def invalid(check: Callable[[], object]) -> InvalidArgument:
    """The InvalidArgument ``check()`` raises."""
    with pytest.raises(InvalidArgument) as info:
        check()
    return info.value


def precondition(check: Callable[[], object]) -> FailedPrecondition:
    """The FailedPrecondition ``check()`` raises."""
    with pytest.raises(FailedPrecondition) as info:
        check()
    return info.value


# -- returns: dispositions -------------------------------------------------------------

UTRECHT = store("s-utr", "utrecht")
TILBURG = centre("dc-til", "tilburg")
ZWOLLE = centre("dc-zwo", "zwolle")


def test_sellable_item_the_store_carries_is_restocked_there() -> None:
    disposition, destination, explanation = dispose(
        ItemCondition.SELLABLE, True, UTRECHT, by_id(UTRECHT, TILBURG, ZWOLLE)
    )
    assert (disposition, destination) == (Disposition.RESTOCK, "s-utr")
    assert "Store Utrecht" in explanation


def test_sellable_item_the_store_does_not_carry_goes_to_the_nearest_centre() -> None:
    # Tilburg is 60 km from Utrecht, Zwolle 81 km.
    disposition, destination, explanation = dispose(
        ItemCondition.SELLABLE, False, UTRECHT, by_id(UTRECHT, ZWOLLE, TILBURG)
    )
    assert (disposition, destination) == (Disposition.SEND_TO_DISTRIBUTION_CENTRE, "dc-til")
    assert "DC Tilburg" in explanation
    assert "60 km" in explanation


@pytest.mark.parametrize(
    "tilburg",
    [
        centre("dc-til", "tilburg", closed=True),
        centre("dc-til", "tilburg", returns=False),
    ],
    ids=["closed", "not-accepting-returns"],
)
def test_a_closed_or_non_returns_centre_is_skipped(tilburg: Location) -> None:
    locations = by_id(UTRECHT, tilburg, ZWOLLE)
    assert nearest_centre(UTRECHT, locations) == ZWOLLE
    disposition, destination, explanation = dispose(
        ItemCondition.SELLABLE, False, UTRECHT, locations
    )
    assert (disposition, destination) == (Disposition.SEND_TO_DISTRIBUTION_CENTRE, "dc-zwo")
    assert "DC Zwolle (81 km)" in explanation


def test_only_distribution_centres_take_returns_on() -> None:
    # A store next door that takes returns is no distribution centre.
    nieuwegein = store("s-nwg", "nieuwegein")
    assert nearest_centre(UTRECHT, by_id(UTRECHT, nieuwegein, ZWOLLE)) == ZWOLLE


def test_equally_near_centres_are_chosen_by_id() -> None:
    twin_b = centre("dc-b", "tilburg")
    twin_a = centre("dc-a", "tilburg")
    assert nearest_centre(UTRECHT, by_id(twin_b, twin_a)) == twin_a


def test_without_a_centre_an_uncarried_item_is_quarantined_with_a_reason() -> None:
    locations = by_id(UTRECHT, centre("dc-til", "tilburg", closed=True))
    assert nearest_centre(UTRECHT, locations) is None
    disposition, destination, explanation = dispose(
        ItemCondition.SELLABLE, False, UTRECHT, locations
    )
    assert (disposition, destination) == (Disposition.QUARANTINE, "s-utr")
    assert "no distribution centre" in explanation


@pytest.mark.parametrize("carried", [True, False])
@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (ItemCondition.DAMAGED, Disposition.WRITE_OFF),
        (ItemCondition.NEEDS_INSPECTION, Disposition.QUARANTINE),
    ],
)
def test_damaged_is_written_off_and_doubtful_is_quarantined_at_the_store(
    condition: ItemCondition, expected: Disposition, carried: bool
) -> None:
    disposition, destination, explanation = dispose(
        condition, carried, UTRECHT, by_id(UTRECHT, TILBURG)
    )
    assert (disposition, destination) == (expected, "s-utr")
    assert explanation


# -- returns: the store, the request, the order -----------------------------------------


def test_return_store_must_be_a_known_store_taking_returns() -> None:
    locations = by_id(UTRECHT, TILBURG, store("s-ams", "amsterdam", returns=False))
    assert check_return_store("s-utr", locations) == UTRECHT

    unknown = invalid(lambda: check_return_store("s-nope", locations))
    assert fields(unknown) == ["location_id"]
    assert "s-nope" in unknown.violations[0].description

    a_centre = invalid(lambda: check_return_store("dc-til", locations))
    assert fields(a_centre) == ["location_id"]
    assert "not a store" in a_centre.violations[0].description

    refused = precondition(lambda: check_return_store("s-ams", locations))
    assert refused.reason == "NOT_RETURNABLE"
    assert refused.metadata == {"location_id": "s-ams"}


def test_return_request_names_every_problem() -> None:
    error = invalid(
        lambda: check_return_request(
            "",
            "bad id!",
            "",
            [ReturnInput("", 0, None), ReturnInput("sku-a", 1, ItemCondition.SELLABLE)],
        )
    )
    assert fields(error) == [
        "return_id",
        "order_id",
        "location_id",
        "lines[0].sku",
        "lines[0].quantity",
        "lines[0].condition",
    ]
    assert fields(invalid(lambda: check_return_request("r-1", "ord-1", "s-utr", []))) == ["lines"]
    check_return_request("r-1", "ord-1", "s-utr", [ReturnInput("sku-a", 1, ItemCondition.DAMAGED)])


def delivered() -> Order:
    """sku-a: 3 ordered, 3 delivered, 1 returned already; sku-b: 2 ordered, 1 delivered."""
    o = order([("sku-a", 3), ("sku-b", 2)])
    return replace(
        o,
        lines=(
            replace(o.lines[0], fulfilled=3, returned=1),
            replace(o.lines[1], fulfilled=1),
        ),
    )


def test_a_returned_sku_must_be_on_the_order() -> None:
    error = invalid(
        lambda: match_return(
            delivered(),
            [
                ReturnInput("sku-a", 1, ItemCondition.SELLABLE),
                ReturnInput("sku-z", 1, ItemCondition.SELLABLE),
            ],
        )
    )
    assert fields(error) == ["lines[1].sku"]
    assert "sku-z" in error.violations[0].description


def test_no_more_returned_than_delivered_and_not_returned_yet() -> None:
    # 3 delivered, 1 returned: 2 may come back, in any number of return lines.
    lines = [
        ReturnInput("sku-a", 1, ItemCondition.SELLABLE),
        ReturnInput("sku-b", 1, ItemCondition.DAMAGED),
        ReturnInput("sku-a", 1, ItemCondition.NEEDS_INSPECTION),
    ]
    assert match_return(delivered(), lines) == [(1, lines[0]), (2, lines[1]), (1, lines[2])]

    too_many = [
        ReturnInput("sku-a", 2, ItemCondition.SELLABLE),
        ReturnInput("sku-a", 1, ItemCondition.DAMAGED),
    ]
    error = precondition(lambda: match_return(delivered(), too_many))
    assert error.reason == "NOT_RETURNABLE"
    assert error.metadata == {"sku": "sku-a", "returned": "3", "returnable": "2"}

    # sku-b: 2 ordered but only 1 delivered.
    undelivered = [ReturnInput("sku-b", 2, ItemCondition.SELLABLE)]
    error = precondition(lambda: match_return(delivered(), undelivered))
    assert error.metadata["returnable"] == "1"


def test_record_return_adds_the_returned_units_to_their_lines() -> None:
    def returned(line_number: int, sku: str, quantity: int) -> ReturnedLine:
        return ReturnedLine(
            line_number, sku, quantity, ItemCondition.SELLABLE, Disposition.RESTOCK, "s-utr", "", ""
        )

    before = delivered()
    after = record_return(before, [returned(1, "sku-a", 1), returned(1, "sku-a", 1)])
    assert [line.returned for line in after.lines] == [3, 0]
    assert [line.fulfilled for line in after.lines] == [3, 1]
    # Nothing more of sku-a may come back now.
    error = precondition(
        lambda: match_return(after, [ReturnInput("sku-a", 1, ItemCondition.SELLABLE)])
    )
    assert error.metadata["returnable"] == "0"
    assert before.lines[0].returned == 1  # the order is a value: the old one is untouched


# -- check_order ---------------------------------------------------------------------


def order_input(
    lines: Sequence[tuple[str, int]] = (("sku-a", 1),),
    *,
    method: Method | None = Method.SHIP_TO_HOME,
    customer: Customer | None = None,
    **options: object,
) -> OrderInput:
    if customer is None:
        customer = (
            Customer(pickup_location_id="s-utr")
            if method is Method.CLICK_AND_COLLECT
            else Customer(position=CITY["utrecht"], postcode="3511 AB", country="NL")
        )
    values: dict[str, object] = {"channel": "web", "order_id": "ord-1", **options}
    return OrderInput(
        method=method,
        customer=customer,
        lines=tuple(LineInput(sku, q) for sku, q in lines),
        **values,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("method", [Method.SHIP_TO_HOME, Method.CLICK_AND_COLLECT])
def test_a_valid_order_passes(method: Method) -> None:
    check_order(order_input([("sku-a", 1), ("sku-b", MAX_QUANTITY)], method=method), needs_id=True)
    check_order(order_input(method=method, cart_reservation_id="cart-7"), needs_id=True)


def test_every_problem_of_an_order_is_named_at_once() -> None:
    error = invalid(
        lambda: check_order(
            order_input(
                [("sku-a", 0), ("sku-b", MAX_QUANTITY + 1), ("sku-a", 2), ("bad sku", 1)],
                customer=Customer(position=None, postcode="35\n11", country="NLD"),
                order_id="",
                channel="-web",
                cart_reservation_id="cart 7",
            ),
            needs_id=True,
        )
    )
    assert fields(error) == [
        "order_id",
        "channel",
        "customer.position",
        "customer.postcode",
        "customer.country",
        "lines[0].quantity",
        "lines[1].quantity",
        "lines[2].sku",
        "lines[3].sku",
        "cart_reservation_id",
    ]
    descriptions = {v.field: v.description for v in error.violations}
    assert "at least 1" in descriptions["lines[0].quantity"]
    assert str(MAX_QUANTITY) in descriptions["lines[1].quantity"]
    assert "repeats lines[0]" in descriptions["lines[2].sku"]
    assert "malformed" in descriptions["lines[3].sku"]


def test_an_order_needs_lines_and_a_method() -> None:
    error = invalid(lambda: check_order(order_input([], method=None), needs_id=True))
    assert fields(error) == ["delivery_method", "lines"]


def test_the_order_id_is_checked_only_when_needed() -> None:
    check_order(order_input(order_id=""), needs_id=False)
    assert fields(invalid(lambda: check_order(order_input(order_id=""), needs_id=True))) == [
        "order_id"
    ]


@pytest.mark.parametrize(
    ("position", "words"),
    [
        (None, "needs the address's position"),
        (GeoPoint(0.0, 0.0), "0,0 is not an address"),
        (GeoPoint(91.0, 5.0), "within ±90"),
        (GeoPoint(52.0, -180.5), "within ±90"),
        (GeoPoint(float("nan"), 5.0), "within ±90"),
    ],
    ids=["missing", "null-island", "latitude", "longitude", "nan"],
)
def test_a_home_delivery_needs_a_real_position(position: GeoPoint | None, words: str) -> None:
    error = invalid(
        lambda: check_order(order_input(customer=Customer(position=position)), needs_id=True)
    )
    assert fields(error) == ["customer.position"]
    assert words in error.violations[0].description


def test_click_and_collect_needs_a_pickup_store_but_no_address() -> None:
    no_store = order_input(method=Method.CLICK_AND_COLLECT, customer=Customer())
    error = invalid(lambda: check_order(no_store, needs_id=True))
    assert fields(error) == ["customer.pickup_location_id"]


LOCATIONS = by_id(
    UTRECHT,
    TILBURG,
    store("s-ams", "amsterdam", collect=False),
    store("s-rot", "rotterdam", closed=True),
)


def test_pickup_store_must_be_a_store_offering_click_and_collect() -> None:
    def at(store_id: str) -> OrderInput:
        return order_input(
            method=Method.CLICK_AND_COLLECT, customer=Customer(pickup_location_id=store_id)
        )

    check_pickup_store(at("s-utr"), LOCATIONS)
    for store_id, words in [
        ("s-nope", "unknown location"),
        ("dc-til", "not a store"),
        ("s-ams", "does not offer click-and-collect"),
    ]:
        error = invalid(partial(check_pickup_store, at(store_id), LOCATIONS))
        assert fields(error) == ["customer.pickup_location_id"], store_id
        assert words in error.violations[0].description, store_id

    closed = precondition(lambda: check_pickup_store(at("s-rot"), LOCATIONS))
    assert closed.reason == "LOCATION_CLOSED"
    assert closed.metadata == {"location_id": "s-rot"}


def test_home_delivery_has_no_pickup_store_to_check() -> None:
    check_pickup_store(order_input(), {})


# -- check_rules ---------------------------------------------------------------------

MONEY = [
    "shipment_cost_cents",
    "cost_per_km_cents",
    "store_handling_cents",
    "distribution_centre_handling_cents",
    "transfer_cost_cents",
    "priority_step_cents",
]
DISTANCES_AND_TIMES = [
    "max_ship_from_store_km",
    "distribution_centre_delivery_days",
    "store_delivery_days",
    "transfer_days",
    "pickup_ready_hours",
    "nearby_store_km",
]
BOUNDS = (
    [(name, 0, 1_000_000) for name in MONEY]
    + [(name, 0, 10_000) for name in DISTANCES_AND_TIMES]
    + [("split_margin_percent", 0, 100), ("max_replans", 0, 10)]
)


def rules_with(name: str, value: int) -> Rules:
    """The default rules with one figure changed."""
    changes: dict[str, Any] = {name: value}
    return replace(Rules(), **changes)


def test_default_rules_pass() -> None:
    check_rules(Rules(), [])


@pytest.mark.parametrize(("name", "low", "high"), BOUNDS)
def test_each_rule_is_kept_within_its_range(name: str, low: int, high: int) -> None:
    check_rules(rules_with(name, low), [])
    check_rules(rules_with(name, high), [])
    for bad in (low - 1, high + 1):
        error = invalid(partial(check_rules, rules_with(name, bad), []))
        assert fields(error) == [f"rules.{name}"], bad


@pytest.mark.parametrize("zone", ["", "Europe/Atlantis", "Europe", "utc", "x" * 65])
def test_a_bad_time_zone_is_named(zone: str) -> None:
    error = invalid(lambda: check_rules(Rules(time_zone=zone), []))
    assert fields(error) == ["rules.time_zone"]


def test_every_rule_problem_is_named_with_the_unknown_locations() -> None:
    rules = Rules(
        shipment_cost_cents=-1,
        split_margin_percent=101,
        transfer_days=10_001,
        max_replans=11,
        time_zone="Mars/Olympus_Mons",
        excluded_location_ids=frozenset({"s-ghost", "s-utr"}),
        priorities={"s-phantom": 2, "dc-til": 1},
    )
    error = invalid(lambda: check_rules(rules, ["s-utr", "dc-til"]))
    assert fields(error) == [
        "rules.shipment_cost_cents",
        "rules.split_margin_percent",
        "rules.transfer_days",
        "rules.max_replans",
        "rules.time_zone",
        "rules",
        "rules",
    ]
    unknown = [v.description for v in error.violations if v.field == "rules"]
    assert unknown == ["unknown location 's-ghost'", "unknown location 's-phantom'"]
    check_rules(
        Rules(excluded_location_ids=frozenset({"s-utr"}), priorities={"dc-til": 3}),
        ["s-utr", "dc-til"],
    )


def test_rules_name_a_bounded_number_of_locations() -> None:
    many = [f"s-{i}" for i in range(MAX_RULE_LOCATIONS + 1)]
    error = invalid(lambda: check_rules(Rules(excluded_location_ids=frozenset(many)), many))
    assert fields(error) == ["rules"]
    assert str(MAX_RULE_LOCATIONS) in error.violations[0].description


# -- the order lifecycle: shipped and collected ----------------------------------------


def test_a_fully_held_order_needs_nothing_and_is_routed() -> None:
    for o in (home_order(), collect_order()):
        assert open_needs(o) == ()
        settled = settle(o, LATER)
        assert settled.status is OrderStatus.ROUTED
        assert settled.updated_at == LATER


def test_shipping_from_the_source_fulfils_the_line() -> None:
    o = record_shipped(home_order(), "s-ams", [Quantity("sku-a", 2)])
    assert statuses(o) == {"a1": SHIPPED, "a2": HELD}
    assert allocation(o, "a1").fulfilled == 2
    assert [line.fulfilled for line in o.lines] == [2, 0]
    assert settle(o, LATER).status is OrderStatus.ROUTED  # the DC still has work

    o = record_shipped(o, "dc-til", [Quantity("sku-b", 1)])
    assert statuses(o) == {"a1": SHIPPED, "a2": SHIPPED}
    assert [line.fulfilled for line in o.lines] == [2, 1]
    assert settle(o, LATER).status is OrderStatus.FULFILLED


def test_a_partial_shipment_keeps_the_rest_held() -> None:
    o = record_shipped(home_order(), "s-ams", [Quantity("sku-a", 1)])
    assert allocation(o, "a1").status is HELD
    assert allocation(o, "a1").fulfilled == 1
    assert o.line(1).fulfilled == 1
    o = record_shipped(o, "s-ams", [Quantity("sku-a", 5)])  # more than held: the rest is ignored
    assert allocation(o, "a1").status is SHIPPED
    assert allocation(o, "a1").fulfilled == 2
    assert o.line(1).fulfilled == 2


def test_a_shipment_elsewhere_or_of_another_sku_changes_nothing() -> None:
    o = home_order()
    assert record_shipped(o, "s-rot", [Quantity("sku-a", 2)]) == o
    assert record_shipped(o, "s-ams", [Quantity("sku-b", 1)]) == o


def test_a_transfer_shipped_is_not_yet_fulfilled_to_the_customer() -> None:
    o = record_shipped(collect_order(), "dc-til", [Quantity("sku-b", 2)])
    assert statuses(o) == {"p1": HELD, "t1": SHIPPED}
    assert [line.fulfilled for line in o.lines] == [0, 0]
    # A shipment event at the pickup store does not end the pickup: collection does.
    assert record_shipped(o, "s-utr", [Quantity("sku-a", 1)]) == o

    o = record_collected(o, "s-utr", [Quantity("sku-a", 1)])
    assert statuses(o) == {"p1": COLLECTED, "t1": SHIPPED}
    # Only the transfer is underway: still routed, not fulfilled.
    assert open_needs(o) == ()
    assert settle(o, LATER).status is OrderStatus.ROUTED


def test_collecting_at_the_pickup_store_ends_pickups_and_transfers() -> None:
    o = record_shipped(collect_order(), "dc-til", [Quantity("sku-b", 2)])
    o = record_collected(o, "s-utr", [Quantity("sku-a", 1), Quantity("sku-b", 2)])
    assert statuses(o) == {"p1": COLLECTED, "t1": COLLECTED}
    assert [a.fulfilled for a in o.allocations] == [1, 2]
    assert [line.fulfilled for line in o.lines] == [1, 2]
    assert settle(o, LATER).status is OrderStatus.FULFILLED


def test_collecting_at_another_store_changes_nothing() -> None:
    o = collect_order()
    assert record_collected(o, "s-ams", [Quantity("sku-a", 1), Quantity("sku-b", 2)]) == o


def test_settle_works_the_status_out() -> None:
    held = replace(home_order(), attention_reason="was short before")
    assert settle(held, LATER).status is OrderStatus.ROUTED
    assert settle(held, LATER).attention_reason == ""

    # Units no allocation answers for: a person must decide; the reason stays.
    short = replace(held, allocations=held.allocations[:1])
    assert open_needs(short) == (Need(2, "sku-b", 1),)
    settled = settle(short, LATER)
    assert settled.status is OrderStatus.NEEDS_ATTENTION
    assert settled.attention_reason == "was short before"

    # Every line cancelled.
    everything, _ = cancel_lines(held, [1, 2], ids("cancel"))
    assert settle(everything, LATER).status is OrderStatus.CANCELLED

    # One line shipped, the other cancelled: done.
    o = record_shipped(held, "s-ams", [Quantity("sku-a", 2)])
    o, _ = cancel_lines(o, [2], ids("cancel"))
    assert settle(o, LATER).status is OrderStatus.FULFILLED


# -- failures --------------------------------------------------------------------------


def two_sources() -> Order:
    """3 of sku-a and 1 of sku-b at Amsterdam, 2 of sku-c at Rotterdam."""
    return order(
        [("sku-a", 3), ("sku-b", 1), ("sku-c", 2)],
        [
            alloc("a1", 1, "sku-a", "s-ams", 3, reservation_line=1),
            alloc("a2", 2, "sku-b", "s-ams", 1, reservation_line=2),
            alloc("a3", 3, "sku-c", "s-rot", 2, reservation_line=3),
        ],
    )


def test_a_rejection_fails_all_open_work_at_the_source() -> None:
    o = record_failure(two_sources(), "s-ams", None, ids())
    assert statuses(o) == {"a1": FAILED, "a2": FAILED, "a3": HELD}
    assert o.failed == ("s-ams",)
    assert open_needs(o) == (Need(1, "sku-a", 3), Need(2, "sku-b", 1))
    assert settle(o, LATER).status is OrderStatus.NEEDS_ATTENTION

    # The source is listed once, however often it fails.
    again = record_failure(
        replace(o, allocations=(*o.allocations, alloc("a4", 1, "sku-a", "s-ams", 3))),
        "s-ams",
        None,
        ids(),
    )
    assert again.failed == ("s-ams",)
    assert allocation(again, "a4").status is FAILED


def test_a_rejection_leaves_shipped_work_alone() -> None:
    o = record_shipped(two_sources(), "s-ams", [Quantity("sku-b", 1)])
    o = record_failure(o, "s-ams", None, ids())
    assert statuses(o) == {"a1": FAILED, "a2": SHIPPED, "a3": HELD}
    assert open_needs(o) == (Need(1, "sku-a", 3),)


def test_a_short_pick_splits_the_allocation() -> None:
    o = record_failure(two_sources(), "s-ams", [Quantity("sku-a", 1)], ids())
    kept, missing = allocation(o, "a1"), allocation(o, "new-1")
    assert (kept.status, kept.quantity) == (HELD, 2)
    assert (missing.status, missing.quantity) == (FAILED, 1)
    assert (missing.reservation_id, missing.reservation_line) == ("res-1", 1)
    assert (missing.line_number, missing.sku, missing.location_id) == (1, "sku-a", "s-ams")
    assert missing.type is kept.type
    assert allocation(o, "a2").status is HELD  # the other sku there was picked
    assert o.failed == ("s-ams",)
    assert open_needs(o) == (Need(1, "sku-a", 1),)


def test_a_short_pick_of_everything_fails_the_allocation_whole() -> None:
    o = record_failure(two_sources(), "s-ams", [Quantity("sku-a", 3)], ids())
    assert statuses(o) == {"a1": FAILED, "a2": HELD, "a3": HELD}
    assert open_needs(o) == (Need(1, "sku-a", 3),)


def test_a_failure_that_touches_nothing_leaves_the_order_as_it_was() -> None:
    o = two_sources()
    assert record_failure(o, "s-nowhere", None, ids()) is o
    assert record_failure(o, "s-ams", [Quantity("sku-c", 1)], ids()) is o
    shipped = record_shipped(o, "s-rot", [Quantity("sku-c", 2)])
    assert record_failure(shipped, "s-rot", None, ids()) is shipped


def test_a_whole_failure_after_a_partial_shipment_reopens_only_unshipped_units() -> None:
    # 1 of 3 left Amsterdam; then the rest of the task is rejected. The unit on
    # its way is delivered work: routing it again would send it twice.
    o = record_shipped(two_sources(), "s-ams", [Quantity("sku-a", 1)])
    o = record_failure(o, "s-ams", None, ids())
    assert o.line(1).fulfilled == 1
    assert open_units(o, 1) == 2


def test_a_short_pick_of_the_rest_after_a_partial_shipment_leaves_nothing_held() -> None:
    # 1 of 3 shipped, the other 2 are missing: the allocation has nothing left to
    # do, so it must not stay HELD (the order would stay ROUTED for ever).
    o = record_shipped(two_sources(), "s-ams", [Quantity("sku-a", 1)])
    o = record_failure(o, "s-ams", [Quantity("sku-a", 2)], ids())
    assert all(a.fulfilled < a.quantity for a in o.held()), o.held()
    assert open_units(o, 1) == 2


def test_an_expired_pickup_ends_without_a_reroute() -> None:
    o = record_shipped(collect_order(), "dc-til", [Quantity("sku-b", 2)])
    o = record_pickup_expired(o, "s-utr")
    assert statuses(o) == {"p1": EXPIRED, "t1": EXPIRED}
    assert open_needs(o) == ()
    assert o.failed == ()
    assert settle(o, LATER).status is not OrderStatus.NEEDS_ATTENTION
    assert record_pickup_expired(o, "s-ams") == o


def test_collected_allocations_do_not_expire() -> None:
    o = record_collected(collect_order(), "s-utr", [Quantity("sku-a", 1)])
    o = record_pickup_expired(o, "s-utr")
    assert statuses(o) == {"p1": COLLECTED, "t1": EXPIRED}


def test_a_short_hold_fails_its_allocations_at_their_sources() -> None:
    o = replace(
        two_sources(),
        allocations=(
            *two_sources().allocations,
            alloc(
                "a5", 3, "sku-c", "s-ams", 2, reservation="res-2", reservation_line=3, status=FAILED
            ),
        ),
    )
    o, sources = record_hold_short(o, "res-1", [1, 3], ids())
    assert sources == ["s-ams", "s-rot"]
    assert statuses(o) == {"a1": FAILED, "a2": HELD, "a3": FAILED, "a5": FAILED}
    assert set(o.failed) == {"s-ams", "s-rot"}
    assert open_needs(o) == (Need(1, "sku-a", 3), Need(3, "sku-c", 2))


def test_a_short_hold_on_another_reservation_changes_nothing() -> None:
    o = two_sources()
    after, sources = record_hold_short(o, "res-9", [1, 2, 3], ids())
    assert (after, sources) == (o, [])


def test_a_short_hold_fails_the_allocation_on_that_reservation_line() -> None:
    # The order's cart held 2 of sku-a at Amsterdam and routing held 1 more
    # there: one line, one source, two reservations. Only the new hold falls short.
    o = order(
        [("sku-a", 3)],
        [
            alloc("cart", 1, "sku-a", "s-ams", 2, reservation="cart-1", reservation_line=1),
            alloc("hold", 1, "sku-a", "s-ams", 1, reservation="res-1", reservation_line=1),
        ],
    )
    o, sources = record_hold_short(o, "res-1", [1], ids())
    assert sources == ["s-ams"]
    assert statuses(o) == {"cart": HELD, "hold": FAILED}
    assert allocation(o, "cart").quantity == 2


# -- cancels -------------------------------------------------------------------------


def test_a_cancel_takes_what_has_not_left() -> None:
    # Line 1: 3 of sku-a, 2 held at Amsterdam and 1 never sourced.
    # Line 2: 1 of sku-b, held at Amsterdam.   Line 3: 2 of sku-c, shipped from Rotterdam.
    o = two_sources()
    o = replace(o, allocations=(replace(o.allocations[0], quantity=2), *o.allocations[1:]))
    o = record_shipped(o, "s-rot", [Quantity("sku-c", 2)])
    assert [cancellable_units(o, n) for n in (1, 2, 3)] == [3, 1, 0]

    assert check_cancel(o, [], "CUSTOMER_REQUEST") == [1, 2]
    assert check_cancel(o, [3, 1, 1], "CUSTOMER_REQUEST") == [1]
    o, gone = cancel_lines(o, [1, 2, 3], ids("cancel"))
    assert [a.allocation_id for a in gone] == ["a1", "a2"]
    assert all(a.status is CANCELLED for a in gone)
    assert statuses(o) == {"a1": CANCELLED, "a2": CANCELLED, "a3": SHIPPED}
    assert [line.cancelled for line in o.lines] == [3, 1, 0]
    assert [line.fulfilled for line in o.lines] == [0, 0, 2]
    assert open_needs(o) == ()
    assert settle(o, LATER).status is OrderStatus.FULFILLED


def test_nothing_left_to_cancel_is_refused() -> None:
    o = record_shipped(home_order(), "s-ams", [Quantity("sku-a", 2)])
    o = record_shipped(o, "dc-til", [Quantity("sku-b", 1)])
    error = precondition(lambda: check_cancel(o, [], "CUSTOMER_REQUEST"))
    assert error.reason == "ORDER_ENDED"
    assert error.metadata == {"order_id": "ord-1"}

    partly = record_shipped(home_order(), "s-ams", [Quantity("sku-a", 2)])
    assert precondition(lambda: check_cancel(partly, [1], "CUSTOMER_REQUEST")).reason == (
        "ORDER_ENDED"
    )
    assert check_cancel(partly, [1, 2], "CUSTOMER_REQUEST") == [2]


def test_a_cancel_names_unknown_lines_and_a_missing_reason() -> None:
    error = invalid(lambda: check_cancel(home_order(), [1, 7], ""))
    assert fields(error) == ["reason_code", "line_numbers[1]"]
    assert "no line 7" in error.violations[1].description
    assert fields(invalid(lambda: check_cancel(home_order(), [1], "customer request"))) == [
        "reason_code"
    ]


def test_a_cancel_after_a_partial_shipment_keeps_the_shipped_units() -> None:
    # 1 of 3 left Amsterdam: only the 2 still there can be cancelled.
    o = record_shipped(two_sources(), "s-ams", [Quantity("sku-a", 1)])
    assert cancellable_units(o, 1) == 2
    o, _ = cancel_lines(o, [1], ids("cancel"))
    assert o.line(1).cancelled == 2
    assert o.line(1).fulfilled == 1


# -- a property: the units of every line add up --------------------------------------

PROPERTY_SKUS = ("sku-a", "sku-b", "sku-c")
SOURCES = ("s-ams", "s-rot", "dc-til")
PICKUP_STORE = "s-utr"


@st.composite
def orders_with_allocations(draw: st.DrawFn) -> Order:
    """1-3 lines, each partly or wholly held in pieces at various sources."""
    n_lines = draw(st.integers(1, 3))
    quantities = [draw(st.integers(1, 6)) for _ in range(n_lines)]
    allocations: list[Allocation] = []
    counter = itertools.count(1)
    for n, quantity in enumerate(quantities, start=1):
        left = draw(st.integers(0, quantity))  # units to allocate
        while left:
            part = left if draw(st.booleans()) else draw(st.integers(1, left))
            left -= part
            type_ = draw(st.sampled_from([SFS, SFDC, PICKUP, TRANSFER]))
            source = PICKUP_STORE if type_ is PICKUP else draw(st.sampled_from(SOURCES))
            number = next(counter)
            allocations.append(
                alloc(
                    f"a{number}",
                    n,
                    PROPERTY_SKUS[n - 1],
                    source,
                    part,
                    type_,
                    pickup=PICKUP_STORE if type_ in (PICKUP, TRANSFER) else "",
                    reservation=draw(st.sampled_from(["res-1", "res-2"])),
                    reservation_line=number,
                )
            )
    return order(
        [(PROPERTY_SKUS[n - 1], q) for n, q in enumerate(quantities, start=1)], allocations
    )


# A fact names an allocation by index (taken modulo the allocations there are) and
# is applied at its source, for its SKU or its reservation line.
PICK = st.integers(0, 50)
UNITS = st.integers(1, 2)
SHIP = st.tuples(st.just("ship"), PICK, UNITS)
CANCEL = st.tuples(st.just("cancel"), st.lists(st.integers(1, 3), max_size=3))
FACTS = st.one_of(
    SHIP,
    SHIP,
    CANCEL,
    st.tuples(st.just("collect"), PICK, UNITS),
    st.tuples(st.just("reject"), PICK),
    st.tuples(st.just("short"), PICK, UNITS),
    st.tuples(st.just("hold_short"), PICK),
    st.tuples(st.just("expire"), st.just(0)),
)


def apply(o: Order, fact: tuple[object, ...], new_ids: Iterator[str]) -> Order:
    """One fact, as the consumers and CancelOrder apply it."""
    kind, target, *rest = fact
    units = rest[0] if rest else 0
    assert isinstance(units, int)
    if kind == "cancel":
        assert isinstance(target, list)
        numbers = [n for n in target if n <= len(o.lines)]
        try:
            chosen = check_cancel(o, numbers, "CUSTOMER_REQUEST")
        except FailedPrecondition:
            return o
        return cancel_lines(o, chosen, ids("cancel"))[0]
    if kind == "expire":
        return record_pickup_expired(o, PICKUP_STORE)
    if not o.allocations:
        return o
    assert isinstance(target, int)
    a = o.allocations[target % len(o.allocations)]
    if kind == "ship":
        return record_shipped(o, a.location_id, [Quantity(a.sku, units)])
    if kind == "collect":
        return record_collected(o, PICKUP_STORE, [Quantity(a.sku, units)])
    if kind == "reject":
        return record_failure(o, a.location_id, None, new_ids)
    if kind == "short":
        return record_failure(o, a.location_id, [Quantity(a.sku, units)], new_ids)
    assert kind == "hold_short"
    return record_hold_short(o, a.reservation_id, [a.reservation_line], new_ids)[0]


CANCEL_ALL: tuple[object, ...] = ("cancel", [])


def assert_units_add_up(o: Order) -> None:
    assert len({a.allocation_id for a in o.allocations}) == len(o.allocations)
    for line in o.lines:
        mine = [a for a in o.allocations if a.line_number == line.line_number]
        live = sum(a.quantity for a in mine if a.status in LIVE)
        assert line.cancelled + live + open_units(o, line.line_number) == line.quantity, line
        assert 0 <= line.fulfilled <= line.quantity - line.cancelled, line
    for a in o.allocations:
        assert 0 <= a.fulfilled <= a.quantity, a
        assert a.quantity > 0, a


@settings(max_examples=600, deadline=None)
@given(orders_with_allocations(), st.lists(FACTS, max_size=10))
# Always tried: 1 of 3 ships, then the line is cancelled; and 1 of 3 ships, the
# source fails, and the line is cancelled.
@example(order([("sku-a", 3)], [alloc("a1", 1, "sku-a", "s-ams", 3)]), [("ship", 0, 1), CANCEL_ALL])
@example(
    order([("sku-a", 3)], [alloc("a1", 1, "sku-a", "s-ams", 3)]),
    [("ship", 0, 1), ("reject", 0), CANCEL_ALL],
)
def test_the_units_of_every_line_add_up_whatever_happens(
    start: Order, facts: list[tuple[object, ...]]
) -> None:
    new_ids = ids()
    o = start
    assert_units_add_up(o)
    for fact in facts:
        o = apply(o, fact, new_ids)
        assert_units_add_up(o)


def test_units_on_a_transfer_are_counted_at_the_pickup_store_until_collected() -> None:
    placed = collect_order()
    assert transferred_to_pickup(placed) == {}  # nothing left the DC yet
    shipped = record_shipped(placed, "dc-til", [Quantity("sku-b", 2)])
    assert transferred_to_pickup(shipped) == {("sku-b", "s-utr"): 2}
    collected = record_collected(shipped, "s-utr", [Quantity("sku-a", 1), Quantity("sku-b", 2)])
    assert transferred_to_pickup(collected) == {}
    expired = record_pickup_expired(shipped, "s-utr")
    assert transferred_to_pickup(expired) == {}


def test_lines_travelling_in_one_transfer_are_cancelled_together_or_not_at_all() -> None:
    two_in_one = order(
        [("sku-a", 1), ("sku-b", 2)],
        [
            alloc("t1", 1, "sku-a", "dc-til", 1, TRANSFER, pickup="s-utr", reservation_line=1),
            alloc("t2", 2, "sku-b", "dc-til", 2, TRANSFER, pickup="s-utr", reservation_line=2),
        ],
        method=Method.CLICK_AND_COLLECT,
        pickup="s-utr",
    )
    on_its_way = record_shipped(two_in_one, "dc-til", [Quantity("sku-a", 1), Quantity("sku-b", 2)])
    refused = precondition(lambda: check_cancel(on_its_way, [1], "CHANGED_MIND"))
    assert refused.reason == "TRANSFER_ON_ITS_WAY"
    assert check_cancel(on_its_way, [], "CHANGED_MIND") == [1, 2]
    after, gone = cancel_lines(on_its_way, [1, 2], ids())
    assert {a.allocation_id for a in gone} == {"t1", "t2"}
    assert settle(after, NOW).status is OrderStatus.CANCELLED
    # Before the transfer leaves, one line may go alone.
    assert check_cancel(two_in_one, [1], "CHANGED_MIND") == [1]
