"""The order model of routing: orders, allocations, their rules and returns.

Pure: the handlers load an order, change it here and store it. Where stock
comes from is the planner's business (``services.routing.planner``); this
module knows what an order still needs, what a fulfilment event does to it and
what happens to a returned item.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum

from omnistock.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from omnistock.geo import haversine_km
from omnistock.validation import check_count, check_id, check_reason, check_text, shown
from services.routing.planner import (
    FulfilmentType,
    GeoPoint,
    Location,
    Method,
    Need,
    Rules,
    SourceKind,
)

MAX_LINES = 100
MAX_QUANTITY = 10_000
MAX_RETURN_LINES = 100
MAX_RULE_LOCATIONS = 2_000


class OrderStatus(Enum):
    """Where an order stands."""

    ROUTING = "routing"
    ROUTED = "routed"
    NEEDS_ATTENTION = "needs_attention"
    FULFILLED = "fulfilled"
    CANCELLED = "cancelled"


class AllocationStatus(Enum):
    """Where one allocation stands."""

    HELD = "held"
    SHIPPED = "shipped"
    COLLECTED = "collected"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# Allocations that still answer for their units: open work or done work. (An
# expired pickup's units are counted as cancelled on their line instead.)
LIVE = frozenset({AllocationStatus.HELD, AllocationStatus.SHIPPED, AllocationStatus.COLLECTED})


class ItemCondition(Enum):
    """A returned item's condition as the store judges it."""

    SELLABLE = "sellable"
    DAMAGED = "damaged"
    NEEDS_INSPECTION = "needs_inspection"


class Disposition(Enum):
    """What happens to a returned item."""

    RESTOCK = "restock"
    SEND_TO_DISTRIBUTION_CENTRE = "send_to_distribution_centre"
    QUARANTINE = "quarantine"
    WRITE_OFF = "write_off"


@dataclass(frozen=True)
class Customer:
    """Where a home delivery goes, or where the customer collects."""

    position: GeoPoint | None = None
    postcode: str = ""
    country: str = ""
    pickup_location_id: str = ""


@dataclass(frozen=True)
class LineInput:
    """One order line as the channel sends it."""

    sku: str
    quantity: int


@dataclass(frozen=True)
class OrderInput:
    """An order as the channel sends it (RouteOrder and QuoteOrder)."""

    channel: str
    method: Method | None
    customer: Customer
    lines: tuple[LineInput, ...]
    allow_split: bool = True
    deliver_by: datetime | None = None
    cart_reservation_id: str = ""
    order_id: str = ""


@dataclass(frozen=True)
class OrderLine:
    """One line of a kept order, with what became of its units."""

    line_number: int
    sku: str
    quantity: int
    cancelled: int = 0
    fulfilled: int = 0
    returned: int = 0


@dataclass(frozen=True)
class Allocation:
    """Units of one line at one source, held by one reservation line."""

    allocation_id: str
    line_number: int
    sku: str
    location_id: str
    quantity: int
    type: FulfilmentType
    pickup_location_id: str
    reservation_id: str
    reservation_line: int
    status: AllocationStatus
    plan_number: int
    fulfilled: int = 0


@dataclass(frozen=True)
class Order:
    """An order as routing keeps it."""

    order_id: str
    channel: str
    method: Method
    customer: Customer
    lines: tuple[OrderLine, ...]
    status: OrderStatus
    allow_split: bool = True
    deliver_by: datetime | None = None
    cart_reservation_id: str = ""
    plan_number: int = 0
    failed: tuple[str, ...] = ()
    attention_reason: str = ""
    allocations: tuple[Allocation, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def line(self, line_number: int) -> OrderLine:
        """The line with ``line_number``."""
        return next(line for line in self.lines if line.line_number == line_number)

    def held(self) -> list[Allocation]:
        """Allocations still waiting for fulfilment."""
        return [a for a in self.allocations if a.status is AllocationStatus.HELD]


# -- validation ------------------------------------------------------------------------


def check_order(order: OrderInput, *, needs_id: bool) -> None:
    """Reject a malformed order whole, naming every problem."""
    problems: list[FieldViolation] = []
    if needs_id:
        problems += check_id(order.order_id, "order_id", "the order id")
    problems += check_id(order.channel, "channel", "the channel")
    if order.method is None:
        problems.append(
            FieldViolation("delivery_method", "choose SHIP_TO_HOME or CLICK_AND_COLLECT")
        )
    elif order.method is Method.SHIP_TO_HOME:
        problems += _check_address(order.customer)
    else:
        problems += check_id(
            order.customer.pickup_location_id, "customer.pickup_location_id", "the pickup store"
        )
    if not order.lines:
        problems.append(FieldViolation("lines", "an order needs at least one line"))
    if len(order.lines) > MAX_LINES:
        problems.append(FieldViolation("lines", f"at most {MAX_LINES} lines per order"))
    seen: dict[str, int] = {}
    for i, line in enumerate(order.lines[:MAX_LINES]):
        problems += check_id(line.sku, f"lines[{i}].sku", "the sku")
        if line.quantity < 1:
            problems.append(FieldViolation(f"lines[{i}].quantity", "must be at least 1"))
        elif line.quantity > MAX_QUANTITY:
            problems.append(FieldViolation(f"lines[{i}].quantity", f"at most {MAX_QUANTITY}"))
        if line.sku in seen:
            problems.append(
                FieldViolation(f"lines[{i}].sku", f"repeats lines[{seen[line.sku]}]; add them up")
            )
        seen.setdefault(line.sku, i)
    if order.cart_reservation_id:
        problems += check_id(
            order.cart_reservation_id, "cart_reservation_id", "the cart reservation id"
        )
    if problems:
        raise InvalidArgument(problems)


def _check_address(customer: Customer) -> list[FieldViolation]:
    problems: list[FieldViolation] = []
    point = customer.position
    if point is None:
        problems.append(
            FieldViolation("customer.position", "a home delivery needs the address's position")
        )
    elif not (-90 <= point.latitude <= 90 and -180 <= point.longitude <= 180):
        problems.append(
            FieldViolation("customer.position", "latitude must be within ±90, longitude ±180")
        )
    elif point.latitude == 0 and point.longitude == 0:
        problems.append(
            FieldViolation("customer.position", "0,0 is not an address; the position is missing")
        )
    problems += check_text(customer.postcode, "customer.postcode", 16)
    if customer.country and (len(customer.country) != 2 or not customer.country.isalpha()):
        problems.append(FieldViolation("customer.country", "use an ISO 3166-1 alpha-2 code"))
    return problems


def check_pickup_store(order: OrderInput, locations: Mapping[str, Location]) -> None:
    """A click-and-collect order must name an open store that offers it."""
    if order.method is not Method.CLICK_AND_COLLECT:
        return
    store_id = order.customer.pickup_location_id
    store = locations.get(store_id)
    path = "customer.pickup_location_id"
    if store is None:
        raise InvalidArgument([FieldViolation(path, f"unknown location {store_id!r}")])
    if store.kind is not SourceKind.STORE:
        raise InvalidArgument([FieldViolation(path, f"{store_id} is not a store")])
    if not store.click_and_collect:
        raise InvalidArgument(
            [FieldViolation(path, f"{store.name} does not offer click-and-collect")]
        )
    if store.closed:
        raise FailedPrecondition(
            "LOCATION_CLOSED",
            f"{store.name} is closed; choose another store.",
            {"location_id": store_id},
        )


def check_rules(rules: Rules, known: Iterable[str]) -> None:
    """Reject rules that make no sense, naming every problem."""
    problems: list[FieldViolation] = []
    money_fields = (
        "shipment_cost_cents",
        "cost_per_km_cents",
        "store_handling_cents",
        "distribution_centre_handling_cents",
        "transfer_cost_cents",
        "priority_step_cents",
    )
    for name in money_fields:
        if not 0 <= getattr(rules, name) <= 1_000_000:
            problems.append(FieldViolation(f"rules.{name}", "must be between 0 and 1000000 cents"))
    if not 0 <= rules.split_margin_percent <= 100:
        problems.append(FieldViolation("rules.split_margin_percent", "must be 0-100"))
    for name in (
        "max_ship_from_store_km",
        "distribution_centre_delivery_days",
        "store_delivery_days",
        "transfer_days",
        "pickup_ready_hours",
        "nearby_store_km",
    ):
        if not 0 <= getattr(rules, name) <= 10_000:
            problems.append(FieldViolation(f"rules.{name}", "must be between 0 and 10000"))
    if not 0 <= rules.max_replans <= 10:
        problems.append(FieldViolation("rules.max_replans", "must be 0-10"))
    if not _valid_zone(rules.time_zone):
        problems.append(
            FieldViolation("rules.time_zone", f"{shown(rules.time_zone)} is not an IANA time zone")
        )
    known_ids = set(known)
    named = [
        *(("rules.excluded_location_ids", loc) for loc in sorted(rules.excluded_location_ids)),
        *(("rules.priorities", loc) for loc in sorted(rules.priorities)),
    ]
    if len(named) > MAX_RULE_LOCATIONS:
        problems.append(FieldViolation("rules", f"at most {MAX_RULE_LOCATIONS} locations named"))
    for path, loc in named[:MAX_RULE_LOCATIONS]:
        # A malformed id is named cut short: an error never echoes a huge string.
        malformed = check_id(loc, path, "the location id")
        if malformed:
            problems += malformed
        elif loc not in known_ids:
            problems.append(FieldViolation("rules", f"unknown location {loc!r}"))
    if problems:
        raise InvalidArgument(problems)


def _valid_zone(name: str) -> bool:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not name or len(name) > 64:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def check_cancel(order: Order, line_numbers: Sequence[int], reason_code: str) -> list[int]:
    """The lines a cancel applies to; refuses unknown or finished lines."""
    problems = check_reason(reason_code, "reason_code", required=True)
    problems += check_count(len(line_numbers), "line_numbers", MAX_LINES, "line numbers")
    numbers = {line.line_number for line in order.lines}
    for i, n in enumerate(line_numbers[:MAX_LINES]):
        if n not in numbers:
            problems.append(FieldViolation(f"line_numbers[{i}]", f"the order has no line {n}"))
    if problems:
        raise InvalidArgument(problems)
    chosen = sorted(set(line_numbers)) or sorted(numbers)
    cancellable = {n: cancellable_units(order, n) for n in chosen}
    if not any(cancellable.values()):
        raise FailedPrecondition(
            "ORDER_ENDED",
            f"Order {order.order_id} has nothing left to cancel on "
            + ("those lines" if line_numbers else "any line")
            + ": it was shipped, collected or cancelled already.",
            {"order_id": order.order_id},
        )
    kept = set(numbers) - set(chosen)
    for a in order.allocations:
        if a.line_number in chosen and _in_transfer(a):
            shared = [
                b.line_number
                for b in order.allocations
                if b.line_number in kept
                and b.type is FulfilmentType.TRANSFER_TO_STORE
                and b.status is AllocationStatus.SHIPPED
                and (b.location_id, b.pickup_location_id) == (a.location_id, a.pickup_location_id)
            ]
            if shared:
                raise FailedPrecondition(
                    "TRANSFER_ON_ITS_WAY",
                    f"Line {a.line_number} travels to {a.pickup_location_id} in one transfer "
                    f"with line {shared[0]}; cancel both lines or neither until it is collected "
                    "or the pickup expires.",
                    {"order_id": order.order_id, "line_number": str(a.line_number)},
                )
    return [n for n in chosen if cancellable[n]]


# -- what an order still needs -------------------------------------------------------


def open_units(order: Order, line_number: int) -> int:
    """Units of a line neither cancelled nor answered for by a live allocation."""
    line = order.line(line_number)
    live = sum(
        a.quantity for a in order.allocations if a.line_number == line_number and a.status in LIVE
    )
    return max(0, line.quantity - line.cancelled - live)


def _in_transfer(a: Allocation) -> bool:
    """Goods on their way to, or waiting at, the pickup store (not yet the customer's)."""
    return a.type is FulfilmentType.TRANSFER_TO_STORE and a.status is AllocationStatus.SHIPPED


def cancellable_units(order: Order, line_number: int) -> int:
    """Units of a line the customer has not got: not yet left their source, or transferred
    to the pickup store and not collected."""
    held = sum(a.quantity - a.fulfilled for a in order.held() if a.line_number == line_number)
    moving = sum(
        a.quantity for a in order.allocations if _in_transfer(a) and a.line_number == line_number
    )
    return held + moving + open_units(order, line_number)


def open_needs(order: Order) -> tuple[Need, ...]:
    """What the planner must still source for ``order``."""
    needs = (
        Need(line.line_number, line.sku, open_units(order, line.line_number))
        for line in order.lines
    )
    return tuple(n for n in needs if n.quantity > 0)


def settle(order: Order, now: datetime) -> Order:
    """The order with its status worked out from its lines and allocations."""
    if all(line.cancelled >= line.quantity for line in order.lines):
        status = OrderStatus.CANCELLED
    elif open_needs(order):
        status = OrderStatus.NEEDS_ATTENTION
    elif order.held() or any(
        a.status is AllocationStatus.SHIPPED and a.type is FulfilmentType.TRANSFER_TO_STORE
        for a in order.allocations
    ):
        status = OrderStatus.ROUTED
    else:
        status = OrderStatus.FULFILLED
    reason = order.attention_reason if status is OrderStatus.NEEDS_ATTENTION else ""
    return replace(order, status=status, attention_reason=reason, updated_at=now)


# -- fulfilment facts ------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """Units of one SKU in a fulfilment fact."""

    sku: str
    quantity: int


def _replace_allocations(
    order: Order, changed: Mapping[str, Allocation], added: Sequence[Allocation] = ()
) -> Order:
    allocations = tuple(changed.get(a.allocation_id, a) for a in order.allocations) + tuple(added)
    return replace(order, allocations=allocations)


def _add_to_lines(order: Order, amounts: Mapping[int, int], attr: str) -> Order:
    lines = tuple(
        replace(line, **{attr: getattr(line, attr) + amounts[line.line_number]})
        if line.line_number in amounts
        else line
        for line in order.lines
    )
    return replace(order, lines=lines)


def record_shipped(order: Order, location_id: str, goods: Sequence[Quantity]) -> Order:
    """Goods left ``location_id``: to the customer, or on a transfer to the pickup store."""
    changed: dict[str, Allocation] = {}
    delivered: dict[int, int] = {}
    for item in goods:
        left = item.quantity
        for a in order.held():
            if left == 0 or a.location_id != location_id or a.sku != item.sku:
                continue
            if a.type is FulfilmentType.PICKUP_AT_STORE:
                continue  # a pickup ends with the collection, not a shipment
            take = min(left, a.quantity - a.fulfilled)
            done = a.fulfilled + take
            status = AllocationStatus.SHIPPED if done >= a.quantity else a.status
            changed[a.allocation_id] = replace(a, fulfilled=done, status=status)
            left -= take
            if a.type is not FulfilmentType.TRANSFER_TO_STORE:
                delivered[a.line_number] = delivered.get(a.line_number, 0) + take
    return _add_to_lines(_replace_allocations(order, changed), delivered, "fulfilled")


def transferred_to_pickup(order: Order) -> dict[tuple[str, str], int]:
    """Units per (sku, pickup store) on their way to, or waiting at, the pickup store.

    Once a transfer arrives the reservation service holds its goods at the
    pickup store for the order, in a hold of its own that no allocation names;
    these units say how much of such holds the order still stands for.
    """
    units: dict[tuple[str, str], int] = {}
    for a in order.allocations:
        if a.type is FulfilmentType.TRANSFER_TO_STORE and a.status is AllocationStatus.SHIPPED:
            key = (a.sku, a.pickup_location_id)
            units[key] = units.get(key, 0) + a.quantity
    return units


def record_collected(order: Order, pickup_location_id: str, goods: Sequence[Quantity]) -> Order:
    """The customer collected at the pickup store: pickups and transfers into it end."""
    changed: dict[str, Allocation] = {}
    collected: dict[int, int] = {}
    waiting = [
        a
        for a in order.allocations
        if a.pickup_location_id == pickup_location_id
        and (
            (a.type is FulfilmentType.PICKUP_AT_STORE and a.status is AllocationStatus.HELD)
            or (
                a.type is FulfilmentType.TRANSFER_TO_STORE
                and a.status in (AllocationStatus.HELD, AllocationStatus.SHIPPED)
            )
        )
    ]
    for item in goods:
        left = item.quantity
        for a in waiting:
            if left == 0 or a.sku != item.sku or a.allocation_id in changed:
                continue
            take = min(left, a.quantity)
            changed[a.allocation_id] = replace(a, fulfilled=take, status=AllocationStatus.COLLECTED)
            collected[a.line_number] = collected.get(a.line_number, 0) + take
            left -= take
    return _add_to_lines(_replace_allocations(order, changed), collected, "fulfilled")


def record_pickup_expired(order: Order, pickup_location_id: str) -> Order:
    """The customer did not come: the pickup's allocations end, their units count
    as cancelled on their lines; nothing is rerouted."""
    changed = {
        a.allocation_id: replace(a, status=AllocationStatus.EXPIRED)
        for a in order.allocations
        if a.pickup_location_id == pickup_location_id
        and a.status in (AllocationStatus.HELD, AllocationStatus.SHIPPED)
    }
    gone: dict[int, int] = {}
    for a in changed.values():
        gone[a.line_number] = gone.get(a.line_number, 0) + a.quantity
    return _add_to_lines(_replace_allocations(order, changed), gone, "cancelled")


def _end_open_part(
    a: Allocation, units: int, status: AllocationStatus, ids: Iterator[str]
) -> tuple[Allocation, Allocation | None]:
    """End ``units`` of an allocation's open (not yet fulfilled) units with ``status``.

    The allocation keeps the rest; the ended part becomes an allocation of its
    own on the same reservation line. One whose units are all gone or done
    ends whole (SHIPPED once what is left was shipped).
    """
    units = min(units, a.quantity - a.fulfilled)
    if units == a.quantity:
        return replace(a, status=status), None
    kept = replace(a, quantity=a.quantity - units)
    if kept.fulfilled >= kept.quantity:
        kept = replace(kept, status=AllocationStatus.SHIPPED)
    ended = replace(a, allocation_id=next(ids), quantity=units, fulfilled=0, status=status)
    return kept, ended


def _fail(
    order: Order, failures: Sequence[tuple[Allocation, int]], new_ids: Iterable[str]
) -> Order:
    """Fail units of allocations; their sources are excluded from now on."""
    ids = iter(new_ids)
    changed: dict[str, Allocation] = {}
    added: list[Allocation] = []
    failed = list(order.failed)
    for a, units in failures:
        current = changed.get(a.allocation_id, a)
        if units <= 0 or current.status is not AllocationStatus.HELD:
            continue
        kept, ended = _end_open_part(current, units, AllocationStatus.FAILED, ids)
        changed[a.allocation_id] = kept
        if ended is not None:
            added.append(ended)
        if a.location_id not in failed:
            failed.append(a.location_id)
    if not changed:
        return order
    return replace(_replace_allocations(order, changed, added), failed=tuple(failed))


def record_failure(
    order: Order,
    location_id: str,
    shortfall: Sequence[Quantity] | None,
    new_ids: Iterable[str],
) -> Order:
    """A source failed: all its open work (``shortfall`` None) or those units of it.

    The failed units become open need again and the source is excluded from now
    on. Units already shipped stay shipped. A short pick splits an allocation:
    the picked part stays HELD, the missing part is kept as a FAILED
    allocation on the same reservation line.
    """
    mine = [a for a in order.held() if a.location_id == location_id]
    if shortfall is None:
        return _fail(order, [(a, a.quantity - a.fulfilled) for a in mine], new_ids)
    failures: list[tuple[Allocation, int]] = []
    for item in shortfall:
        left = item.quantity
        for a in mine:
            if left == 0 or a.sku != item.sku:
                continue
            missing = min(left, a.quantity - a.fulfilled)
            if missing > 0:
                failures.append((a, missing))
                left -= missing
    return _fail(order, failures, new_ids)


def record_hold_short(
    order: Order, reservation_id: str, lines: Iterable[int], new_ids: Iterable[str]
) -> tuple[Order, list[str]]:
    """Reservation lines fell short: exactly their allocations fail at their sources."""
    numbers = set(lines)
    hit = [
        a
        for a in order.held()
        if a.reservation_id == reservation_id and a.reservation_line in numbers
    ]
    sources = list(dict.fromkeys(a.location_id for a in hit))
    return _fail(order, [(a, a.quantity - a.fulfilled) for a in hit], new_ids), sources


def cancel_lines(
    order: Order, line_numbers: Sequence[int], new_ids: Iterable[str]
) -> tuple[Order, list[Allocation]]:
    """Cancel what the customer has not got on ``line_numbers``; the allocations cancelled.

    Units already shipped to the customer stay shipped; only the open part of
    an allocation ends. Goods transferred to the pickup store are cancelled
    whole (they stay in that store's stock).
    """
    ids = iter(new_ids)
    chosen = set(line_numbers)
    amounts = {n: cancellable_units(order, n) for n in chosen}
    changed: dict[str, Allocation] = {}
    added: list[Allocation] = []
    cancelled: list[Allocation] = []
    for a in order.allocations:
        if a.line_number in chosen and _in_transfer(a):
            changed[a.allocation_id] = replace(a, status=AllocationStatus.CANCELLED)
            cancelled.append(changed[a.allocation_id])
    for a in order.held():
        if a.line_number not in chosen or a.quantity == a.fulfilled:
            continue
        kept, ended = _end_open_part(a, a.quantity - a.fulfilled, AllocationStatus.CANCELLED, ids)
        changed[a.allocation_id] = kept
        if ended is not None:
            added.append(ended)
        cancelled.append(ended or kept)
    order = _replace_allocations(order, changed, added)
    return _add_to_lines(order, amounts, "cancelled"), cancelled


# -- returns ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReturnInput:
    """One returned line as the store enters it."""

    sku: str
    quantity: int
    condition: ItemCondition | None


@dataclass(frozen=True)
class ReturnedLine:
    """One returned line with its disposition."""

    line_number: int
    sku: str
    quantity: int
    condition: ItemCondition
    disposition: Disposition
    destination_location_id: str
    transfer_id: str
    explanation: str


@dataclass(frozen=True)
class OrderReturn:
    """A routed return."""

    return_id: str
    order_id: str
    location_id: str
    lines: tuple[ReturnedLine, ...]
    created_at: datetime


def check_return_request(
    return_id: str, order_id: str, location_id: str, lines: Sequence[ReturnInput]
) -> None:
    """Reject a malformed return whole before anything is read."""
    problems = check_id(return_id, "return_id", "the return id")
    problems += check_id(order_id, "order_id", "the order id")
    problems += check_id(location_id, "location_id", "the store")
    if not lines:
        problems.append(FieldViolation("lines", "a return needs at least one line"))
    if len(lines) > MAX_RETURN_LINES:
        problems.append(FieldViolation("lines", f"at most {MAX_RETURN_LINES} lines per return"))
    for i, line in enumerate(lines[:MAX_RETURN_LINES]):
        problems += check_id(line.sku, f"lines[{i}].sku", "the sku")
        if line.quantity < 1:
            problems.append(FieldViolation(f"lines[{i}].quantity", "must be at least 1"))
        elif line.quantity > MAX_QUANTITY:
            problems.append(FieldViolation(f"lines[{i}].quantity", f"at most {MAX_QUANTITY}"))
        if line.condition is None:
            problems.append(
                FieldViolation(f"lines[{i}].condition", "say SELLABLE, DAMAGED or NEEDS_INSPECTION")
            )
    if problems:
        raise InvalidArgument(problems)


def check_return_store(location_id: str, locations: Mapping[str, Location]) -> Location:
    """The store a return is handed in at: known, a store, accepting returns."""
    store = locations.get(location_id)
    if store is None:
        raise InvalidArgument([FieldViolation("location_id", f"unknown location {location_id!r}")])
    if store.kind is not SourceKind.STORE:
        raise InvalidArgument([FieldViolation("location_id", f"{location_id} is not a store")])
    if not store.accepts_returns:
        raise FailedPrecondition(
            "NOT_RETURNABLE",
            f"{store.name} does not take returns; send the customer to another store.",
            {"location_id": location_id},
        )
    return store


def match_return(order: Order, lines: Sequence[ReturnInput]) -> list[tuple[int, ReturnInput]]:
    """Each returned line's order line; refuses more than was fulfilled and not returned."""
    by_sku = {line.sku: line for line in order.lines}
    problems: list[FieldViolation] = []
    asked: dict[str, int] = {}
    for i, line in enumerate(lines):
        if line.sku not in by_sku:
            problems.append(
                FieldViolation(f"lines[{i}].sku", f"{line.sku} is not on order {order.order_id}")
            )
            continue
        asked[line.sku] = asked.get(line.sku, 0) + line.quantity
    if problems:
        raise InvalidArgument(problems)
    for sku, quantity in asked.items():
        order_line = by_sku[sku]
        returnable = order_line.fulfilled - order_line.returned
        if quantity > returnable:
            raise FailedPrecondition(
                "NOT_RETURNABLE",
                f"{quantity} of {sku} returned, but only {returnable} were delivered and not "
                "returned yet.",
                {"sku": sku, "returned": str(quantity), "returnable": str(returnable)},
            )
    return [(by_sku[line.sku].line_number, line) for line in lines]


def dispose(
    condition: ItemCondition,
    carried: bool,
    store: Location,
    locations: Mapping[str, Location],
) -> tuple[Disposition, str, str]:
    """What happens to a returned item: (disposition, destination, explanation)."""
    if condition is ItemCondition.DAMAGED:
        return Disposition.WRITE_OFF, store.location_id, "damaged: written off at the store"
    if condition is ItemCondition.NEEDS_INSPECTION:
        return (
            Disposition.QUARANTINE,
            store.location_id,
            "kept in quarantine at the store until someone inspects it",
        )
    if carried:
        return Disposition.RESTOCK, store.location_id, f"back on sale at {store.name}"
    centre = nearest_centre(store, locations)
    if centre is None:
        return (
            Disposition.QUARANTINE,
            store.location_id,
            f"{store.name} does not carry it and no distribution centre takes returns: kept aside",
        )
    distance = haversine_km(store.position, centre.position)
    return (
        Disposition.SEND_TO_DISTRIBUTION_CENTRE,
        centre.location_id,
        f"{store.name} does not carry it: sent on to {centre.name} ({distance:.0f} km)",
    )


def nearest_centre(store: Location, locations: Mapping[str, Location]) -> Location | None:
    """The open distribution centre taking returns nearest to ``store`` (ties by id)."""
    centres = [
        loc
        for loc in locations.values()
        if loc.kind is SourceKind.DISTRIBUTION_CENTRE and loc.accepts_returns and not loc.closed
    ]
    return min(
        centres,
        key=lambda c: (haversine_km(store.position, c.position), c.location_id),
        default=None,
    )


def record_return(order: Order, returned: Sequence[ReturnedLine]) -> Order:
    """The order with the returned units counted on its lines."""
    amounts: dict[int, int] = {}
    for line in returned:
        amounts[line.line_number] = amounts.get(line.line_number, 0) + line.quantity
    return _add_to_lines(order, amounts, "returned")


def not_found(order_id: str) -> NotFound:
    """The error for an unknown order."""
    return NotFound("ORDER_NOT_FOUND", f"No order {order_id!r}.", {"order_id": order_id})
