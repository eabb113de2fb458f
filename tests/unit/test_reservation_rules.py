"""Unit tests of the reservation rules: validation, placing holds, ATP, shrinkage, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from omnistock.errors import FailedPrecondition, InvalidArgument, NotFound
from services.reservation.domain import (
    MAX_LINES,
    ChannelRules,
    InsufficientStock,
    Kind,
    Line,
    LineStatus,
    Reservation,
    Reserve,
    ReserveLine,
    Rules,
    Shortfall,
    StockKey,
    StockRow,
    check_release,
    consume,
    departing_change,
    end_lines,
    lines_to_short,
    place,
    release_units,
    validate_reserve,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
CART_TTL = timedelta(minutes=20)


def rules(
    *,
    channel_safety: int = 0,
    location_safety: dict[str, int] | None = None,
    closed: frozenset[str] = frozenset(),
    threshold: int = 0,
) -> Rules:
    """Channel "web" sells from store-a, store-b and dc-c; "pos" from store-a only."""
    return Rules(
        channels={
            "web": ChannelRules(
                "web", ("store-a", "store-b", "dc-c"), CART_TTL, channel_safety, threshold
            ),
            "pos": ChannelRules("pos", ("store-a",), CART_TTL),
        },
        location_safety=location_safety or {},
        closed_locations=closed,
    )


def reserve(
    *lines: tuple[str, str, int],
    channel: str = "web",
    reference: str = "cart-1",
    kind: Kind | None = Kind.CART,
    ttl: timedelta | None = None,
) -> Reserve:
    return Reserve(
        request_id="req-1",
        channel=channel,
        reference=reference,
        kind=kind,
        lines=tuple(ReserveLine(sku, location, quantity) for sku, location, quantity in lines),
        ttl=ttl,
    )


def stock(*rows: tuple[str, str, int, int]) -> dict[StockKey, StockRow]:
    """Rows from (sku, location, on_hand, held)."""
    return {(sku, loc): StockRow(sku, loc, on_hand, held) for sku, loc, on_hand, held in rows}


def snapshot(rows: dict[StockKey, StockRow]) -> dict[StockKey, tuple[int, int]]:
    return {key: (row.on_hand, row.held) for key, row in rows.items()}


def invalid_fields(command: Reserve) -> set[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_reserve(command)
    return {violation.field for violation in caught.value.violations}


def reservation(*lines: Line, kind: Kind = Kind.CART, reservation_id: str = "res-1") -> Reservation:
    return Reservation(
        reservation_id=reservation_id,
        channel="web",
        reference="cart-1",
        kind=kind,
        lines=tuple(lines),
        created_at=NOW,
        updated_at=NOW,
        expires_at=NOW + CART_TTL if kind is Kind.CART else None,
    )


# -- validation ---------------------------------------------------------------------


def test_a_well_formed_reserve_passes_validation() -> None:
    validate_reserve(reserve(("SKU-1", "store-a", 2), ("SKU-1", "store-b", 1)))
    validate_reserve(reserve(("SKU-1", "store-a", 1), kind=Kind.ORDER, reference="order-9"))
    validate_reserve(reserve(("SKU-1", "store-a", 1), ttl=timedelta(minutes=1)))
    validate_reserve(reserve(("SKU-1", "store-a", 1), ttl=timedelta(days=7)))


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (reserve(), "lines"),
        (reserve(("SKU-1", "store-a", 0)), "lines[0].quantity"),
        (reserve(("SKU-1", "store-a", -3)), "lines[0].quantity"),
        (reserve(("SKU-1", "store-a", 1_000_001)), "lines[0].quantity"),
        (reserve(("SKU-1", "store-a", 1), ("SKU-1", "store-a", 2)), "lines[1]"),
        (reserve(("SKU-1", "store-a", 1), ttl=timedelta(days=30)), "ttl"),
        (reserve(("SKU-1", "store-a", 1), ttl=timedelta(0)), "ttl"),
        (reserve(("SKU-1", "store-a", 1), ttl=timedelta(seconds=59)), "ttl"),
        (reserve(("SKU-1", "store-a", 1), ttl=timedelta(days=7, seconds=1)), "ttl"),
        (reserve(("SKU-1", "store-a", 1), kind=Kind.ORDER, ttl=timedelta(hours=1)), "ttl"),
        (reserve(("SKU-1", "store-a", 1), kind=None), "kind"),
        (reserve(("SKU-1", "store-a", 1), channel=""), "channel"),
        (reserve(("SKU-1", "store-a", 1), channel="web shop"), "channel"),
        (reserve(("SKU-1", "store-a", 1), reference=""), "reference"),
        (reserve(("SKU-1", "store-a", 1), reference="-cart"), "reference"),
        (reserve(("SKU-1", "store-a", 1), reference="cart\n"), "reference"),
        (reserve(("", "store-a", 1)), "lines[0].sku"),
        (reserve(("SKU 1", "store-a", 1)), "lines[0].sku"),
        (reserve(("SKU-1", "store-a", 1), ("SKU-2", "x" * 65, 1)), "lines[1].location_id"),
    ],
)
def test_each_malformed_reserve_names_the_offending_field(command: Reserve, field: str) -> None:
    assert field in invalid_fields(command)


def test_a_valid_line_beside_a_bad_one_is_not_blamed() -> None:
    fields = invalid_fields(reserve(("SKU-1", "store-a", 1), ("SKU-2", "store-a", 0)))
    assert fields == {"lines[1].quantity"}


def test_every_problem_is_reported_at_once() -> None:
    command = reserve(
        ("", "store-a", 0),
        ("SKU-2", "store-b", 1),
        ("SKU-2", "store-b", 1),
        channel="",
        kind=None,
    )
    assert invalid_fields(command) == {
        "channel",
        "kind",
        "lines[0].sku",
        "lines[0].quantity",
        "lines[2]",
    }


def test_an_order_hold_with_a_ttl_is_refused_even_when_the_ttl_is_in_range() -> None:
    command = reserve(("SKU-1", "store-a", 1), kind=Kind.ORDER, ttl=timedelta(minutes=5))
    with pytest.raises(InvalidArgument) as caught:
        validate_reserve(command)
    [violation] = caught.value.violations
    assert violation.field == "ttl"
    assert "order" in violation.description


def test_a_duplicate_line_points_back_at_the_first_one() -> None:
    command = reserve(("SKU-1", "store-a", 1), ("SKU-2", "store-a", 1), ("SKU-1", "store-a", 4))
    with pytest.raises(InvalidArgument) as caught:
        validate_reserve(command)
    [violation] = caught.value.violations
    assert violation.field == "lines[2]"
    assert "lines[0]" in violation.description


def test_the_same_sku_at_two_locations_is_not_a_duplicate() -> None:
    validate_reserve(reserve(("SKU-1", "store-a", 1), ("SKU-1", "store-b", 1)))


def test_too_many_lines_are_refused() -> None:
    lines = [(f"SKU-{i}", "store-a", 1) for i in range(MAX_LINES + 1)]
    assert "lines" in invalid_fields(reserve(*lines))
    validate_reserve(reserve(*lines[:MAX_LINES]))


# -- placing holds --------------------------------------------------------------------


def test_place_holds_every_line_and_builds_the_reservation() -> None:
    rows = stock(("SKU-1", "store-a", 10, 2), ("SKU-2", "store-b", 5, 0))
    command = reserve(("SKU-1", "store-a", 3), ("SKU-2", "store-b", 5))
    placed = place(command, rows, rules(), reservation_id="res-1", now=NOW)

    assert snapshot(rows) == {("SKU-1", "store-a"): (10, 5), ("SKU-2", "store-b"): (5, 5)}
    assert placed.reservation_id == "res-1"
    assert placed.kind is Kind.CART
    assert placed.status is LineStatus.ACTIVE
    assert placed.expires_at == NOW + CART_TTL
    assert placed.created_at == placed.updated_at == NOW
    assert placed.lines == (
        Line(1, "SKU-1", "store-a", 3),
        Line(2, "SKU-2", "store-b", 5),
    )


def test_a_cart_ttl_given_on_the_command_wins_over_the_channel_default() -> None:
    rows = stock(("SKU-1", "store-a", 10, 0))
    command = reserve(("SKU-1", "store-a", 1), ttl=timedelta(hours=2))
    placed = place(command, rows, rules(), reservation_id="res-1", now=NOW)
    assert placed.expires_at == NOW + timedelta(hours=2)


def test_an_order_hold_never_expires() -> None:
    rows = stock(("SKU-1", "store-a", 10, 0))
    command = reserve(("SKU-1", "store-a", 1), kind=Kind.ORDER, reference="order-7")
    placed = place(command, rows, rules(), reservation_id="res-1", now=NOW)
    assert (placed.kind, placed.expires_at, placed.reference) == (Kind.ORDER, None, "order-7")


def test_place_may_take_exactly_what_is_available() -> None:
    rows = stock(("SKU-1", "store-a", 7, 3))
    place(reserve(("SKU-1", "store-a", 4)), rows, rules(), reservation_id="r", now=NOW)
    assert rows[("SKU-1", "store-a")].held == 7


def test_a_short_line_holds_nothing_and_every_short_line_is_named() -> None:
    rows = stock(
        ("SKU-1", "store-a", 10, 8),  # 2 available
        ("SKU-2", "store-a", 9, 0),  # 9 available, fits
        ("SKU-3", "store-b", 4, 1),  # 3 available
    )
    before = snapshot(rows)
    command = reserve(
        ("SKU-1", "store-a", 3),
        ("SKU-2", "store-a", 9),
        ("SKU-3", "store-b", 5),
        ("SKU-4", "dc-c", 1),  # no row at all: nothing on hand
    )
    with pytest.raises(InsufficientStock) as caught:
        place(command, rows, rules(), reservation_id="r", now=NOW)

    error = caught.value
    assert error.reason == "INSUFFICIENT_STOCK"
    assert error.shortfalls == [
        Shortfall(0, "SKU-1", "store-a", 3, 2),
        Shortfall(2, "SKU-3", "store-b", 5, 3),
        Shortfall(3, "SKU-4", "dc-c", 1, 0),
    ]
    assert error.metadata["short_lines"] == "3"
    assert (error.metadata["sku"], error.metadata["requested"]) == ("SKU-1", "3")
    assert error.metadata["available"] == "2"
    assert error.metadata["line_2_sku"] == "SKU-3"
    assert error.metadata["line_2_requested"] == "5"
    assert error.metadata["line_2_available"] == "3"
    assert error.metadata["line_3_location_id"] == "dc-c"
    assert "line_1_sku" not in error.metadata  # the line that fitted is not blamed
    assert "2 more short lines" in error.message
    assert snapshot(rows) == before


def test_held_stock_beyond_on_hand_reports_zero_available_not_a_negative() -> None:
    rows = stock(("SKU-1", "store-a", 2, 5))
    with pytest.raises(InsufficientStock) as caught:
        place(reserve(("SKU-1", "store-a", 1)), rows, rules(), reservation_id="r", now=NOW)
    assert caught.value.shortfalls == [Shortfall(0, "SKU-1", "store-a", 1, 0)]


def test_safety_stock_of_the_location_and_the_channel_is_kept_back() -> None:
    config = rules(channel_safety=2, location_safety={"store-a": 3})
    rows = stock(("SKU-1", "store-a", 10, 1))  # 10 - 1 - (3 + 2) = 4 available to web
    with pytest.raises(InsufficientStock) as caught:
        place(reserve(("SKU-1", "store-a", 5)), rows, config, reservation_id="r", now=NOW)
    assert caught.value.shortfalls == [Shortfall(0, "SKU-1", "store-a", 5, 4)]
    assert rows[("SKU-1", "store-a")].held == 1

    place(reserve(("SKU-1", "store-a", 4)), rows, config, reservation_id="r", now=NOW)
    assert rows[("SKU-1", "store-a")].held == 5


def test_a_channel_without_safety_stock_may_use_what_another_channel_keeps_back() -> None:
    config = rules(channel_safety=4, location_safety={"store-a": 1})
    rows = stock(("SKU-1", "store-a", 10, 0))
    assert config.figure(rows[("SKU-1", "store-a")], "web", 1).available == 5
    assert config.figure(rows[("SKU-1", "store-a")], "pos", 1).available == 9
    place(
        reserve(("SKU-1", "store-a", 9), channel="pos"), rows, config, reservation_id="r", now=NOW
    )
    assert rows[("SKU-1", "store-a")].held == 9


def test_a_closed_location_refuses_and_holds_nothing() -> None:
    rows = stock(("SKU-1", "store-a", 10, 0), ("SKU-1", "store-b", 10, 0))
    command = reserve(("SKU-1", "store-a", 1), ("SKU-1", "store-b", 1))
    with pytest.raises(FailedPrecondition) as caught:
        place(command, rows, rules(closed=frozenset({"store-b"})), reservation_id="r", now=NOW)
    assert caught.value.reason == "LOCATION_NOT_SELLABLE"
    assert caught.value.metadata == {
        "channel": "web",
        "location_id": "store-b",
        "index": "1",
    }
    assert snapshot(rows) == {("SKU-1", "store-a"): (10, 0), ("SKU-1", "store-b"): (10, 0)}


def test_a_location_outside_the_channel_refuses_even_with_stock() -> None:
    rows = stock(("SKU-1", "store-b", 10, 0))
    command = reserve(("SKU-1", "store-b", 1), channel="pos")
    with pytest.raises(FailedPrecondition) as caught:
        place(command, rows, rules(), reservation_id="r", now=NOW)
    assert caught.value.reason == "LOCATION_NOT_SELLABLE"
    assert caught.value.metadata["location_id"] == "store-b"
    assert not isinstance(caught.value, InsufficientStock)
    assert rows[("SKU-1", "store-b")].held == 0


def test_not_sellable_is_reported_before_shortage() -> None:
    rows = stock(("SKU-1", "store-a", 0, 0))
    command = reserve(("SKU-1", "store-a", 5), ("SKU-1", "store-b", 1), channel="pos")
    with pytest.raises(FailedPrecondition) as caught:
        place(command, rows, rules(), reservation_id="r", now=NOW)
    assert caught.value.reason == "LOCATION_NOT_SELLABLE"


def test_a_channel_without_rules_is_not_found() -> None:
    rows = stock(("SKU-1", "store-a", 10, 0))
    with pytest.raises(NotFound) as caught:
        place(
            reserve(("SKU-1", "store-a", 1), channel="app"),
            rows,
            rules(),
            reservation_id="r",
            now=NOW,
        )
    assert caught.value.reason == "CHANNEL_NOT_FOUND"
    assert rows[("SKU-1", "store-a")].held == 0


# -- figures ------------------------------------------------------------------------


def test_a_location_figure_subtracts_held_and_safety() -> None:
    config = rules(channel_safety=1, location_safety={"store-a": 2}, threshold=5)
    figure = config.figure(StockRow("SKU-1", "store-a", 10, 3), "web", 42)
    assert (figure.on_hand, figure.reserved, figure.safety_stock) == (10, 3, 3)
    assert (figure.available, figure.low_stock, figure.version) == (4, True, 42)
    own = config.figure(StockRow("SKU-1", "store-a", 10, 3), "", 42)
    assert (own.channel, own.safety_stock, own.available) == ("", 2, 5)


def test_a_closed_location_has_nothing_available() -> None:
    config = rules(closed=frozenset({"store-a"}))
    figure = config.figure(StockRow("SKU-1", "store-a", 10, 0), "web", 1)
    assert (figure.on_hand, figure.available) == (10, 0)


def test_the_network_figure_sums_open_channel_locations_clamped_at_zero() -> None:
    config = rules(closed=frozenset({"dc-c"}), location_safety={"store-b": 4})
    rows = stock(
        ("SKU-1", "store-a", 10, 3),  # 7
        ("SKU-1", "store-b", 5, 3),  # 5 - 3 - 4 < 0: clamped to 0, not -2
        ("SKU-1", "dc-c", 100, 0),  # closed
        ("SKU-1", "store-z", 50, 0),  # not a web location
        ("SKU-2", "store-a", 30, 0),  # another SKU
    )
    network = config.network_figure("SKU-1", "web", rows, 9)
    assert network.location_id == ""
    assert network.channel == "web"
    assert network.available == 7
    assert network.on_hand == 15
    assert network.reserved == 6
    # store-b's rule is 4, but only 2 units are left there to keep back.
    assert network.safety_stock == 2
    assert network.on_hand - network.reserved - network.safety_stock == network.available
    assert network.version == 9


def test_the_network_figure_of_a_sku_without_rows_is_zero() -> None:
    network = rules().network_figure("SKU-9", "web", {}, 1)
    assert (network.on_hand, network.reserved, network.available) == (0, 0, 0)
    assert network.low_stock is False


def test_the_network_figure_of_an_unknown_channel_is_not_found() -> None:
    with pytest.raises(NotFound):
        rules().network_figure("SKU-1", "app", {}, 1)


@pytest.mark.parametrize(
    ("available", "low"),
    [(0, False), (1, True), (4, True), (5, True), (6, False), (100, False)],
)
def test_low_stock_only_above_zero_and_up_to_the_threshold(available: int, low: bool) -> None:
    config = rules(threshold=5)
    assert config.is_low("web", available) is low
    figure = config.figure(StockRow("SKU-1", "store-a", available, 0), "web", 1)
    assert (figure.available, figure.low_stock) == (available, low)


def test_low_stock_is_never_flagged_with_a_zero_threshold() -> None:
    assert rules(threshold=0).is_low("web", 1) is False


def test_the_network_low_stock_flag_looks_at_the_summed_figure() -> None:
    config = rules(threshold=5)
    rows = stock(("SKU-1", "store-a", 3, 0), ("SKU-1", "store-b", 3, 0))
    assert config.figure(rows[("SKU-1", "store-a")], "web", 1).low_stock is True
    assert config.network_figure("SKU-1", "web", rows, 1).low_stock is False


def test_channels_at_a_location_are_sorted_and_skip_closed_locations() -> None:
    assert rules().channels_at("store-a") == ["pos", "web"]
    assert rules().channels_at("store-b") == ["web"]
    assert rules(closed=frozenset({"store-a"})).channels_at("store-a") == []


# -- shrinkage --------------------------------------------------------------------


def lines(*held: int) -> list[Line]:
    """Active lines newest first, holding ``held`` units each."""
    return [Line(n, f"SKU-{n}", "store-a", quantity) for n, quantity in enumerate(held, 1)]


def test_nothing_is_shorted_while_held_fits_on_hand() -> None:
    assert lines_to_short(StockRow("SKU-1", "store-a", 10, 10), lines(4, 6)) == []


def test_the_newest_lines_are_shorted_until_the_rest_fits() -> None:
    newest_first = lines(2, 3, 5)  # 10 held
    assert lines_to_short(StockRow("SKU-1", "store-a", 9, 10), newest_first) == newest_first[:1]
    assert lines_to_short(StockRow("SKU-1", "store-a", 8, 10), newest_first) == newest_first[:1]
    assert lines_to_short(StockRow("SKU-1", "store-a", 7, 10), newest_first) == newest_first[:2]
    assert lines_to_short(StockRow("SKU-1", "store-a", 5, 10), newest_first) == newest_first[:2]
    assert lines_to_short(StockRow("SKU-1", "store-a", 4, 10), newest_first) == newest_first
    assert lines_to_short(StockRow("SKU-1", "store-a", 0, 10), newest_first) == newest_first


def test_a_loss_shorts_only_what_it_took_not_a_departure_awaiting_consumption() -> None:
    # 10 held on 10; a shipment of 3 lowered on-hand to 7 (its hold is consumed
    # later), then 1 unit was damaged: on-hand 6, gap 4, but only 1 was lost.
    newest_first = lines(3, 4, 3)
    row = StockRow("SKU-1", "store-a", 6, 10)
    assert lines_to_short(row, newest_first, at_most=1) == newest_first[:1]
    assert lines_to_short(row, newest_first, at_most=0) == []
    assert lines_to_short(row, newest_first, at_most=99) == newest_first[:2]


def test_shorting_counts_what_a_partly_consumed_line_still_holds() -> None:
    newest = Line(2, "SKU-1", "store-a", 10, consumed_quantity=9)  # holds 1
    older = Line(1, "SKU-1", "store-a", 4)
    row = StockRow("SKU-1", "store-a", on_hand=2, held=5)
    assert lines_to_short(row, [newest, older]) == [newest, older]


def test_end_lines_frees_what_each_key_held() -> None:
    held = reservation(
        Line(1, "SKU-1", "store-a", 5, consumed_quantity=2),
        Line(2, "SKU-2", "store-a", 4),
        Line(3, "SKU-3", "store-b", 1),
    )
    later = NOW + timedelta(minutes=3)
    ended, freed = end_lines(held, held.lines[:2], LineStatus.SHORT, later)
    assert freed == {("SKU-1", "store-a"): 3, ("SKU-2", "store-a"): 4}
    assert [line.status for line in ended.lines] == [
        LineStatus.SHORT,
        LineStatus.SHORT,
        LineStatus.ACTIVE,
    ]
    assert [line.held for line in ended.lines] == [0, 0, 1]
    assert ended.updated_at == later
    assert ended.status is LineStatus.ACTIVE
    assert held.lines[0].status is LineStatus.ACTIVE  # the original is untouched


# -- consuming ----------------------------------------------------------------------


def test_a_partial_consumption_keeps_the_line_active() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 5), kind=Kind.ORDER)
    after, line, used = consume(held, "SKU-1", "store-a", 2, NOW)
    assert used == 2
    assert line == Line(1, "SKU-1", "store-a", 5, consumed_quantity=2)
    assert line is not None and line.held == 3
    assert after.status is LineStatus.ACTIVE
    after, line, used = consume(after, "SKU-1", "store-a", 3, NOW)
    assert used == 3
    assert line is not None and line.status is LineStatus.CONSUMED and line.held == 0
    assert after.status is LineStatus.CONSUMED


def test_consuming_more_than_held_uses_only_what_is_held() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 5, consumed_quantity=1), kind=Kind.ORDER)
    after, line, used = consume(held, "SKU-1", "store-a", 9, NOW)
    assert used == 4
    assert line is not None
    assert (line.consumed_quantity, line.status) == (5, LineStatus.CONSUMED)
    assert after.lines == (line,)


def test_consuming_a_key_without_an_active_line_changes_nothing() -> None:
    held = reservation(
        Line(1, "SKU-1", "store-a", 5, status=LineStatus.RELEASED),
        Line(2, "SKU-2", "store-a", 5),
    )
    assert consume(held, "SKU-1", "store-a", 1, NOW) == (held, None, 0)
    assert consume(held, "SKU-2", "store-b", 1, NOW) == (held, None, 0)


def test_consuming_one_line_leaves_the_others_alone() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 2), Line(2, "SKU-2", "store-a", 3))
    after, _, _ = consume(held, "SKU-2", "store-a", 3, NOW)
    assert after.lines == (
        Line(1, "SKU-1", "store-a", 2),
        Line(2, "SKU-2", "store-a", 3, consumed_quantity=3, status=LineStatus.CONSUMED),
    )
    assert after.status is LineStatus.ACTIVE


# -- releasing ----------------------------------------------------------------------


def three_lines() -> Reservation:
    return reservation(
        Line(1, "SKU-1", "store-a", 1),
        Line(2, "SKU-2", "store-a", 2, status=LineStatus.CONSUMED, consumed_quantity=2),
        Line(3, "SKU-3", "store-b", 3),
    )


def test_release_without_line_numbers_chooses_every_active_line() -> None:
    held = three_lines()
    assert check_release(held, [], "") == [held.lines[0], held.lines[2]]


def test_release_of_named_lines_chooses_those_lines() -> None:
    held = three_lines()
    assert check_release(held, [3], "CUSTOMER_CANCELLED") == [held.lines[2]]
    assert check_release(held, [3, 1], "") == [held.lines[2], held.lines[0]]


@pytest.mark.parametrize(
    ("line_numbers", "reason", "fields"),
    [
        ([4], "", {"line_numbers[0]"}),
        ([1, 0], "", {"line_numbers[1]"}),
        ([1, 1], "", {"line_numbers"}),
        ([1], "cancelled", {"reason_code"}),
        ([9, 9], "x", {"reason_code", "line_numbers[0]", "line_numbers[1]", "line_numbers"}),
    ],
)
def test_release_of_bad_line_numbers_is_invalid(
    line_numbers: Sequence[int], reason: str, fields: set[str]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_release(three_lines(), line_numbers, reason)
    assert {violation.field for violation in caught.value.violations} == fields


def test_release_of_an_already_ended_line_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_release(three_lines(), [1, 2], "")
    assert not isinstance(caught.value, InvalidArgument)
    assert caught.value.reason == "LINE_ENDED"
    assert caught.value.metadata == {
        "reservation_id": "res-1",
        "line_number": "2",
        "status": "consumed",
    }


def test_release_of_a_reservation_with_no_active_line_is_ended() -> None:
    held = three_lines()
    released, _ = end_lines(held, check_release(held, [], ""), LineStatus.RELEASED, NOW)
    with pytest.raises(FailedPrecondition) as caught:
        check_release(released, [], "")
    assert caught.value.reason == "RESERVATION_ENDED"
    assert caught.value.metadata == {"reservation_id": "res-1", "status": "consumed"}


# -- status -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([LineStatus.ACTIVE], LineStatus.ACTIVE),
        ([LineStatus.EXPIRED, LineStatus.ACTIVE], LineStatus.ACTIVE),
        ([LineStatus.SHORT, LineStatus.RELEASED, LineStatus.ACTIVE], LineStatus.ACTIVE),
        ([LineStatus.CONSUMED, LineStatus.CONSUMED], LineStatus.CONSUMED),
        ([LineStatus.RELEASED, LineStatus.CONSUMED], LineStatus.CONSUMED),
        ([LineStatus.SHORT, LineStatus.CONSUMED], LineStatus.CONSUMED),
        ([LineStatus.SHORT, LineStatus.RELEASED], LineStatus.RELEASED),
        ([LineStatus.SHORT, LineStatus.EXPIRED], LineStatus.SHORT),
        ([LineStatus.SHORT], LineStatus.SHORT),
        ([LineStatus.EXPIRED, LineStatus.EXPIRED], LineStatus.EXPIRED),
    ],
)
def test_the_reservation_status_follows_its_lines(
    statuses: list[LineStatus], expected: LineStatus
) -> None:
    held = reservation(
        *(Line(n, f"SKU-{n}", "store-a", 1, status=s) for n, s in enumerate(statuses, 1))
    )
    assert held.status is expected
    assert held.active is (expected is LineStatus.ACTIVE)


def test_a_line_holds_only_while_active() -> None:
    line = Line(1, "SKU-1", "store-a", 5, consumed_quantity=2)
    assert line.held == 3
    for status in (LineStatus.RELEASED, LineStatus.EXPIRED, LineStatus.CONSUMED, LineStatus.SHORT):
        assert replace(line, status=status).held == 0


def test_with_lines_replaces_by_line_number_only() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 1), Line(2, "SKU-2", "store-a", 2))
    changed = held.with_lines([replace(held.lines[1], status=LineStatus.RELEASED)], NOW)
    assert [line.status for line in changed.lines] == [LineStatus.ACTIVE, LineStatus.RELEASED]
    assert changed.lines[0] is held.lines[0]


# -- releasing part of a line (short picks) ------------------------------------------


def test_releasing_part_of_a_line_keeps_the_rest_held() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 3), kind=Kind.ORDER)
    after, line, freed = release_units(held, "SKU-1", "store-a", 1, NOW)
    assert freed == 1
    assert line == Line(1, "SKU-1", "store-a", 3, released_quantity=1)
    assert line is not None and line.held == 2
    assert after.status is LineStatus.ACTIVE


def test_a_line_partly_released_then_consumed_ends_consumed() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 3, released_quantity=1), kind=Kind.ORDER)
    after, line, used = consume(held, "SKU-1", "store-a", 5, NOW)
    assert used == 2
    assert line is not None
    assert (line.consumed_quantity, line.released_quantity) == (2, 1)
    assert line.status is LineStatus.CONSUMED and line.held == 0
    assert after.status is LineStatus.CONSUMED


def test_releasing_every_unit_of_a_line_ends_it_released_and_frees_only_what_it_held() -> None:
    held = reservation(Line(1, "SKU-1", "store-a", 3), kind=Kind.ORDER)
    after, line, freed = release_units(held, "SKU-1", "store-a", 9, NOW)
    assert freed == 3
    assert line is not None and line.status is LineStatus.RELEASED
    assert after.status is LineStatus.RELEASED
    assert release_units(after, "SKU-1", "store-a", 1, NOW) == (after, None, 0)


# -- departing units (a shipment's two events, in either order) ----------------------


def test_units_consumed_before_the_ledger_counts_them_leaving_stay_unavailable() -> None:
    # fulfilment's event first: 3 consumed, so 3 departing until the ledger's movement
    totals, change = departing_change(0, 0, more_consumed=3)
    assert (totals, change) == ((3, 0), 3)
    totals, change = departing_change(*totals, more_departed=3)
    assert (totals, change) == ((3, 3), -3)


def test_units_the_ledger_counted_leaving_first_never_become_departing() -> None:
    totals, change = departing_change(0, 0, more_departed=2)
    assert (totals, change) == ((0, 2), 0)
    totals, change = departing_change(*totals, more_consumed=2)
    assert (totals, change) == ((2, 2), 0)


def test_departing_units_count_against_availability_until_they_are_gone() -> None:
    row = StockRow("SKU-1", "store-a", on_hand=5, held=1, departing=3)
    figure = rules().figure(row, "web", 1)
    assert (figure.on_hand, figure.reserved, figure.available) == (5, 4, 1)
    assert lines_to_short(replace(row, on_hand=3), lines(1)) == lines(1)
