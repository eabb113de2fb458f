"""Unit tests of the sourcing planner: small hand-made Dutch networks, no I/O.

Every figure a test expects is worked out by hand from the cost model in
``Rules``: a shipment costs its fixed part (``shipment_cost_cents``, or
``transfer_cost_cents`` for a transfer to a pickup store), plus handling by the
source's kind, plus ``round(km * cost_per_km_cents)`` over the great-circle
distance. The distances (km) between the city centres used below are:

    Amsterdam-Utrecht 35.212     Rotterdam-Utrecht 47.856   Rotterdam-Den Haag 21.148
    Eindhoven-Utrecht 76.141     Groningen-Utrecht 158.840  Maastricht-Utrecht 143.686
    Den Haag-Utrecht 56.189      Tilburg-Utrecht 59.639     Amsterdam-Rotterdam 57.554
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnistock.geo import haversine_km
from services.routing.planner import (
    Candidate,
    FulfilmentType,
    GeoPoint,
    Location,
    Method,
    Need,
    Network,
    Outcome,
    Plan,
    PlannedLine,
    Problem,
    Rules,
    Shipment,
    SourceKind,
    Suggestion,
    Verdict,
    plan,
    solve,
)

NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)

CITY: dict[str, GeoPoint] = {
    "amsterdam": GeoPoint(52.374, 4.890),
    "utrecht": GeoPoint(52.091, 5.122),
    "rotterdam": GeoPoint(51.922, 4.479),
    "den-haag": GeoPoint(52.077, 4.300),
    "eindhoven": GeoPoint(51.441, 5.470),
    "groningen": GeoPoint(53.219, 6.567),
    "tilburg": GeoPoint(51.555, 5.091),
    "maastricht": GeoPoint(50.848, 5.689),
}

STORE, DC = SourceKind.STORE, SourceKind.DISTRIBUTION_CENTRE


# -- builders ------------------------------------------------------------------------


def store(
    location_id: str,
    city: str,
    *,
    ship: bool = True,
    collect: bool = False,
    capacity: int = 0,
    closed: bool = False,
) -> Location:
    """A store in ``city``; by default it ships to customers."""
    return Location(
        location_id,
        STORE,
        f"Store {location_id}",
        CITY[city],
        ship_from_store=ship,
        click_and_collect=collect,
        daily_capacity=capacity,
        closed=closed,
    )


def centre(location_id: str, city: str, *, capacity: int = 0) -> Location:
    """A distribution centre in ``city``."""
    return Location(location_id, DC, f"DC {location_id}", CITY[city], daily_capacity=capacity)


def network(
    locations: Iterable[Location],
    stock: Mapping[tuple[str, str], int],
    *,
    sellable: Iterable[str] | None = None,
    capacity_left: Mapping[str, int] | None = None,
    failed: Iterable[str] = (),
) -> Network:
    """A network of ``locations``; every one sellable unless told otherwise."""
    by_id = {loc.location_id: loc for loc in locations}
    return Network(
        locations=by_id,
        available=dict(stock),
        sellable=frozenset(by_id if sellable is None else sellable),
        capacity_left=dict(capacity_left or {}),
        failed=frozenset(failed),
    )


def home(*needs: tuple[str, int], to: str = "utrecht", **options: object) -> Problem:
    """A home delivery of ``needs`` (sku, quantity), lines numbered from 1."""
    return Problem(
        channel="web",
        method=Method.SHIP_TO_HOME,
        needs=tuple(Need(n, sku, q) for n, (sku, q) in enumerate(needs, start=1)),
        now=NOW,
        destination=CITY[to],
        **options,  # type: ignore[arg-type]
    )


def pickup(*needs: tuple[str, int], at: str, **options: object) -> Problem:
    """A click-and-collect order of ``needs`` at the store ``at``."""
    return Problem(
        channel="web",
        method=Method.CLICK_AND_COLLECT,
        needs=tuple(Need(n, sku, q) for n, (sku, q) in enumerate(needs, start=1)),
        now=NOW,
        pickup_location_id=at,
        **options,  # type: ignore[arg-type]
    )


def verdict(result: Plan, location_id: str) -> Verdict:
    """The verdict on one location; each location has exactly one."""
    found = [v for v in result.verdicts if v.location_id == location_id]
    assert len(found) == 1, result.verdicts
    return found[0]


def outcomes(result: Plan) -> dict[str, Outcome]:
    """Location id → outcome, for every verdict of the plan."""
    return {v.location_id: v.outcome for v in result.verdicts}


def assigned(result: Plan) -> Counter[tuple[str, str]]:
    """Units the plan takes per (sku, source location)."""
    units: Counter[tuple[str, str]] = Counter()
    for shipment in result.shipments:
        for line in shipment.lines:
            units[line.sku, shipment.source_id] += line.quantity
    return units


def per_line(result: Plan) -> Counter[int]:
    """Units the plan sources per order line."""
    units: Counter[int] = Counter()
    for shipment in result.shipments:
        for line in shipment.lines:
            units[line.line_number] += line.quantity
    return units


# -- geometry ------------------------------------------------------------------------


def test_haversine_matches_known_distances() -> None:
    # Amsterdam-Utrecht is about 35 km as the crow flies, Groningen-Maastricht
    # about 270 km; the distance is symmetric and zero to oneself.
    ams, utr = CITY["amsterdam"], CITY["utrecht"]
    assert haversine_km(ams, utr) == pytest.approx(35.0, abs=1.0)
    assert haversine_km(CITY["groningen"], CITY["maastricht"]) == pytest.approx(270.0, abs=3.0)
    assert haversine_km(utr, ams) == pytest.approx(haversine_km(ams, utr), abs=1e-9)
    assert haversine_km(utr, utr) == 0.0


def test_haversine_agrees_with_the_spherical_law_of_cosines() -> None:
    # An independent formula on the same sphere gives the same figures.
    radius = 6371.0088
    for a, b in itertools.combinations(CITY.values(), 2):
        lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
        dlon = math.radians(b.longitude - a.longitude)
        cosine = math.sin(lat1) * math.sin(lat2) + math.cos(lat1) * math.cos(lat2) * math.cos(dlon)
        assert haversine_km(a, b) == pytest.approx(radius * math.acos(cosine), abs=1e-3)


# -- home delivery: cost and the nearest source ------------------------------------


def three_stores_and_a_centre() -> list[Location]:
    return [
        store("s-ams", "amsterdam"),
        store("s-rot", "rotterdam"),
        store("s-ein", "eindhoven"),
        centre("dc-gro", "groningen"),
    ]


def stock_everywhere(
    sku: str, locations: Iterable[Location], units: int = 5
) -> dict[tuple[str, str], int]:
    return {(sku, loc.location_id): units for loc in locations}


def test_the_nearest_store_wins_a_home_delivery_and_the_others_cost_more() -> None:
    locations = three_stores_and_a_centre()
    result = plan(
        home(("SKU-1", 2)), network(locations, stock_everywhere("SKU-1", locations)), Rules()
    )

    # Amsterdam store → Utrecht: 495 + 250 + round(35.212 * 2) = 495 + 250 + 70 = 815.
    assert result.shipments == (
        Shipment(
            "s-ams",
            STORE,
            FulfilmentType.SHIP_FROM_STORE,
            (PlannedLine(1, "SKU-1", 2),),
            35.2,
            815,
            NOW + timedelta(days=1),
        ),
    )
    assert result.total_cost_cents == 815
    assert result.estimated_at == NOW + timedelta(days=1)
    assert result.unsourced == ()
    assert result.suggestions == ()
    assert result.exhaustive

    chosen = verdict(result, "s-ams")
    assert (chosen.outcome, chosen.cost_cents, chosen.extra_cost_cents) == (Outcome.CHOSEN, 815, 0)
    assert chosen.distance_km == 35.2
    # Rotterdam store: 495 + 250 + round(47.856 * 2) = 841, i.e. 26 more.
    # Eindhoven store: 495 + 250 + round(76.141 * 2) = 897, i.e. 82 more.
    # Groningen DC: 495 + 100 + round(158.840 * 2) = 913, i.e. 98 more.
    expected = {"s-rot": (841, 26, 47.9), "dc-gro": (913, 98, 158.8), "s-ein": (897, 82, 76.1)}
    for location_id, (cost, extra, km) in expected.items():
        v = verdict(result, location_id)
        assert v.outcome is Outcome.MORE_EXPENSIVE, v
        assert (v.cost_cents, v.extra_cost_cents, v.distance_km) == (cost, extra, km), v
    # Verdicts run chosen first, then by extra cost.
    assert [v.location_id for v in result.verdicts] == ["s-ams", "s-rot", "s-ein", "dc-gro"]


def test_a_nearby_centre_beats_a_store_at_the_same_distance_through_cheaper_handling() -> None:
    # Both in Amsterdam: the store costs 495 + 250 + 70 = 815, the DC 495 + 100 + 70 = 665.
    locations = [store("s-ams", "amsterdam"), centre("dc-ams", "amsterdam")]
    result = plan(
        home(("SKU-1", 1)), network(locations, stock_everywhere("SKU-1", locations)), Rules()
    )
    assert result.sources == ["dc-ams"]
    assert result.shipments[0].type is FulfilmentType.SHIP_FROM_DISTRIBUTION_CENTRE
    assert result.shipments[0].cost_cents == 665
    assert verdict(result, "s-ams").extra_cost_cents == 815 - 665


def test_a_full_location_gives_way_to_the_next_best() -> None:
    locations = [
        store("s-ams", "amsterdam", capacity=20),
        store("s-rot", "rotterdam"),
        store("s-ein", "eindhoven"),
    ]
    stock = stock_everywhere("SKU-1", locations)
    result = plan(
        home(("SKU-1", 1)), network(locations, stock, capacity_left={"s-ams": 0}), Rules()
    )

    assert result.sources == ["s-rot"]
    assert result.total_cost_cents == 841
    full = verdict(result, "s-ams")
    assert (full.outcome, full.cost_cents, full.extra_cost_cents) == (Outcome.OVER_CAPACITY, 815, 0)
    assert "20 orders" in full.explanation
    # Eindhoven (897) now compares with Rotterdam (841).
    assert verdict(result, "s-ein").extra_cost_cents == 897 - 841


def test_capacity_only_limits_locations_with_a_daily_capacity() -> None:
    # daily_capacity 0 is "no limit", whatever capacity_left says; a limited
    # location with capacity left (or none recorded yet) is still a source.
    locations = [store("s-ams", "amsterdam"), store("s-rot", "rotterdam", capacity=5)]
    stock = stock_everywhere("SKU-1", locations)
    net = network(locations, stock, capacity_left={"s-ams": 0, "s-rot": 1})
    assert plan(home(("SKU-1", 1)), net, Rules()).sources == ["s-ams"]

    only_rot = network([locations[1]], stock)  # nothing used today yet
    assert plan(home(("SKU-1", 1)), only_rot, Rules()).sources == ["s-rot"]


# -- splitting -------------------------------------------------------------------------

# Costs chosen so that the boundary is exact. Fixed 500, store handling 3,
# DC handling 63, 10 cents a km, customer in Utrecht:
#   s-ams (SKU-A only): 500 + 3 + round(352.12) = 855
#   s-dh  (SKU-B only): 500 + 3 + round(561.89) = 1065
#   dc-maa (both):      500 + 63 + round(1436.86) = 2000
# The split costs 855 + 1065 = 1920: exactly 4 % cheaper than the single shipment.
SPLIT_RULES = Rules(
    shipment_cost_cents=500,
    store_handling_cents=3,
    distribution_centre_handling_cents=63,
    cost_per_km_cents=10,
)


def split_network(*, with_centre: bool = True) -> Network:
    locations = [store("s-ams", "amsterdam"), store("s-dh", "den-haag")]
    stock = {("SKU-A", "s-ams"): 2, ("SKU-B", "s-dh"): 1}
    if with_centre:
        locations.append(centre("dc-maa", "maastricht"))
        stock |= {("SKU-A", "dc-maa"): 2, ("SKU-B", "dc-maa"): 1}
    return network(locations, stock)


def test_split_cost_figures() -> None:
    result = plan(home(("SKU-A", 2), ("SKU-B", 1)), split_network(), SPLIT_RULES)
    costs = {v.location_id: v.cost_cents for v in result.verdicts}
    assert costs == {"s-ams": 855, "s-dh": 1065, "dc-maa": 2000}


def test_a_split_cheaper_by_less_than_the_margin_ships_once() -> None:
    rules = replace(SPLIT_RULES, split_margin_percent=5)  # split must cost <= 1900
    result = plan(home(("SKU-A", 2), ("SKU-B", 1)), split_network(), rules)

    assert result.sources == ["dc-maa"]
    assert result.shipments[0].lines == (PlannedLine(1, "SKU-A", 2), PlannedLine(2, "SKU-B", 1))
    assert result.total_cost_cents == 2000
    assert outcomes(result) == {
        "dc-maa": Outcome.CHOSEN,
        "s-ams": Outcome.MORE_EXPENSIVE,
        "s-dh": Outcome.MORE_EXPENSIVE,
    }


def test_a_split_cheaper_by_exactly_the_margin_is_taken() -> None:
    # "A split is chosen only when it is at least this many percent cheaper":
    # 1920 is exactly 4 % below 2000, so a 4 % margin takes the split.
    rules = replace(SPLIT_RULES, split_margin_percent=4)
    result = plan(home(("SKU-A", 2), ("SKU-B", 1)), split_network(), rules)

    assert result.sources == ["s-ams", "s-dh"]
    assert [s.lines for s in result.shipments] == [
        (PlannedLine(1, "SKU-A", 2),),
        (PlannedLine(2, "SKU-B", 1),),
    ]
    assert result.total_cost_cents == 1920
    assert result.estimated_at == NOW + timedelta(days=1)
    single = verdict(result, "dc-maa")
    assert (single.outcome, single.extra_cost_cents) == (Outcome.MORE_EXPENSIVE, 2000 - 1920)


def test_a_split_cheaper_by_more_than_the_margin_is_taken() -> None:
    rules = replace(SPLIT_RULES, split_margin_percent=3)
    result = plan(home(("SKU-A", 2), ("SKU-B", 1)), split_network(), rules)
    assert result.sources == ["s-ams", "s-dh"]
    assert result.total_cost_cents == 1920


def test_without_a_whole_source_the_cheapest_split_is_taken_whatever_the_margin() -> None:
    rules = replace(SPLIT_RULES, split_margin_percent=90)
    result = plan(home(("SKU-A", 2), ("SKU-B", 1)), split_network(with_centre=False), rules)
    assert result.sources == ["s-ams", "s-dh"]
    assert result.unsourced == ()


def test_a_split_ships_each_line_whole_from_one_source_where_it_can() -> None:
    # Neither store alone has the order: Amsterdam (815) must send the SKU-2
    # unit, Rotterdam (841) is the only one with both units of SKU-1. SKU-1
    # goes wholly from Rotterdam rather than one unit from each store.
    locations = [store("s-ams", "amsterdam"), store("s-rot", "rotterdam")]
    stock = {("SKU-1", "s-ams"): 1, ("SKU-2", "s-ams"): 1, ("SKU-1", "s-rot"): 2}
    result = plan(home(("SKU-1", 2), ("SKU-2", 1)), network(locations, stock), Rules())

    assert result.sources == ["s-ams", "s-rot"]
    assert assigned(result) == Counter({("SKU-1", "s-rot"): 2, ("SKU-2", "s-ams"): 1})
    assert result.total_cost_cents == 815 + 841


def test_no_split_allowed_and_no_whole_source_sources_nothing() -> None:
    problem = home(("SKU-A", 2), ("SKU-B", 1), allow_split=False)
    result = plan(problem, split_network(with_centre=False), SPLIT_RULES)

    assert result.shipments == ()
    assert result.total_cost_cents == 0
    assert result.estimated_at is None
    assert [(u.line_number, u.sku, u.quantity) for u in result.unsourced] == [
        (1, "SKU-A", 2),
        (2, "SKU-B", 1),
    ]
    for u in result.unsourced:
        assert "no single location has the whole order" in u.reason
    assert outcomes(result) == {
        "s-ams": Outcome.SPLIT_NOT_ALLOWED,
        "s-dh": Outcome.SPLIT_NOT_ALLOWED,
    }
    assert result.summary.startswith("Nothing could be sourced")


def test_no_split_allowed_takes_the_whole_source_even_when_a_split_is_far_cheaper() -> None:
    rules = replace(SPLIT_RULES, split_margin_percent=0)
    problem = home(("SKU-A", 2), ("SKU-B", 1), allow_split=False)
    result = plan(problem, split_network(), rules)
    assert result.sources == ["dc-maa"]
    assert outcomes(result)["s-ams"] is Outcome.SPLIT_NOT_ALLOWED
    assert outcomes(result)["s-dh"] is Outcome.SPLIT_NOT_ALLOWED


# -- exclusions ----------------------------------------------------------------------


def test_every_exclusion_gets_its_own_outcome() -> None:
    locations = [
        store("s-utr", "utrecht"),  # the one that ships
        store("s-ams", "amsterdam"),  # not sold from by the channel
        store("s-rot", "rotterdam"),  # excluded by the rules
        store("s-dh", "den-haag", closed=True),
        store("s-til", "tilburg"),  # failed this order before
        store("s-ein", "eindhoven", ship=False),  # cannot ship to customers
        store("s-maa", "maastricht"),  # 143.7 km: farther than stores ship
        centre("dc-gro", "groningen"),  # takes 3 days; the order must arrive in 2
        store("s-utr-2", "utrecht"),  # only has another SKU
    ]
    stock = stock_everywhere("SKU-1", locations[:-1]) | {("SKU-2", "s-utr-2"): 9}
    net = network(
        locations,
        stock,
        sellable=[loc.location_id for loc in locations if loc.location_id != "s-ams"],
        failed=["s-til"],
    )
    rules = Rules(
        excluded_location_ids=frozenset({"s-rot"}),
        max_ship_from_store_km=100,
        distribution_centre_delivery_days=3,
        store_delivery_days=1,
    )
    result = plan(home(("SKU-1", 1), deliver_by=NOW + timedelta(days=2)), net, rules)

    assert result.sources == ["s-utr"]
    assert result.total_cost_cents == 495 + 250  # zero km
    assert outcomes(result) == {
        "s-utr": Outcome.CHOSEN,
        "s-ams": Outcome.NOT_ALLOWED_FOR_CHANNEL,
        "s-rot": Outcome.EXCLUDED,
        "s-dh": Outcome.CLOSED,
        "s-til": Outcome.FAILED_BEFORE,
        "s-ein": Outcome.NOT_CAPABLE,
        "s-maa": Outcome.TOO_FAR,
        "dc-gro": Outcome.TOO_LATE,
    }
    # A location holding none of the order is counted, not listed.
    assert result.unlisted == ((Outcome.NO_STOCK, 1),)
    # Rejected locations still say where they are and what they would cost:
    # Maastricht store 495 + 250 + round(143.686 * 2) = 1032.
    too_far = verdict(result, "s-maa")
    assert (too_far.distance_km, too_far.cost_cents, too_far.extra_cost_cents) == (143.7, 1032, 0)
    assert "100 km" in too_far.explanation
    # Verdicts are ordered by outcome.
    order = list(Outcome)
    ranks = [order.index(v.outcome) for v in result.verdicts]
    assert ranks == sorted(ranks)


def test_the_store_distance_limit_does_not_apply_to_distribution_centres() -> None:
    locations = [store("s-maa", "maastricht"), centre("dc-maa", "maastricht")]
    result = plan(
        home(("SKU-1", 1)),
        network(locations, stock_everywhere("SKU-1", locations)),
        Rules(max_ship_from_store_km=100),
    )
    assert result.sources == ["dc-maa"]
    assert outcomes(result)["s-maa"] is Outcome.TOO_FAR


def test_a_store_within_the_distance_limit_ships() -> None:
    # Eindhoven-Utrecht 76.1 km: within a 77 km limit, beyond a 76 km one.
    locations = [store("s-ein", "eindhoven")]
    net = network(locations, stock_everywhere("SKU-1", locations))
    assert plan(home(("SKU-1", 1)), net, Rules(max_ship_from_store_km=77)).sources == ["s-ein"]
    beyond = plan(home(("SKU-1", 1)), net, Rules(max_ship_from_store_km=76))
    assert beyond.sources == []
    assert outcomes(beyond) == {"s-ein": Outcome.TOO_FAR}


def test_arriving_exactly_at_the_latest_time_is_on_time() -> None:
    locations = [store("s-ams", "amsterdam"), centre("dc-gro", "groningen")]
    net = network(locations, stock_everywhere("SKU-1", locations))
    rules = Rules(store_delivery_days=2, distribution_centre_delivery_days=1)
    # The DC (913) is dearer than the store (815) but the store takes a day longer.
    on_time = plan(home(("SKU-1", 1), deliver_by=NOW + timedelta(days=2)), net, rules)
    assert on_time.sources == ["s-ams"]
    late = plan(home(("SKU-1", 1), deliver_by=NOW + timedelta(days=1, hours=23)), net, rules)
    assert late.sources == ["dc-gro"]
    assert outcomes(late)["s-ams"] is Outcome.TOO_LATE
    assert late.estimated_at == NOW + timedelta(days=1)


# -- click-and-collect ---------------------------------------------------------------

# Pickup at the Rotterdam store. Transfers cost 150 + handling + 2 cents a km:
#   dc-utr (DC, 47.856 km):          150 + 100 + 96  = 346
#   s-dh (store, 21.148 km):         150 + 250 + 42  = 442
#   s-ams (store, 57.554 km):        150 + 250 + 115 = 515
READY = NOW + timedelta(hours=2)
TRANSFERRED = NOW + timedelta(days=2)


def pickup_locations() -> list[Location]:
    return [
        store("s-rot", "rotterdam", collect=True),
        centre("dc-utr", "utrecht"),
        store("s-dh", "den-haag", collect=True),
        store("s-ams", "amsterdam", collect=True),
        store("s-dh-nocc", "den-haag"),  # has everything but does no click-and-collect
        store("s-dh-short", "den-haag", collect=True),  # too little for a suggestion
    ]


def pickup_stock(at_pickup_store: int) -> dict[tuple[str, str], int]:
    stock = {
        ("SKU-1", "dc-utr"): 10,
        ("SKU-1", "s-dh"): 10,
        ("SKU-1", "s-ams"): 10,
        ("SKU-1", "s-dh-nocc"): 10,
        ("SKU-1", "s-dh-short"): 1,
    }
    if at_pickup_store:
        stock["SKU-1", "s-rot"] = at_pickup_store
    return stock


def test_pickup_from_the_stores_own_shelves() -> None:
    net = network(pickup_locations(), pickup_stock(at_pickup_store=5))
    result = plan(pickup(("SKU-1", 2), at="s-rot"), net, Rules())

    assert result.shipments == (
        Shipment(
            "s-rot",
            STORE,
            FulfilmentType.PICKUP_AT_STORE,
            (PlannedLine(1, "SKU-1", 2),),
            0.0,
            250,
            READY,
            "s-rot",
        ),
    )
    assert result.total_cost_cents == 250
    assert result.estimated_at == READY
    assert result.suggestions == ()
    assert result.unsourced == ()
    assert verdict(result, "s-rot").outcome is Outcome.CHOSEN
    # Transferring everything from the DC instead would cost 346, i.e. 96 more.
    dc = verdict(result, "dc-utr")
    assert (dc.outcome, dc.cost_cents, dc.extra_cost_cents) == (Outcome.MORE_EXPENSIVE, 346, 96)
    assert "own shelves" in result.summary


def test_pickup_without_stock_transfers_from_the_best_source_and_suggests_nearby_stores() -> None:
    net = network(pickup_locations(), pickup_stock(at_pickup_store=0))
    result = plan(pickup(("SKU-1", 2), at="s-rot"), net, Rules())

    assert result.shipments == (
        Shipment(
            "dc-utr",
            DC,
            FulfilmentType.TRANSFER_TO_STORE,
            (PlannedLine(1, "SKU-1", 2),),
            47.9,
            346,
            TRANSFERRED,
            "s-rot",
        ),
    )
    assert result.total_cost_cents == 346
    assert result.estimated_at == TRANSFERRED
    assert verdict(result, "s-rot").outcome is Outcome.NO_STOCK
    dh = verdict(result, "s-dh")
    assert (dh.outcome, dh.cost_cents, dh.extra_cost_cents) == (Outcome.MORE_EXPENSIVE, 442, 96)
    ams = verdict(result, "s-ams")
    assert (ams.cost_cents, ams.extra_cost_cents) == (515, 515 - 346)
    # Only Den Haag is near (21.1 km ≤ 25), collects, and has both units;
    # Amsterdam is 57.6 km away.
    assert result.suggestions == (Suggestion("s-dh", "Store s-dh", 21.1, READY),)
    assert "1 transfer(s) from dc-utr" in result.summary


def test_transfer_sources_must_be_able_to_send() -> None:
    locations = [store("s-rot", "rotterdam", collect=True), store("s-dh", "den-haag", ship=False)]
    result = plan(
        pickup(("SKU-1", 1), at="s-rot"),
        network(locations, {("SKU-1", "s-dh"): 3}),
        Rules(max_ship_from_store_km=1),  # the home-delivery limit is not for transfers
    )
    assert result.shipments == ()
    assert outcomes(result) == {"s-rot": Outcome.NO_STOCK, "s-dh": Outcome.NOT_CAPABLE}
    assert "send transfers" in verdict(result, "s-dh").explanation
    assert [(u.line_number, u.quantity) for u in result.unsourced] == [(1, 1)]


def test_pickup_with_part_on_the_shelf_transfers_the_rest() -> None:
    net = network(pickup_locations(), pickup_stock(at_pickup_store=1))
    result = plan(pickup(("SKU-1", 3), at="s-rot"), net, Rules())

    shelf, transfer = result.shipments
    assert (shelf.source_id, shelf.type, shelf.lines) == (
        "s-rot",
        FulfilmentType.PICKUP_AT_STORE,
        (PlannedLine(1, "SKU-1", 1),),
    )
    # The shelf part is ready when the transfer arrives.
    assert shelf.estimated_at == TRANSFERRED
    assert (transfer.source_id, transfer.type, transfer.lines, transfer.cost_cents) == (
        "dc-utr",
        FulfilmentType.TRANSFER_TO_STORE,
        (PlannedLine(1, "SKU-1", 2),),
        346,
    )
    assert transfer.pickup_location_id == "s-rot"
    assert result.total_cost_cents == 250 + 346
    assert result.estimated_at == TRANSFERRED
    assert verdict(result, "s-rot").outcome is Outcome.CHOSEN
    assert result.suggestions == (Suggestion("s-dh", "Store s-dh", 21.1, READY),)


def test_pickup_with_part_on_the_shelf_rates_other_transfer_sources_against_the_transfer() -> None:
    # Every plan here keeps the shelf part (250), so a transfer of the rest from
    # Den Haag (442) instead of the DC (346) costs 442 - 346 = 96 more, and one
    # from Amsterdam (515) 169 more. The shelf's own cost is no reason to call
    # them "the same cost".
    net = network(pickup_locations(), pickup_stock(at_pickup_store=1))
    result = plan(pickup(("SKU-1", 3), at="s-rot"), net, Rules())

    dh = verdict(result, "s-dh")
    assert dh.outcome is Outcome.MORE_EXPENSIVE
    assert dh.extra_cost_cents == 442 - 346, dh
    assert verdict(result, "s-ams").extra_cost_cents == 515 - 346


def test_pickup_with_part_on_the_shelf_and_no_split_transfers_everything_from_one_source() -> None:
    net = network(pickup_locations(), pickup_stock(at_pickup_store=1))
    result = plan(pickup(("SKU-1", 3), at="s-rot", allow_split=False), net, Rules())

    assert result.shipments == (
        Shipment(
            "dc-utr",
            DC,
            FulfilmentType.TRANSFER_TO_STORE,
            (PlannedLine(1, "SKU-1", 3),),
            47.9,
            346,
            TRANSFERRED,
            "s-rot",
        ),
    )
    own = verdict(result, "s-rot")
    assert own.outcome is Outcome.SPLIT_NOT_ALLOWED
    assert result.unsourced == ()


def test_pickup_store_shelf_exclusions() -> None:
    # The pickup store's own stock is not used when the channel does not sell
    # from it, the rules exclude it, it failed before or it is full.
    base = network(pickup_locations(), pickup_stock(at_pickup_store=5))
    cases: list[tuple[Network, Rules, Outcome]] = [
        (
            replace(base, sellable=base.sellable - {"s-rot"}),
            Rules(),
            Outcome.NOT_ALLOWED_FOR_CHANNEL,
        ),
        (base, Rules(excluded_location_ids=frozenset({"s-rot"})), Outcome.EXCLUDED),
        (replace(base, failed=frozenset({"s-rot"})), Rules(), Outcome.FAILED_BEFORE),
        (
            replace(
                base,
                locations={
                    **base.locations,
                    "s-rot": store("s-rot", "rotterdam", collect=True, capacity=3),
                },
                capacity_left={"s-rot": 0},
            ),
            Rules(),
            Outcome.OVER_CAPACITY,
        ),
    ]
    for net, rules, outcome in cases:
        result = plan(pickup(("SKU-1", 2), at="s-rot"), net, rules)
        assert verdict(result, "s-rot").outcome is outcome
        assert result.sources == ["dc-utr"]
        assert result.shipments[0].type is FulfilmentType.TRANSFER_TO_STORE


def test_pickup_too_late_for_a_transfer_sources_the_shelf_part_only() -> None:
    net = network(pickup_locations(), pickup_stock(at_pickup_store=1))
    result = plan(
        pickup(("SKU-1", 3), at="s-rot", deliver_by=NOW + timedelta(days=1)), net, Rules()
    )
    assert [(s.source_id, s.lines) for s in result.shipments] == [
        ("s-rot", (PlannedLine(1, "SKU-1", 1),))
    ]
    assert result.shipments[0].estimated_at == READY
    assert [(u.line_number, u.quantity) for u in result.unsourced] == [(1, 2)]
    assert verdict(result, "dc-utr").outcome is Outcome.TOO_LATE


# -- unsourced units -----------------------------------------------------------------


def test_units_the_network_lacks_are_unsourced_and_the_rest_is_sourced() -> None:
    locations = [
        store("s-ams", "amsterdam"),
        centre("dc-rot", "rotterdam"),
        store("s-dh", "den-haag"),  # plenty, but not for this channel
    ]
    stock = {
        ("SKU-1", "s-ams"): 3,
        ("SKU-1", "dc-rot"): 4,
        ("SKU-1", "s-dh"): 100,
        ("SKU-2", "dc-rot"): 1,
    }
    net = network(locations, stock, sellable=["s-ams", "dc-rot"])
    result = plan(home(("SKU-1", 10), ("SKU-2", 1)), net, Rules())

    assert result.unsourced and len(result.unsourced) == 1
    short = result.unsourced[0]
    assert (short.line_number, short.sku, short.quantity) == (1, "SKU-1", 3)
    assert "7" in short.reason and "10" in short.reason
    assert short.reason == "only 7 of 10 units available for channel web"
    assert per_line(result) == Counter({1: 7, 2: 1})
    assert assigned(result) == Counter(
        {("SKU-1", "s-ams"): 3, ("SKU-1", "dc-rot"): 4, ("SKU-2", "dc-rot"): 1}
    )
    assert sorted(result.sources) == ["dc-rot", "s-ams"]
    assert "3 unit(s) could not be sourced" in result.summary


def test_a_sku_nobody_has_is_unsourced() -> None:
    locations = [store("s-ams", "amsterdam")]
    result = plan(
        home(("SKU-1", 1), ("SKU-9", 2)),
        network(locations, {("SKU-1", "s-ams"): 1}),
        Rules(),
    )
    assert result.sources == ["s-ams"]
    assert [(u.line_number, u.sku, u.quantity) for u in result.unsourced] == [(2, "SKU-9", 2)]
    assert "only 0 of 2" in result.unsourced[0].reason


# -- determinism ---------------------------------------------------------------------


def test_the_same_inputs_give_the_same_plan_whatever_the_order() -> None:
    locations = [
        store("s-b", "amsterdam"),  # s-a and s-b tie exactly: the id decides
        store("s-a", "amsterdam"),
        store("s-rot", "rotterdam"),
        centre("dc-ein", "eindhoven"),
        store("s-dh", "den-haag", closed=True),
        store("s-til", "tilburg", ship=False),
    ]
    stock = {
        ("SKU-1", "s-a"): 2,
        ("SKU-1", "s-b"): 2,
        ("SKU-2", "s-a"): 1,
        ("SKU-2", "s-b"): 1,
        ("SKU-1", "s-rot"): 5,
        ("SKU-2", "dc-ein"): 5,
        ("SKU-3", "dc-ein"): 5,
        ("SKU-1", "s-dh"): 5,
        ("SKU-1", "s-til"): 5,
    }
    problem = home(("SKU-1", 3), ("SKU-2", 1), ("SKU-3", 1))
    forward = network(locations, stock)
    backward = network(reversed(locations), dict(reversed(list(stock.items()))))
    first = plan(problem, forward, Rules())
    assert plan(problem, forward, Rules()) == first
    assert plan(problem, backward, Rules()) == first
    assert first.unsourced == ()
    assert "s-b" not in first.sources

    tie = [store("s-b", "amsterdam"), store("s-a", "amsterdam")]
    tie_stock = stock_everywhere("SKU-1", tie)
    for order in (tie, tie[::-1]):
        result = plan(home(("SKU-1", 1)), network(order, tie_stock), Rules())
        assert result.sources == ["s-a"]
        assert verdict(result, "s-b").extra_cost_cents == 0


# -- priorities ----------------------------------------------------------------------


def test_a_higher_priority_can_make_a_slightly_dearer_source_win() -> None:
    # Amsterdam store 815, Rotterdam store 841: 26 apart.
    locations = [store("s-ams", "amsterdam"), store("s-rot", "rotterdam")]
    net = network(locations, stock_everywhere("SKU-1", locations))

    enough = Rules(priorities={"s-rot": 3}, priority_step_cents=10)  # 841 - 30 = 811 < 815
    result = plan(home(("SKU-1", 1)), net, enough)
    assert result.sources == ["s-rot"]
    # The plan still states the real cost, not the priority-adjusted one.
    assert result.total_cost_cents == 841
    assert result.shipments[0].cost_cents == 841
    assert verdict(result, "s-ams").outcome is Outcome.MORE_EXPENSIVE

    too_little = Rules(priorities={"s-rot": 2}, priority_step_cents=10)  # 821 > 815
    assert plan(home(("SKU-1", 1)), net, too_little).sources == ["s-ams"]

    no_step = Rules(priorities={"s-rot": 100}, priority_step_cents=0)
    assert plan(home(("SKU-1", 1)), net, no_step).sources == ["s-ams"]


# -- solve(): optimal against brute force ---------------------------------------------


def _candidate(
    location_id: str, score: int, supply: Mapping[int, int], kind: SourceKind = STORE
) -> Candidate:
    loc = Location(location_id, kind, location_id, CITY["utrecht"])
    return Candidate(loc, 0.0, score, score, dict(supply), NOW)


def _covers(chosen: Iterable[Candidate], need: Mapping[int, int]) -> bool:
    got: Counter[int] = Counter()
    for c in chosen:
        for i, q in c.supply.items():
            got[i] += q
    return all(got[i] >= q for i, q in need.items())


def _expected_score(
    candidates: Sequence[Candidate], need: Mapping[int, int], allow_split: bool, margin: int
) -> tuple[int, Candidate | None] | None:
    """Brute force: the score solve() must reach, and the single source when it must
    be that one shipment. None when nothing acceptable covers the need."""
    wholes = sorted(
        (c for c in candidates if _covers([c], need)), key=lambda c: (c.score, c.location_id)
    )
    single = wholes[0] if wholes else None
    if not allow_split:
        return (single.score, single) if single else None
    covering = [
        sum(c.score for c in subset)
        for size in range(1, len(candidates) + 1)
        for subset in itertools.combinations(candidates, size)
        if _covers(subset, need)
    ]
    if not covering:
        return None
    cheapest = min(covering)
    if single is None:
        return cheapest, None
    # "At least margin percent cheaper": cheapest <= single * (100 - margin) / 100.
    if cheapest * 100 <= single.score * (100 - margin):
        return cheapest, None
    return single.score, single


@pytest.mark.parametrize(
    ("split_scores", "margin", "split_wins"),
    [
        ((45, 45), 10, True),  # 90: exactly 10 % below 100
        ((45, 46), 10, False),  # 91: 9 % below
        ((44, 45), 10, True),  # 89: 11 % below
        ((49, 50), 0, True),  # no margin: any saving splits
        ((50, 51), 0, False),  # dearer never wins
        ((1, 1), 100, False),  # nothing is 100 % cheaper
    ],
)
def test_solve_split_margin_boundary(
    split_scores: tuple[int, int], margin: int, split_wins: bool
) -> None:
    single = _candidate("z-single", 100, {0: 1, 1: 1})
    left = _candidate("a-left", split_scores[0], {0: 1})
    right = _candidate("b-right", split_scores[1], {1: 1})
    result = solve(
        [single, left, right], {0: 1, 1: 1}, allow_split=True, split_margin_percent=margin
    )
    assert result is not None
    chosen, _ = result
    assert [c.location_id for c in chosen] == (
        sorted(["a-left", "b-right"]) if split_wins else ["z-single"]
    )


@st.composite
def solve_cases(
    draw: st.DrawFn,
) -> tuple[list[Candidate], dict[int, int], bool, int]:
    need_count = draw(st.integers(1, 3))
    need = {i: draw(st.integers(1, 4)) for i in range(need_count)}
    size = draw(st.integers(0, 8))
    candidates = []
    for n in range(size):
        supply = {i: draw(st.integers(0, q)) for i, q in need.items()}
        supply = {i: q for i, q in supply.items() if q}
        if not supply:
            supply = {0: 1}
        candidates.append(_candidate(f"c{n}", draw(st.integers(1, 40)), supply))
    return candidates, need, draw(st.booleans()), draw(st.integers(0, 60))


@settings(max_examples=400, deadline=None)
@given(solve_cases())
def test_solve_matches_brute_force(case: tuple[list[Candidate], dict[int, int], bool, int]) -> None:
    candidates, need, allow_split, margin = case
    expected = _expected_score(candidates, need, allow_split, margin)
    result = solve(candidates, need, allow_split=allow_split, split_margin_percent=margin)
    if expected is None:
        assert result is None
        return
    assert result is not None
    chosen, exhaustive = result
    assert exhaustive
    assert len({c.location_id for c in chosen}) == len(chosen)
    assert list(chosen) == sorted(chosen, key=lambda c: (c.score, c.location_id))
    assert _covers(chosen, need)
    score, single = expected
    assert sum(c.score for c in chosen) == score
    if single is not None:
        assert chosen == (single,)
    if not allow_split:
        assert len(chosen) == 1


# -- plan(): invariants and optimality on random networks ----------------------------


@st.composite
def networks(draw: st.DrawFn) -> tuple[Problem, Network, Rules]:
    cities = list(CITY)
    size = draw(st.integers(1, 7))
    skus = [f"SKU-{n}" for n in range(draw(st.integers(1, 3)))]
    locations = []
    stock: dict[tuple[str, str], int] = {}
    for n in range(size):
        city = draw(st.sampled_from(cities))
        kind = draw(st.sampled_from([STORE, DC]))
        loc_id = f"loc-{n}"
        if kind is STORE:
            locations.append(store(loc_id, city, collect=draw(st.booleans())))
        else:
            locations.append(centre(loc_id, city))
        for sku in skus:
            units = draw(st.integers(0, 4))
            if units:
                stock[sku, loc_id] = units
    needs = [(sku, draw(st.integers(1, 6))) for sku in skus]
    split = draw(st.booleans())
    rules = Rules(
        shipment_cost_cents=draw(st.integers(0, 600)),
        cost_per_km_cents=draw(st.integers(0, 12)),
        store_handling_cents=draw(st.integers(0, 300)),
        distribution_centre_handling_cents=draw(st.integers(0, 300)),
        transfer_cost_cents=draw(st.integers(0, 300)),
        split_margin_percent=draw(st.integers(0, 40)),
    )
    stores = [loc.location_id for loc in locations if loc.kind is STORE]
    collect = draw(st.booleans())
    if stores and collect:
        problem = pickup(*needs, at=draw(st.sampled_from(stores)), allow_split=split)
    else:
        problem = home(*needs, to=draw(st.sampled_from(cities)), allow_split=split)
    return problem, network(locations, stock), rules


def _home_cost(loc: Location, destination: GeoPoint, rules: Rules) -> int:
    handling = (
        rules.store_handling_cents
        if loc.kind is STORE
        else rules.distribution_centre_handling_cents
    )
    km = haversine_km(loc.position, destination)
    return rules.shipment_cost_cents + handling + round(km * rules.cost_per_km_cents)


@settings(max_examples=300, deadline=None)
@given(networks())
def test_plans_never_overdraw_stock_and_source_exactly_what_they_can(
    case: tuple[Problem, Network, Rules],
) -> None:
    problem, net, rules = case
    result = plan(problem, net, rules)

    # Never more of a SKU at a location than it has.
    for (sku, loc_id), units in assigned(result).items():
        assert units <= net.available.get((sku, loc_id), 0), (sku, loc_id)
    # Every unit asked is either sourced or unsourced, exactly once.
    sourced = per_line(result)
    missing: Counter[int] = Counter()
    for u in result.unsourced:
        missing[u.line_number] += u.quantity
        assert u.reason
    for n in problem.needs:
        assert sourced[n.line_number] + missing[n.line_number] == n.quantity
        total = sum(net.available.get((n.sku, loc), 0) for loc in net.locations)
        if problem.allow_split:
            # Everything here may source, so all that exists is used.
            assert sourced[n.line_number] == min(n.quantity, total)
    if not problem.allow_split:
        # Everything from one source (the shelf or one transfer), or nothing.
        assert len(result.shipments) <= 1
    assert result.total_cost_cents == sum(s.cost_cents for s in result.shipments)
    # One verdict per location (those holding none of the order are counted);
    # CHOSEN exactly for the sources.
    listed = [v.location_id for v in result.verdicts]
    assert len(listed) == len(set(listed))
    assert len(listed) + sum(count for _, count in result.unlisted) == len(net.locations)
    chosen = {v.location_id for v in result.verdicts if v.outcome is Outcome.CHOSEN}
    assert chosen == set(result.sources)
    assert plan(problem, net, rules) == result


@settings(max_examples=300, deadline=None)
@given(networks())
def test_home_delivery_cost_matches_brute_force(case: tuple[Problem, Network, Rules]) -> None:
    problem, net, rules = case
    if problem.method is not Method.SHIP_TO_HOME:
        problem = home(*((n.sku, n.quantity) for n in problem.needs), allow_split=True)
    assert problem.destination is not None
    result = plan(problem, net, rules)

    # Candidates: every location with some of the needed stock (nothing else excludes here).
    supply: dict[str, dict[int, int]] = {}
    for loc_id in net.locations:
        got = {
            i: min(n.quantity, net.available.get((n.sku, loc_id), 0))
            for i, n in enumerate(problem.needs)
        }
        if any(got.values()):
            supply[loc_id] = {i: q for i, q in got.items() if q}
    cost = {
        loc_id: max(1, _home_cost(net.locations[loc_id], problem.destination, rules))
        for loc_id in supply
    }
    need = {i: n.quantity for i, n in enumerate(problem.needs)}
    if problem.allow_split:
        need = {i: min(q, sum(s.get(i, 0) for s in supply.values())) for i, q in need.items()}
        need = {i: q for i, q in need.items() if q}
    candidates = [_candidate(loc_id, cost[loc_id], supply[loc_id]) for loc_id in sorted(supply)]
    expected = _expected_score(candidates, need, problem.allow_split, rules.split_margin_percent)
    if expected is None or not need:
        assert result.shipments == ()
        return
    assert sum(max(1, s.cost_cents) for s in result.shipments) == expected[0]
    if expected[1] is not None:
        assert result.sources == [expected[1].location_id]
