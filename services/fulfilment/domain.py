"""The fulfilment state machine: which step may follow which, and what it changes.

Pure: the handlers load a fulfilment, apply one step here and keep the result
with its events. Every step names the state it needs; any other state is
FAILED_PRECONDITION with reason ILLEGAL_TRANSITION naming the current state.

    ship from store / DC:  created → accepted → picked → packed → shipped
    pickup at store:       created → accepted → picked (→ packed) → ready → collected | expired
    transfer to store:     created → accepted → picked → packed → shipped (in transit)
                           → received (at the pickup store) → ready → collected | expired
    from created:          rejected (by the location, or not accepted in time)
    from accepted:         rejected (by the location), or by picking nothing
    until goods leave:     cancelled
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum

from omnistock.errors import FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied
from omnistock.validation import check_count, check_id, check_text

PICKUP_CODE_DIGITS = 6
WRONG_PICKUP_CODE = "WRONG_PICKUP_CODE"
# Input limits: SKUs named in one pick, the length of a typed pickup code, a
# queue page and the statuses a queue is filtered by.
MAX_PICKED_SKUS = 100
MAX_PICKUP_CODE_LENGTH = 32
MAX_PAGE_SIZE = 200
MAX_PAGE_TOKEN_LENGTH = 200


class Kind(Enum):
    """What a location does for an order."""

    SHIP_FROM_STORE = "ship_from_store"
    SHIP_FROM_DISTRIBUTION_CENTRE = "ship_from_distribution_centre"
    PICKUP_AT_STORE = "pickup_at_store"
    TRANSFER_TO_STORE = "transfer_to_store"

    @property
    def ships(self) -> bool:
        """Goods leave this location by carrier."""
        return self is not Kind.PICKUP_AT_STORE

    @property
    def hands_over(self) -> bool:
        """The customer collects the goods at a store."""
        return self in (Kind.PICKUP_AT_STORE, Kind.TRANSFER_TO_STORE)


class Status(Enum):
    """Where a fulfilment stands."""

    CREATED = "created"
    ACCEPTED = "accepted"
    PICKED = "picked"
    PACKED = "packed"
    SHIPPED = "shipped"
    RECEIVED = "received"
    READY_FOR_PICKUP = "ready_for_pickup"
    COLLECTED = "collected"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


ENDED = frozenset({Status.COLLECTED, Status.REJECTED, Status.CANCELLED, Status.EXPIRED})


@dataclass(frozen=True)
class Item:
    """Units of one SKU and how many were picked."""

    line_number: int
    sku: str
    quantity: int
    picked: int = 0


@dataclass(frozen=True)
class Fulfilment:
    """The work one location does for one order."""

    fulfilment_id: str
    order_id: str
    channel: str
    location_id: str
    kind: Kind
    items: tuple[Item, ...]
    status: Status = Status.CREATED
    pickup_location_id: str = ""
    carrier: str = ""
    tracking_number: str = ""
    reason_code: str = ""
    pickup_code_hash: bytes = b""
    plan_number: int = 1
    # Until when the location may accept it; until when the customer may collect.
    accept_by: datetime | None = None
    collect_by: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # The order was cancelled after this transfer left its source: it ends
    # when it arrives, at once if it had (the goods become the store's stock).
    cancel_on_arrival: bool = False

    @property
    def ended(self) -> bool:
        """Nothing more can happen to it."""
        return self.status in ENDED


# A transfer's goods are on the road to, or at, its pickup store.
_AT_OR_TO_PICKUP_STORE = frozenset(
    {Status.SHIPPED, Status.RECEIVED, Status.READY_FOR_PICKUP, Status.COLLECTED, Status.EXPIRED}
)


def working_locations(f: Fulfilment) -> frozenset[str]:
    """The locations whose staff work on ``f``: its own location, and for a transfer
    the pickup store once the goods are on the road to it."""
    if (
        f.kind is Kind.TRANSFER_TO_STORE
        and f.pickup_location_id
        and (
            f.status in _AT_OR_TO_PICKUP_STORE
            or (f.cancel_on_arrival and f.status is Status.CANCELLED)
        )
    ):
        return frozenset({f.location_id, f.pickup_location_id})
    return frozenset({f.location_id})


def illegal(f: Fulfilment, step: str) -> FailedPrecondition:
    """The error for a step the fulfilment's state does not allow."""
    return FailedPrecondition(
        "ILLEGAL_TRANSITION",
        f"Fulfilment {f.fulfilment_id} is {f.status.value.replace('_', ' ')}; it cannot be {step}.",
        {"fulfilment_id": f.fulfilment_id, "status": f.status.value, "step": step},
    )


def _need(f: Fulfilment, step: str, *allowed: Status) -> None:
    if f.status not in allowed:
        raise illegal(f, step)


def accept(f: Fulfilment) -> Fulfilment:
    """The location takes the task."""
    _need(f, "accepted", Status.CREATED)
    return replace(f, status=Status.ACCEPTED)


def reject(f: Fulfilment, reason_code: str) -> Fulfilment:
    """The location refuses the task (or did not accept it in time); routing reroutes it."""
    _need(f, "rejected", Status.CREATED, Status.ACCEPTED)
    return replace(f, status=Status.REJECTED, reason_code=reason_code)


def confirm_pick(f: Fulfilment, picked: Mapping[str, int]) -> tuple[Fulfilment, dict[str, int]]:
    """Record the units picked per SKU; the shortfall per SKU is returned for rerouting.

    Every SKU of the fulfilment must be named, with 0 to its quantity. Nothing
    picked at all ends the fulfilment as rejected (NOTHING_PICKED).
    """
    _need(f, "picked", Status.ACCEPTED)
    skus = {item.sku for item in f.items}
    problems = check_count(len(picked), "lines", MAX_PICKED_SKUS, "SKUs")
    for sku in list(picked)[:MAX_PICKED_SKUS]:
        if sku in skus:
            continue
        # A malformed SKU is named cut short: an error never echoes a huge string.
        problems += check_id(sku, "lines", "the sku") or [
            FieldViolation(f"lines[{sku}]", f"{sku} is not part of this fulfilment")
        ]
    for item in f.items:
        units = picked.get(item.sku)
        if units is None:
            problems.append(FieldViolation(f"lines[{item.sku}]", "say how many were picked"))
        elif not 0 <= units <= item.quantity:
            problems.append(
                FieldViolation(f"lines[{item.sku}]", f"picked must be 0 to {item.quantity}")
            )
    if problems:
        raise InvalidArgument(problems)
    items = tuple(replace(item, picked=picked[item.sku]) for item in f.items)
    short = {item.sku: item.quantity - item.picked for item in items if item.picked < item.quantity}
    if all(item.picked == 0 for item in items):
        return replace(f, items=items, status=Status.REJECTED, reason_code="NOTHING_PICKED"), short
    return replace(f, items=items, status=Status.PICKED), short


def pack(f: Fulfilment) -> Fulfilment:
    """The picked goods are packed."""
    _need(f, "packed", Status.PICKED)
    return replace(f, status=Status.PACKED)


def ship(f: Fulfilment, carrier: str, tracking_number: str) -> Fulfilment:
    """The packed goods leave with a carrier (to the customer or the pickup store)."""
    if not f.kind.ships:
        raise illegal(f, "shipped (a pickup is collected, not shipped)")
    _need(f, "shipped", Status.PACKED)
    return replace(f, status=Status.SHIPPED, carrier=carrier, tracking_number=tracking_number)


def receive_transfer(f: Fulfilment) -> Fulfilment:
    """The transfer arrived at the pickup store."""
    if f.kind is not Kind.TRANSFER_TO_STORE:
        raise illegal(f, "received (only a transfer is received)")
    _need(f, "received", Status.SHIPPED)
    if f.cancel_on_arrival:
        return replace(f, status=Status.CANCELLED)
    return replace(f, status=Status.RECEIVED)


def mark_ready(f: Fulfilment, code: str, secret: bytes) -> Fulfilment:
    """The goods wait at the pickup store; only a hash of the customer's code is kept."""
    if f.kind is Kind.PICKUP_AT_STORE:
        _need(f, "marked ready for pickup", Status.PICKED, Status.PACKED)
    elif f.kind is Kind.TRANSFER_TO_STORE:
        _need(f, "marked ready for pickup", Status.RECEIVED)
    else:
        raise illegal(f, "marked ready for pickup (it ships to the customer)")
    return replace(f, status=Status.READY_FOR_PICKUP, pickup_code_hash=code_hash(code, secret))


def check_pickup_code(code: str) -> None:
    """Reject a pickup code no customer could have been given, before anything is read."""
    problems = check_text(code, "pickup_code", MAX_PICKUP_CODE_LENGTH)
    if not code.strip():
        problems.append(FieldViolation("pickup_code", "the customer's pickup code is required"))
    if problems:
        raise InvalidArgument(problems)


def queue_problems(
    location_id: str, statuses: int, page_size: int, page_token: str
) -> list[FieldViolation]:
    """What is wrong with a ListFulfilments request (``statuses``: how many were given)."""
    problems = check_id(location_id, "location_id", "the location")
    problems += check_count(statuses, "statuses", len(Status), "statuses")
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        problems.append(FieldViolation("page_size", f"must be 0 (the default) to {MAX_PAGE_SIZE}"))
    if len(page_token) > MAX_PAGE_TOKEN_LENGTH:
        problems.append(FieldViolation("page_token", "is not a token this service gave"))
    return problems


def collect(f: Fulfilment, code: str, secret: bytes) -> Fulfilment:
    """The customer collects with the right code; a wrong code changes nothing."""
    _need(f, "collected", Status.READY_FOR_PICKUP)
    if not hmac.compare_digest(code_hash(code, secret), f.pickup_code_hash):
        raise PermissionDenied(
            WRONG_PICKUP_CODE,
            "That pickup code does not match this order; ask the customer for the code "
            "their confirmation shows.",
            {"fulfilment_id": f.fulfilment_id},
        )
    return replace(f, status=Status.COLLECTED)


# Until when each kind may be cancelled: before the goods leave the source,
# and for what waits at the pickup store, until the customer collects.
_CANCELLABLE = {
    Kind.SHIP_FROM_STORE: (Status.CREATED, Status.ACCEPTED, Status.PICKED, Status.PACKED),
    Kind.SHIP_FROM_DISTRIBUTION_CENTRE: (
        Status.CREATED,
        Status.ACCEPTED,
        Status.PICKED,
        Status.PACKED,
    ),
    Kind.PICKUP_AT_STORE: (
        Status.CREATED,
        Status.ACCEPTED,
        Status.PICKED,
        Status.PACKED,
        Status.READY_FOR_PICKUP,
    ),
    # Staff stop a transfer only before it leaves; once the goods are on the
    # road or at the pickup store, only the order's cancellation or the
    # pickup's expiry ends it (see ``cancel_for_order``).
    Kind.TRANSFER_TO_STORE: (Status.CREATED, Status.ACCEPTED, Status.PICKED, Status.PACKED),
}


def cancel(f: Fulfilment, reason_code: str) -> Fulfilment:
    """Stop the work (see ``_CANCELLABLE`` for until when)."""
    _need(f, "cancelled", *_CANCELLABLE[f.kind])
    return replace(f, status=Status.CANCELLED, reason_code=reason_code)


def cancel_for_order(f: Fulfilment, reason_code: str) -> Fulfilment:
    """The order was cancelled: stop the work if its goods have not gone to the customer.

    A transfer waiting at the pickup store ends now; one on the road is marked
    to end when it arrives (the store still receives the goods). Anything
    else follows ``cancel``.
    """
    if f.kind is Kind.TRANSFER_TO_STORE:
        if f.status is Status.SHIPPED:
            return replace(f, cancel_on_arrival=True, reason_code=reason_code)
        if f.status in (Status.RECEIVED, Status.READY_FOR_PICKUP):
            return replace(
                f, status=Status.CANCELLED, cancel_on_arrival=True, reason_code=reason_code
            )
    return cancel(f, reason_code)


def drop_lines(f: Fulfilment, line_numbers: set[int]) -> Fulfilment:
    """Some of the order's lines were cancelled: the task goes on without their items.

    Only before the goods leave (as ``cancel``): a parcel can be repacked, not
    recalled.
    """
    _need(f, "changed", *_CANCELLABLE[f.kind])
    return replace(f, items=tuple(i for i in f.items if i.line_number not in line_numbers))


def goods_location(f: Fulfilment) -> str:
    """Where the task's goods are: the pickup store once a transfer arrived there."""
    arrived = f.kind is Kind.TRANSFER_TO_STORE and f.status in (
        Status.RECEIVED,
        Status.READY_FOR_PICKUP,
        Status.COLLECTED,
        Status.EXPIRED,
    )
    if arrived or (f.kind is Kind.TRANSFER_TO_STORE and f.cancel_on_arrival):
        return f.pickup_location_id
    return f.location_id


def expire_task(f: Fulfilment) -> Fulfilment:
    """Not accepted in time: treated as rejected, so routing reroutes it."""
    _need(f, "expired", Status.CREATED)
    return replace(f, status=Status.REJECTED, reason_code="NOT_ACCEPTED_IN_TIME")


def expire_pickup(f: Fulfilment) -> Fulfilment:
    """The customer did not come within the channel's window."""
    _need(f, "expired", Status.READY_FOR_PICKUP)
    return replace(f, status=Status.EXPIRED, reason_code="NOT_COLLECTED")


def code_hash(code: str, secret: bytes) -> bytes:
    """The keyed hash under which a pickup code is kept (never the code itself)."""
    return hmac.new(secret, code.strip().encode(), hashlib.sha256).digest()


def pickup_code(entropy: int) -> str:
    """A pickup code of PICKUP_CODE_DIGITS digits from a random number."""
    return f"{entropy % 10**PICKUP_CODE_DIGITS:0{PICKUP_CODE_DIGITS}d}"


def picked_items(f: Fulfilment) -> list[tuple[str, int]]:
    """What actually leaves: picked units per SKU (all units before a pick is confirmed)."""
    confirmed = f.status not in (Status.CREATED, Status.ACCEPTED)
    return [(item.sku, item.picked if confirmed else item.quantity) for item in f.items]
