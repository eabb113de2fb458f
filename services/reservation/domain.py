"""Pure rules of the reservation service: no protobuf, asyncpg or NATS here.

Available-to-promise (ATP) of a SKU at a location, for a channel, is
``on_hand - held - departing - safety stock`` and never below zero (departing:
units whose hold a shipment used before the ledger counted them leaving, see
``departing_change``); a channel's network
figure sums it over the open locations the channel sells from. A hold is
placed only when every line fits (all or nothing): the no-oversell invariant
is that, after any hold, ``held <= on_hand - safety stock`` at every
(sku, location) the hold touched, for the channel that placed it.

When on-hand falls below what is held (damage, a cycle count), the newest
active lines at that (sku, location) are marked short until the rest fits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cached_property

from omnistock.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from omnistock.validation import check_id, check_reason

MAX_LINES = 100
MAX_QUANTITY = 1_000_000
MAX_AVAILABILITY_SKUS = 1000
MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(days=7)
MAX_SAFETY_STOCK = 1_000_000
MAX_CHANNEL_LOCATIONS = 10_000
MAX_LISTED_RESERVATIONS = 100

StockKey = tuple[str, str]  # (sku, location_id)


class Kind(StrEnum):
    """What a reservation holds stock for."""

    CART = "cart"
    ORDER = "order"


class LineStatus(StrEnum):
    """Where a line stands; every status but ACTIVE is final."""

    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    CONSUMED = "consumed"
    SHORT = "short"


@dataclass(frozen=True)
class ReserveLine:
    """One line of a Reserve command."""

    sku: str
    location_id: str
    quantity: int

    @property
    def key(self) -> StockKey:
        """The (sku, location) the line holds."""
        return (self.sku, self.location_id)


@dataclass(frozen=True)
class Reserve:
    """Hold every line or none, for a channel and a reference."""

    request_id: str
    channel: str
    reference: str
    kind: Kind | None
    lines: tuple[ReserveLine, ...]
    ttl: timedelta | None

    def content(self) -> bytes:
        """The canonical content the request id is bound to."""
        fields = asdict(self)
        fields.pop("request_id")
        fields["ttl"] = self.ttl.total_seconds() if self.ttl is not None else None
        return json.dumps(fields, sort_keys=True).encode()


@dataclass(frozen=True)
class ListReservations:
    """A channel's reservations with one reference, optionally of some statuses only."""

    channel: str
    reference: str
    # None stands for a status the domain does not know (unspecified or unknown).
    statuses: tuple[LineStatus | None, ...] = ()


@dataclass(frozen=True)
class Line:
    """A line of a stored reservation."""

    line_number: int
    sku: str
    location_id: str
    quantity: int
    consumed_quantity: int = 0
    status: LineStatus = LineStatus.ACTIVE
    # Units let go while the rest of the line stays held (a short pick).
    released_quantity: int = 0

    @property
    def key(self) -> StockKey:
        """The (sku, location) the line holds."""
        return (self.sku, self.location_id)

    @property
    def held(self) -> int:
        """Units the line holds now."""
        if self.status is not LineStatus.ACTIVE:
            return 0
        return self.quantity - self.consumed_quantity - self.released_quantity

    def settled(self, consumed: int, released: int) -> Line:
        """The line with these totals; it ends once no unit is left held.

        It ends CONSUMED when any unit of it left with the goods, RELEASED when
        none did.
        """
        status = LineStatus.ACTIVE
        if consumed + released >= self.quantity:
            status = LineStatus.CONSUMED if consumed > 0 else LineStatus.RELEASED
        return replace(self, consumed_quantity=consumed, released_quantity=released, status=status)


@dataclass(frozen=True)
class Reservation:
    """A multi-line hold."""

    reservation_id: str
    channel: str
    reference: str
    kind: Kind
    lines: tuple[Line, ...]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None

    @property
    def status(self) -> LineStatus:
        """ACTIVE while any line holds stock; otherwise the final outcome."""
        statuses = {line.status for line in self.lines}
        for status in (
            LineStatus.ACTIVE,
            LineStatus.CONSUMED,
            LineStatus.RELEASED,
            LineStatus.SHORT,
        ):
            if status in statuses:
                return status
        return LineStatus.EXPIRED

    @property
    def active(self) -> bool:
        """Whether any line still holds stock."""
        return self.status is LineStatus.ACTIVE

    def with_lines(self, lines: Iterable[Line], at: datetime) -> Reservation:
        """A copy with ``lines`` replacing the lines of the same number."""
        changed = {line.line_number: line for line in lines}
        return replace(
            self,
            lines=tuple(changed.get(line.line_number, line) for line in self.lines),
            updated_at=at,
        )


@dataclass(frozen=True)
class ChannelRules:
    """How one channel sells."""

    channel: str
    location_ids: tuple[str, ...]
    cart_ttl: timedelta
    safety_stock: int = 0
    low_stock_threshold: int = 0

    @cached_property
    def location_set(self) -> frozenset[str]:
        """The locations as a set: membership is asked per location and figure."""
        return frozenset(self.location_ids)


@dataclass
class StockRow:
    """Sellable on-hand and held units at one (sku, location)."""

    sku: str
    location_id: str
    on_hand: int = 0
    held: int = 0
    departing: int = 0

    @property
    def key(self) -> StockKey:
        """The (sku, location) of the row."""
        return (self.sku, self.location_id)

    @property
    def committed(self) -> int:
        """Units promised away: held, or on their way out but still counted on hand."""
        return self.held + self.departing


@dataclass(frozen=True)
class Figure:
    """Available-to-promise of one SKU for one channel (or a location's own figure)."""

    sku: str
    location_id: str  # "" for a channel's network figure
    channel: str  # "" for a location's own figure
    on_hand: int
    reserved: int
    safety_stock: int
    available: int
    low_stock: bool
    version: int


@dataclass(frozen=True)
class Rules:
    """Every channel's rules and every location's safety stock, as one value."""

    channels: Mapping[str, ChannelRules] = field(default_factory=dict)
    location_safety: Mapping[str, int] = field(default_factory=dict)
    closed_locations: frozenset[str] = frozenset()
    # Every location the ledger announced (open or closed).
    locations: frozenset[str] = frozenset()

    def channel(self, channel: str) -> ChannelRules:
        """The channel's rules, or NOT_FOUND."""
        rules = self.channels.get(channel)
        if rules is None:
            raise NotFound(
                "CHANNEL_NOT_FOUND",
                f"Channel {channel!r} has no rules; an administrator sets them with "
                "SetChannelRules.",
                {"channel": channel},
            )
        return rules

    def safety(self, channel: str, location_id: str) -> int:
        """Units kept back from ``channel`` at ``location_id`` ("" = the location's own)."""
        own = self.location_safety.get(location_id, 0)
        rules = self.channels.get(channel)
        return own + (rules.safety_stock if rules else 0)

    def sells_from(self, channel: str, location_id: str) -> bool:
        """Whether ``channel`` may promise stock at ``location_id`` now."""
        rules = self.channels.get(channel)
        return (
            rules is not None
            and location_id in rules.location_set
            and location_id not in self.closed_locations
        )

    def channels_at(self, location_id: str) -> list[str]:
        """The channels selling from ``location_id``, sorted."""
        return sorted(c for c in self.channels if self.sells_from(c, location_id))

    def figure(self, row: StockRow, channel: str, version: int) -> Figure:
        """ATP of ``row`` for ``channel`` ("" = the location's own figure)."""
        safety = self.safety(channel, row.location_id)
        open_ = row.location_id not in self.closed_locations
        available = max(0, row.on_hand - row.committed - safety) if open_ else 0
        return Figure(
            sku=row.sku,
            location_id=row.location_id,
            channel=channel,
            on_hand=row.on_hand,
            reserved=row.committed,
            safety_stock=safety,
            available=available,
            low_stock=self.is_low(channel, available),
            version=version,
        )

    def network_figure(
        self, sku: str, channel: str, rows: Mapping[StockKey, StockRow], version: int
    ) -> Figure:
        """ATP of ``sku`` summed over the open locations ``channel`` sells from."""
        on_hand = reserved = kept_back = available = 0
        # Summed in place (no figure per location): this runs for every channel
        # on every change of the SKU. A location without a stock row adds nothing.
        for loc in self.channel(channel).location_ids:
            row = rows.get((sku, loc))
            if row is None or loc in self.closed_locations:
                continue
            free = max(0, row.on_hand - row.committed)
            units = max(0, free - self.safety(channel, loc))
            on_hand += row.on_hand
            reserved += row.committed
            # What safety stock actually keeps back: a store with nothing left
            # keeps nothing back, so on_hand - reserved - safety_stock = available.
            kept_back += free - units
            available += units
        return Figure(
            sku=sku,
            location_id="",
            channel=channel,
            on_hand=on_hand,
            reserved=reserved,
            safety_stock=kept_back,
            available=available,
            low_stock=self.is_low(channel, available),
            version=version,
        )

    def is_low(self, channel: str, available: int) -> bool:
        """The low-stock flag: above zero and at or below the channel's threshold."""
        rules = self.channels.get(channel)
        return rules is not None and 0 < available <= rules.low_stock_threshold


# -- validation ---------------------------------------------------------------


def check_quantity(value: int, path: str) -> list[FieldViolation]:
    """Problems with a line quantity."""
    if value < 1:
        return [FieldViolation(path, f"must be at least 1, got {value}")]
    if value > MAX_QUANTITY:
        return [FieldViolation(path, f"must be at most {MAX_QUANTITY}, got {value}")]
    return []


def check_ttl(ttl: timedelta | None, path: str) -> list[FieldViolation]:
    """Problems with a cart hold's time to live."""
    if ttl is None or MIN_TTL <= ttl <= MAX_TTL:
        return []
    return [
        FieldViolation(
            path, f"must be from 1 minute to 7 days, got {ttl.total_seconds():g} seconds"
        )
    ]


def validate_reserve(command: Reserve) -> None:
    """Reject a malformed Reserve whole, before anything is read or written."""
    problems = check_id(command.channel, "channel", "the channel")
    problems += check_id(command.reference, "reference", "the reference")
    if command.kind is None:
        problems.append(FieldViolation("kind", "must be CART or ORDER"))
    if command.kind is Kind.ORDER and command.ttl is not None:
        problems.append(FieldViolation("ttl", "order holds live until consumed; leave ttl unset"))
    problems += check_ttl(command.ttl, "ttl")
    if not command.lines:
        problems.append(FieldViolation("lines", "at least one line is required"))
    if len(command.lines) > MAX_LINES:
        problems.append(FieldViolation("lines", f"at most {MAX_LINES} lines per reservation"))
    seen: dict[StockKey, int] = {}
    for index, line in enumerate(command.lines[:MAX_LINES]):
        path = f"lines[{index}]"
        problems += check_id(line.sku, f"{path}.sku", "the sku")
        problems += check_id(line.location_id, f"{path}.location_id", "the location id")
        problems += check_quantity(line.quantity, f"{path}.quantity")
        if line.key in seen:
            problems.append(
                FieldViolation(
                    path,
                    f"repeats {line.sku} at {line.location_id} from lines[{seen[line.key]}]; "
                    "put the whole quantity on one line",
                )
            )
        seen.setdefault(line.key, index)
    if problems:
        raise InvalidArgument(problems)


def validate_list_reservations(query: ListReservations) -> None:
    """Reject a malformed ListReservations whole, before anything is read."""
    problems = check_id(query.channel, "channel", "the channel")
    problems += check_id(query.reference, "reference", "the reference")
    most = len(LineStatus)
    if len(query.statuses) > most:
        problems.append(
            FieldViolation("statuses", f"at most {most} statuses; there are only {most}")
        )
    for index, status in enumerate(query.statuses[:most]):
        if status is None:
            problems.append(
                FieldViolation(
                    f"statuses[{index}]", "must be ACTIVE, RELEASED, EXPIRED, CONSUMED or SHORT"
                )
            )
    if problems:
        raise InvalidArgument(problems)


def check_references(
    lines: Sequence[ReserveLine], known_skus: Iterable[str], known_locations: Iterable[str]
) -> None:
    """Reject lines naming a SKU or location the ledger never announced."""
    skus, locations = set(known_skus), set(known_locations)
    problems = []
    for index, line in enumerate(lines):
        if line.sku not in skus:
            problems.append(FieldViolation(f"lines[{index}].sku", f"unknown SKU {line.sku!r}"))
        if line.location_id not in locations:
            problems.append(
                FieldViolation(
                    f"lines[{index}].location_id", f"unknown location {line.location_id!r}"
                )
            )
    if problems:
        raise InvalidArgument(problems)


def validate_rules(rules: ChannelRules) -> None:
    """Reject malformed channel rules whole."""
    problems = check_id(rules.channel, "rules.channel", "the channel")
    if len(rules.location_ids) > MAX_CHANNEL_LOCATIONS:
        problems.append(
            FieldViolation("rules.location_ids", f"at most {MAX_CHANNEL_LOCATIONS} locations")
        )
    seen: set[str] = set()
    for index, location_id in enumerate(rules.location_ids[:MAX_CHANNEL_LOCATIONS]):
        path = f"rules.location_ids[{index}]"
        problems += check_id(location_id, path, "the location id")
        if location_id in seen:
            problems.append(FieldViolation(path, f"repeats {location_id!r}"))
        seen.add(location_id)
    problems += check_ttl(rules.cart_ttl, "rules.cart_ttl")
    for name, value in (
        ("safety_stock", rules.safety_stock),
        ("low_stock_threshold", rules.low_stock_threshold),
    ):
        if not 0 <= value <= MAX_SAFETY_STOCK:
            problems.append(
                FieldViolation(f"rules.{name}", f"must be 0 to {MAX_SAFETY_STOCK}, got {value}")
            )
    if problems:
        raise InvalidArgument(problems)


def validate_location_safety(location_id: str, safety_stock: int) -> None:
    """Reject a malformed location safety stock rule."""
    problems = check_id(location_id, "safety_stock.location_id", "the location id")
    if not 0 <= safety_stock <= MAX_SAFETY_STOCK:
        problems.append(
            FieldViolation(
                "safety_stock.safety_stock", f"must be 0 to {MAX_SAFETY_STOCK}, got {safety_stock}"
            )
        )
    if problems:
        raise InvalidArgument(problems)


def check_release(
    reservation: Reservation, line_numbers: Sequence[int], reason_code: str
) -> list[Line]:
    """The active lines a release lets go, or an error naming what is wrong."""
    problems = check_reason(reason_code, "reason_code", required=False)
    numbers = {line.line_number: line for line in reservation.lines}
    for index, number in enumerate(line_numbers):
        if number not in numbers:
            problems.append(
                FieldViolation(f"line_numbers[{index}]", f"the reservation has no line {number}")
            )
    if len(set(line_numbers)) != len(line_numbers):
        problems.append(FieldViolation("line_numbers", "names a line more than once"))
    if problems:
        raise InvalidArgument(problems)
    if not line_numbers:
        chosen = [line for line in reservation.lines if line.status is LineStatus.ACTIVE]
        if not chosen:
            raise ended(reservation, "released")
        return chosen
    chosen = [numbers[number] for number in line_numbers]
    finished = [line for line in chosen if line.status is not LineStatus.ACTIVE]
    if finished:
        first = finished[0]
        raise FailedPrecondition(
            "LINE_ENDED",
            f"Line {first.line_number} of reservation {reservation.reservation_id} is already "
            f"{first.status.value}; nothing was released.",
            {
                "reservation_id": reservation.reservation_id,
                "line_number": str(first.line_number),
                "status": first.status.value,
            },
        )
    return chosen


def ended(reservation: Reservation, action: str) -> FailedPrecondition:
    """The error for acting on a reservation that holds nothing any more."""
    status = reservation.status.value
    return FailedPrecondition(
        "RESERVATION_ENDED",
        f"Reservation {reservation.reservation_id} is {status}; it cannot be {action}.",
        {"reservation_id": reservation.reservation_id, "status": status},
    )


def expired(reservation: Reservation, action: str) -> FailedPrecondition:
    """The error for a cart hold whose time ran out before the sweeper released it."""
    return FailedPrecondition(
        "RESERVATION_ENDED",
        f"Reservation {reservation.reservation_id} expired; it cannot be {action}.",
        {"reservation_id": reservation.reservation_id, "status": LineStatus.EXPIRED.value},
    )


def not_sellable(channel: str, location_id: str, index: int | None = None) -> FailedPrecondition:
    """The error for a location the channel does not sell from."""
    where = f"lines[{index}]: " if index is not None else ""
    metadata = {"channel": channel, "location_id": location_id}
    if index is not None:
        metadata["index"] = str(index)
    return FailedPrecondition(
        "LOCATION_NOT_SELLABLE",
        f"{where}channel {channel!r} does not sell from {location_id!r} (not in its rules, "
        "or closed).",
        metadata,
    )


def replace_expiry(reservation: Reservation, expires_at: datetime, at: datetime) -> Reservation:
    """A cart hold with a new expiry."""
    return replace(reservation, expires_at=expires_at, updated_at=at)


def to_order(reservation: Reservation, reference: str, at: datetime) -> Reservation:
    """A cart hold as an order hold: no expiry, the order's reference, the same lines."""
    return replace(
        reservation, kind=Kind.ORDER, reference=reference, expires_at=None, updated_at=at
    )


def require_active_cart(reservation: Reservation, action: str) -> None:
    """Extend and convert apply to active cart holds only."""
    if not reservation.active:
        raise ended(reservation, action)
    if reservation.kind is not Kind.CART:
        raise FailedPrecondition(
            "NOT_A_CART_HOLD",
            f"Reservation {reservation.reservation_id} is an order hold; only cart holds can "
            f"be {action}.",
            {"reservation_id": reservation.reservation_id, "kind": reservation.kind.value},
        )


# -- placing holds --------------------------------------------------------------


@dataclass(frozen=True)
class Shortfall:
    """One line that does not fit: what was asked and what is available now."""

    index: int
    sku: str
    location_id: str
    requested: int
    available: int


class InsufficientStock(FailedPrecondition):
    """Reserve could not hold every line; nothing was held."""

    def __init__(self, shortfalls: Sequence[Shortfall]):
        self.shortfalls = list(shortfalls)
        first = self.shortfalls[0]
        metadata = {
            "sku": first.sku,
            "location_id": first.location_id,
            "requested": str(first.requested),
            "available": str(first.available),
            "short_lines": str(len(self.shortfalls)),
        }
        for short in self.shortfalls[:20]:  # bounded: ErrorInfo rides in trailers
            prefix = f"line_{short.index}"
            metadata[f"{prefix}_sku"] = short.sku
            metadata[f"{prefix}_location_id"] = short.location_id
            metadata[f"{prefix}_requested"] = str(short.requested)
            metadata[f"{prefix}_available"] = str(short.available)
        more = len(self.shortfalls) - 1
        super().__init__(
            "INSUFFICIENT_STOCK",
            f"Not enough stock: lines[{first.index}] asks {first.requested} of {first.sku} at "
            f"{first.location_id}, {first.available} available"
            + (f" (and {more} more short line{'s' if more > 1 else ''})" if more else "")
            + "; nothing was held.",
            metadata,
        )


def place(
    command: Reserve,
    rows: Mapping[StockKey, StockRow],
    rules: Rules,
    *,
    reservation_id: str,
    now: datetime,
) -> Reservation:
    """Hold every line of ``command`` on ``rows`` (changed in place) or raise.

    ``rows`` holds the locked stock of every line; a missing row means nothing
    on hand. The command was validated and its references checked.
    """
    channel = rules.channel(command.channel)
    refused = [
        (i, line)
        for i, line in enumerate(command.lines)
        if not rules.sells_from(command.channel, line.location_id)
    ]
    if refused:
        index, line = refused[0]
        raise not_sellable(command.channel, line.location_id, index)
    shortfalls = []
    for index, line in enumerate(command.lines):
        row = rows.get(line.key) or StockRow(*line.key)
        available = rules.figure(row, command.channel, 0).available
        if line.quantity > available:
            shortfalls.append(
                Shortfall(index, line.sku, line.location_id, line.quantity, available)
            )
    if shortfalls:
        raise InsufficientStock(shortfalls)
    for line in command.lines:
        rows[line.key].held += line.quantity
    kind = command.kind or Kind.CART
    expires_at = now + (command.ttl or channel.cart_ttl) if kind is Kind.CART else None
    return Reservation(
        reservation_id=reservation_id,
        channel=command.channel,
        reference=command.reference,
        kind=kind,
        lines=tuple(
            Line(number, line.sku, line.location_id, line.quantity)
            for number, line in enumerate(command.lines, start=1)
        ),
        created_at=now,
        updated_at=now,
        expires_at=expires_at,
    )


def end_lines(
    reservation: Reservation, lines: Iterable[Line], status: LineStatus, at: datetime
) -> tuple[Reservation, dict[StockKey, int]]:
    """End ``lines`` with ``status``; returns the reservation and the units freed per key."""
    freed: dict[StockKey, int] = {}
    ended_lines = []
    for line in lines:
        freed[line.key] = freed.get(line.key, 0) + line.held
        ended_lines.append(replace(line, status=status))
    return reservation.with_lines(ended_lines, at), freed


def consume(
    reservation: Reservation, sku: str, location_id: str, quantity: int, at: datetime
) -> tuple[Reservation, Line | None, int]:
    """Use up to ``quantity`` units of the active line for (sku, location).

    Returns the reservation, the line as changed (None when no active line
    matches) and the units consumed. A line fully consumed ends CONSUMED.
    """
    for line in reservation.lines:
        if line.key == (sku, location_id) and line.status is LineStatus.ACTIVE:
            used = min(quantity, line.held)
            changed = line.settled(line.consumed_quantity + used, line.released_quantity)
            return reservation.with_lines([changed], at), changed, used
    return reservation, None, 0


def release_units(
    reservation: Reservation, sku: str, location_id: str, quantity: int, at: datetime
) -> tuple[Reservation, Line | None, int]:
    """Let go of up to ``quantity`` units of the active line for (sku, location).

    The rest of the line stays held. Returns the reservation, the line as
    changed (None when no active line matches) and the units released.
    """
    for line in reservation.lines:
        if line.key == (sku, location_id) and line.status is LineStatus.ACTIVE:
            freed = min(quantity, line.held)
            changed = line.settled(line.consumed_quantity, line.released_quantity + freed)
            return reservation.with_lines([changed], at), changed, freed
    return reservation, None, 0


def departing_change(
    consumed: int, departed: int, *, more_consumed: int = 0, more_departed: int = 0
) -> tuple[tuple[int, int], int]:
    """Match a fulfilment's hold consumption with the ledger's departure, in either order.

    A shipment reaches the reservation service twice: fulfilment's event uses
    the order hold, and the ledger's movement lowers on-hand. Whichever comes
    first, the units must stay out of availability until the other arrives:
    consumed but not yet departed units count as departing. Returns the new
    (consumed, departed) and the change of the row's departing units.
    """
    before = max(0, consumed - departed)
    consumed, departed = consumed + more_consumed, departed + more_departed
    return (consumed, departed), max(0, consumed - departed) - before


def lines_to_short(
    row: StockRow, active_newest_first: Sequence[Line], at_most: int | None = None
) -> list[Line]:
    """The newest active lines to mark short until what stays held fits on-hand.

    ``at_most`` bounds the units to cover (what one loss took): a gap beyond it
    belongs to a departure whose hold is consumed later, not to this loss.
    """
    gap = row.committed - row.on_hand
    excess = gap if at_most is None else min(gap, at_most)
    chosen = []
    for line in active_newest_first:
        if excess <= 0:
            break
        chosen.append(line)
        excess -= line.held
    return chosen
