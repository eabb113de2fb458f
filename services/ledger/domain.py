"""Pure rules of the stock ledger: no protobuf, asyncpg or NATS here.

A movement (what a scanner reports) becomes one or two postings (changes of
on-hand of one (sku, location, stock state)). Transfers and state changes are
double-entry: what leaves one state or location enters another, so the ledger
can always prove that on-hand equals the sum of postings.

Negative on-hand policy: on-hand never goes below zero in any state. A movement
that would take it below zero is rejected with the whole batch
(FAILED_PRECONDITION, reason NEGATIVE_ON_HAND). A scanner that physically picked
stock the ledger does not know about reveals a missing receipt or a miscount;
the fix is a cycle count (which sets an absolute quantity), not a silent debt.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cached_property

from omnistock.contract import fulfilment_device
from omnistock.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from omnistock.validation import ID_PATTERN, check_id, check_reason, check_text

MAX_BATCH_SIZE = 500
MAX_QUANTITY = 1_000_000
MAX_CLOCK_SKEW = timedelta(minutes=10)

MAX_REFERENCE_LENGTH = 128
MAX_NAME_LENGTH = 200
MAX_SHORT_TEXT_LENGTH = 80


class StockState(StrEnum):
    """The condition stock is in at a location."""

    SELLABLE = "sellable"
    DAMAGED = "damaged"
    QUARANTINE = "quarantine"
    IN_TRANSIT = "in_transit"


class MovementKind(StrEnum):
    """What happened to the stock."""

    RECEIPT = "receipt"
    ADJUSTMENT = "adjustment"
    TRANSFER_OUT = "transfer_out"
    TRANSFER_IN = "transfer_in"
    CYCLE_COUNT = "cycle_count"
    SHIPMENT = "shipment"
    RETURN = "return"
    STATE_CHANGE = "state_change"


@dataclass(frozen=True, order=True, slots=True)
class StockKey:
    """One (sku, location, stock state); ordering is the global lock order."""

    sku: str
    location_id: str
    state: StockState

    def __str__(self) -> str:
        return f"{self.sku}@{self.location_id}/{self.state}"


@dataclass(frozen=True, order=True, slots=True)
class IdempotencyKey:
    """A scanner's device id and its own sequence number."""

    device_id: str
    sequence: int

    def __str__(self) -> str:
        return f"{self.device_id}#{self.sequence}"


@dataclass(frozen=True)
class Receipt:
    """Goods received from a supplier."""

    quantity: int
    state: StockState | None = None
    reference: str = ""


@dataclass(frozen=True)
class Adjustment:
    """A signed correction with a reason code."""

    quantity_delta: int
    reason_code: str
    state: StockState | None = None


@dataclass(frozen=True)
class TransferOut:
    """Sellable goods sent to another location."""

    transfer_id: str
    destination_location_id: str
    quantity: int


@dataclass(frozen=True)
class TransferIn:
    """Goods of a transfer arriving at its destination."""

    transfer_id: str
    quantity: int


@dataclass(frozen=True)
class CycleCount:
    """A counted absolute quantity."""

    counted_quantity: int
    state: StockState | None = None


@dataclass(frozen=True)
class Shipment:
    """Sellable goods shipped to a customer."""

    quantity: int
    reference: str = ""


@dataclass(frozen=True)
class CustomerReturn:
    """Goods returned by a customer into a chosen state."""

    quantity: int
    state: StockState | None
    reference: str = ""


@dataclass(frozen=True)
class StateChange:
    """Goods changing state at one location."""

    quantity: int
    from_state: StockState | None
    to_state: StockState | None
    reason_code: str = ""


MovementDetail = (
    Receipt | Adjustment | TransferOut | TransferIn | CycleCount | Shipment | CustomerReturn
    | StateChange
)  # fmt: skip

_KINDS: dict[type, MovementKind] = {
    Receipt: MovementKind.RECEIPT,
    Adjustment: MovementKind.ADJUSTMENT,
    TransferOut: MovementKind.TRANSFER_OUT,
    TransferIn: MovementKind.TRANSFER_IN,
    CycleCount: MovementKind.CYCLE_COUNT,
    Shipment: MovementKind.SHIPMENT,
    CustomerReturn: MovementKind.RETURN,
    StateChange: MovementKind.STATE_CHANGE,
}


@dataclass(frozen=True)
class PostMovement:
    """The command to record one movement, as received (not yet validated)."""

    key: IdempotencyKey
    sku: str
    location_id: str
    detail: MovementDetail | None
    occurred_at: datetime | None = None

    @property
    def kind(self) -> MovementKind:
        """The movement's kind (only meaningful once validated)."""
        assert self.detail is not None
        return _KINDS[type(self.detail)]

    def normalised(self) -> PostMovement:
        """The movement with defaults applied (sellable where a state may be omitted)."""
        detail = self.detail
        if isinstance(detail, Receipt | Adjustment | CycleCount) and detail.state is None:
            detail = replace(detail, state=StockState.SELLABLE)
        return PostMovement(self.key, self.sku, self.location_id, detail, self.occurred_at)

    def content_digest(self) -> str:
        """A canonical text of the movement's content, to detect a reused key."""
        assert self.detail is not None
        content = {
            "kind": self.kind.value,
            "sku": self.sku,
            "location_id": self.location_id,
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
            # The details hold only strings, ints and enums: a shallow copy suffices
            # (dataclasses.asdict deep-copies, and this runs for every movement).
            "detail": dict(vars(self.detail)),
        }
        return json.dumps(content, sort_keys=True, default=str)

    @cached_property
    def stock_keys(self) -> tuple[StockKey, ...]:
        """The (sku, location, state) balances this movement changes (computed once)."""
        detail = self.detail
        here = self.location_id
        match detail:
            case Receipt(state=state) | Adjustment(state=state) | CycleCount(state=state):
                return (StockKey(self.sku, here, state or StockState.SELLABLE),)
            case CustomerReturn(state=state):
                assert state is not None
                return (StockKey(self.sku, here, state),)
            case Shipment():
                return (StockKey(self.sku, here, StockState.SELLABLE),)
            case TransferOut(destination_location_id=destination):
                return (
                    StockKey(self.sku, here, StockState.SELLABLE),
                    StockKey(self.sku, destination, StockState.IN_TRANSIT),
                )
            case TransferIn():
                return (
                    StockKey(self.sku, here, StockState.IN_TRANSIT),
                    StockKey(self.sku, here, StockState.SELLABLE),
                )
            case StateChange(from_state=source, to_state=target):
                assert source is not None and target is not None
                return (StockKey(self.sku, here, source), StockKey(self.sku, here, target))
        raise AssertionError(f"unvalidated movement {self!r}")


# ---------------------------------------------------------------------------
# Validation: the whole batch, before anything is read or written.


def validate_batch(
    movements: Sequence[PostMovement], *, now: datetime | None = None
) -> list[PostMovement]:
    """Check every movement of a batch; raise one InvalidArgument naming every problem.

    Returns the movements with defaults applied.
    """
    now = now or datetime.now(UTC)
    problems: list[FieldViolation] = []
    if not movements:
        problems.append(FieldViolation("movements", "must contain at least one movement"))
    if len(movements) > MAX_BATCH_SIZE:
        problems.append(
            FieldViolation(
                "movements",
                f"holds {len(movements)} movements; a batch takes at most {MAX_BATCH_SIZE}",
            )
        )
    seen: dict[IdempotencyKey, int] = {}
    for index, movement in enumerate(movements):
        path = f"movements[{index}]"
        problems += _validate_movement(movement, path, now)
        if movement.key in seen:
            problems.append(
                FieldViolation(
                    f"{path}.key",
                    f"repeats the key of movements[{seen[movement.key]}] ({movement.key}); "
                    "keys must be unique within a batch",
                )
            )
        else:
            seen[movement.key] = index
    if problems:
        raise InvalidArgument(problems, reason="INVALID_MOVEMENTS")
    return [movement.normalised() for movement in movements]


def _check_quantity(value: int, path: str, minimum: int = 1) -> list[FieldViolation]:
    if value < minimum:
        lowest = "zero or more" if minimum == 0 else f"at least {minimum}"
        return [FieldViolation(path, f"must be {lowest}, got {value}")]
    if value > MAX_QUANTITY:
        return [FieldViolation(path, f"must be at most {MAX_QUANTITY}, got {value}")]
    return []


def _check_state(
    value: StockState | None, path: str, required: bool, allowed: frozenset[StockState]
) -> list[FieldViolation]:
    if value is None:
        return [FieldViolation(path, "a stock state is required")] if required else []
    if value not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        return [FieldViolation(path, f"{value.value} is not allowed here; use one of {names}")]
    return []


_AT_REST = frozenset({StockState.SELLABLE, StockState.DAMAGED, StockState.QUARANTINE})


def _validate_movement(movement: PostMovement, path: str, now: datetime) -> list[FieldViolation]:
    problems: list[FieldViolation] = []
    problems += check_id(movement.key.device_id, f"{path}.key.device_id", "the device id")
    if movement.key.sequence < 1:
        problems.append(
            FieldViolation(f"{path}.key.sequence", "must be 1 or more (the device's own counter)")
        )
    problems += check_id(movement.sku, f"{path}.sku", "the sku")
    problems += check_id(movement.location_id, f"{path}.location_id", "the location id")
    if movement.occurred_at is not None and movement.occurred_at > now + MAX_CLOCK_SKEW:
        problems.append(
            FieldViolation(
                f"{path}.occurred_at",
                f"{movement.occurred_at.isoformat()} is in the future; check the device clock",
            )
        )
    detail = movement.detail
    match detail:
        case None:
            problems.append(FieldViolation(path, "exactly one movement kind must be set"))
        case Receipt():
            problems += _check_quantity(detail.quantity, f"{path}.receipt.quantity")
            problems += _check_state(detail.state, f"{path}.receipt.state", False, _AT_REST)
            problems += check_text(
                detail.reference, f"{path}.receipt.reference", MAX_REFERENCE_LENGTH
            )
        case Adjustment():
            if detail.quantity_delta == 0:
                problems.append(
                    FieldViolation(f"{path}.adjustment.quantity_delta", "must not be zero")
                )
            problems += _check_quantity(
                abs(detail.quantity_delta), f"{path}.adjustment.quantity_delta", 0
            )
            problems += check_reason(
                detail.reason_code, f"{path}.adjustment.reason_code", required=True
            )
            problems += _check_state(detail.state, f"{path}.adjustment.state", False, _AT_REST)
        case TransferOut():
            sub = f"{path}.transfer_out"
            problems += check_id(detail.transfer_id, f"{sub}.transfer_id", "the transfer id")
            problems += check_id(
                detail.destination_location_id, f"{sub}.destination_location_id", "the destination"
            )
            if detail.destination_location_id == movement.location_id:
                problems.append(
                    FieldViolation(
                        f"{sub}.destination_location_id", "must differ from the source location"
                    )
                )
            problems += _check_quantity(detail.quantity, f"{sub}.quantity")
        case TransferIn():
            sub = f"{path}.transfer_in"
            problems += check_id(detail.transfer_id, f"{sub}.transfer_id", "the transfer id")
            problems += _check_quantity(detail.quantity, f"{sub}.quantity")
        case CycleCount():
            sub = f"{path}.cycle_count"
            problems += _check_quantity(detail.counted_quantity, f"{sub}.counted_quantity", 0)
            problems += _check_state(detail.state, f"{sub}.state", False, _AT_REST)
        case Shipment():
            problems += _check_quantity(detail.quantity, f"{path}.shipment.quantity")
            problems += check_text(
                detail.reference, f"{path}.shipment.reference", MAX_REFERENCE_LENGTH
            )
        case CustomerReturn():
            sub = f"{path}.customer_return"
            problems += _check_quantity(detail.quantity, f"{sub}.quantity")
            problems += _check_state(detail.state, f"{sub}.state", True, _AT_REST)
            problems += check_text(detail.reference, f"{sub}.reference", MAX_REFERENCE_LENGTH)
        case StateChange():
            sub = f"{path}.state_change"
            problems += _check_quantity(detail.quantity, f"{sub}.quantity")
            problems += _check_state(detail.from_state, f"{sub}.from_state", True, _AT_REST)
            problems += _check_state(detail.to_state, f"{sub}.to_state", True, _AT_REST)
            if detail.from_state is not None and detail.from_state == detail.to_state:
                problems.append(FieldViolation(f"{sub}.to_state", "must differ from from_state"))
            problems += check_reason(detail.reason_code, f"{sub}.reason_code", required=False)
    return problems


def check_references(
    movements: Sequence[PostMovement], known_skus: set[str], known_locations: set[str]
) -> None:
    """Raise NOT_FOUND naming every movement that refers to an unknown SKU or location."""
    problems: list[FieldViolation] = []
    for index, movement in enumerate(movements):
        path = f"movements[{index}]"
        if movement.sku not in known_skus:
            problems.append(FieldViolation(f"{path}.sku", f"unknown sku {movement.sku!r}"))
        for location in {key.location_id for key in movement.stock_keys}:
            if location not in known_locations:
                field_name = (
                    "location_id"
                    if location == movement.location_id
                    else "transfer_out.destination_location_id"
                )
                problems.append(
                    FieldViolation(f"{path}.{field_name}", f"unknown location {location!r}")
                )
    if problems:
        detail = "; ".join(f"{p.field}: {p.description}" for p in problems[:5])
        raise NotFound(
            "UNKNOWN_REFERENCE",
            f"The batch refers to SKUs or locations the ledger does not know: {detail}",
            {"problems": str(len(problems)), "first_field": problems[0].field},
        )


# ---------------------------------------------------------------------------
# Posting rules: apply validated movements to locked balances.


@dataclass
class Balance:
    """On-hand of one stock key and how many postings produced it."""

    on_hand: int = 0
    version: int = 0


@dataclass
class TransferLine:
    """One SKU of one transfer: what left the source and what arrived."""

    transfer_id: str
    sku: str
    source_location_id: str
    destination_location_id: str
    quantity_sent: int = 0
    quantity_received: int = 0

    @property
    def in_transit(self) -> int:
        """Units sent and not yet received."""
        return self.quantity_sent - self.quantity_received


@dataclass(frozen=True)
class PostingDraft:
    """A posting computed from a movement, ready to write."""

    stock: StockKey
    quantity_delta: int
    on_hand_after: int
    balance_version: int


@dataclass
class Positions:
    """The balances and transfers a batch touches, locked for the transaction.

    ``apply`` mutates them movement by movement, so later movements of a batch
    see the effect of earlier ones.
    """

    balances: dict[StockKey, Balance]
    transfers: dict[tuple[str, str], TransferLine] = field(default_factory=dict)
    touched_transfers: set[tuple[str, str]] = field(default_factory=set)

    def apply(self, movement: PostMovement, index: int = 0) -> list[PostingDraft]:
        """The postings of ``movement``; raises FailedPrecondition when it cannot happen.

        Everything is checked before anything changes, so a refused movement
        leaves balances and transfers exactly as they were.
        """
        detail = movement.detail
        keys = movement.stock_keys
        transfer_update: TransferLine | None = None
        match detail:
            case Receipt(quantity=quantity) | CustomerReturn(quantity=quantity):
                deltas = [quantity]
            case Adjustment(quantity_delta=delta):
                deltas = [delta]
            case Shipment(quantity=quantity):
                deltas = [-quantity]
            case CycleCount(counted_quantity=counted):
                deltas = [counted - self._balance(keys[0]).on_hand]
            case StateChange(quantity=quantity):
                deltas = [-quantity, quantity]
            case TransferOut():
                transfer_update = self._sent(movement, detail, index)
                deltas = [-detail.quantity, detail.quantity]
            case TransferIn():
                transfer_update = self._received(movement, detail, index)
                deltas = [-detail.quantity, detail.quantity]
            case _:
                raise AssertionError(f"unvalidated movement {movement!r}")
        for key, delta in zip(keys, deltas, strict=True):
            self._refuse_negative(movement, index, key, delta)
        drafts = []
        for key, delta in zip(keys, deltas, strict=True):
            balance = self._balance(key)
            balance.on_hand += delta
            balance.version += 1
            drafts.append(PostingDraft(key, delta, balance.on_hand, balance.version))
        if transfer_update is not None:
            line_key = (transfer_update.transfer_id, transfer_update.sku)
            self.transfers[line_key] = transfer_update
            self.touched_transfers.add(line_key)
        return drafts

    def _refuse_negative(
        self, movement: PostMovement, index: int, key: StockKey, delta: int
    ) -> None:
        on_hand = self._balance(key).on_hand
        if on_hand + delta >= 0:
            return
        raise FailedPrecondition(
            "NEGATIVE_ON_HAND",
            f"movements[{index}] ({movement.kind.value} {movement.key}) would leave "
            f"{on_hand + delta} {key.state.value} units of {key.sku} at {key.location_id}; "
            f"only {on_hand} are on hand. Nothing was recorded.",
            {
                "index": str(index),
                "sku": key.sku,
                "location_id": key.location_id,
                "state": key.state.value,
                "on_hand": str(on_hand),
                "requested_delta": str(delta),
            },
        )

    def _balance(self, key: StockKey) -> Balance:
        return self.balances.setdefault(key, Balance())

    def _sent(self, movement: PostMovement, detail: TransferOut, index: int) -> TransferLine:
        line = self.transfers.get((detail.transfer_id, movement.sku))
        if line is None:
            line = TransferLine(
                detail.transfer_id,
                movement.sku,
                movement.location_id,
                detail.destination_location_id,
            )
        elif (line.source_location_id, line.destination_location_id) != (
            movement.location_id,
            detail.destination_location_id,
        ):
            raise FailedPrecondition(
                "TRANSFER_ROUTE_MISMATCH",
                f"movements[{index}]: transfer {detail.transfer_id} of {movement.sku} runs from "
                f"{line.source_location_id} to {line.destination_location_id}, not from "
                f"{movement.location_id} to {detail.destination_location_id}.",
                {"index": str(index), "transfer_id": detail.transfer_id, "sku": movement.sku},
            )
        return replace(line, quantity_sent=line.quantity_sent + detail.quantity)

    def _received(self, movement: PostMovement, detail: TransferIn, index: int) -> TransferLine:
        line = self.transfers.get((detail.transfer_id, movement.sku))
        if line is None:
            raise FailedPrecondition(
                "UNKNOWN_TRANSFER",
                f"movements[{index}]: no goods of {movement.sku} were sent on transfer "
                f"{detail.transfer_id}; post the transfer out first.",
                {"index": str(index), "transfer_id": detail.transfer_id, "sku": movement.sku},
            )
        if line.destination_location_id != movement.location_id:
            raise FailedPrecondition(
                "WRONG_TRANSFER_DESTINATION",
                f"movements[{index}]: transfer {detail.transfer_id} goes to "
                f"{line.destination_location_id}, not to {movement.location_id}.",
                {"index": str(index), "transfer_id": detail.transfer_id},
            )
        if detail.quantity > line.in_transit:
            raise FailedPrecondition(
                "RECEIVED_MORE_THAN_SENT",
                f"movements[{index}]: {detail.quantity} units of {movement.sku} received on "
                f"transfer {detail.transfer_id}, but only {line.in_transit} are in transit.",
                {
                    "index": str(index),
                    "transfer_id": detail.transfer_id,
                    "in_transit": str(line.in_transit),
                    "received": str(detail.quantity),
                },
            )
        return replace(line, quantity_received=line.quantity_received + detail.quantity)


def lock_order(movements: Sequence[PostMovement]) -> list[StockKey]:
    """Every stock key a batch touches, in the one global order rows are locked in."""
    return sorted({key for movement in movements for key in movement.stock_keys})


def transfer_keys(movements: Sequence[PostMovement]) -> list[tuple[str, str]]:
    """The (transfer id, sku) lines a batch touches, in lock order."""
    return sorted(
        {
            (movement.detail.transfer_id, movement.sku)
            for movement in movements
            if isinstance(movement.detail, TransferOut | TransferIn)
        }
    )


# ---------------------------------------------------------------------------
# What the ledger recorded.


@dataclass(frozen=True)
class Posting:
    """A recorded change of one balance."""

    stock: StockKey
    quantity_delta: int
    on_hand_after: int
    balance_version: int
    ledger_sequence: int


@dataclass(frozen=True)
class RecordedMovement:
    """A movement as stored, with its postings."""

    movement_id: str
    key: IdempotencyKey
    kind: MovementKind
    sku: str
    location_id: str
    postings: tuple[Posting, ...]
    occurred_at: datetime
    recorded_at: datetime
    reason_code: str = ""
    transfer_id: str = ""
    counterpart_location_id: str = ""
    reference: str = ""
    counted_quantity: int = 0


@dataclass(frozen=True)
class PostedMovement:
    """The answer for one movement of a batch."""

    movement: RecordedMovement
    replayed: bool


def describe(movement: PostMovement) -> dict[str, str | int]:
    """The movement's own columns (reason, transfer, reference, count) for storage."""
    detail = movement.detail
    columns: dict[str, str | int] = {
        "reason_code": "",
        "transfer_id": "",
        "counterpart_location_id": "",
        "reference": "",
        "counted_quantity": 0,
    }
    match detail:
        case Adjustment(reason_code=reason) | StateChange(reason_code=reason):
            columns["reason_code"] = reason
        case Receipt(reference=reference) | Shipment(reference=reference):
            columns["reference"] = reference
        case CustomerReturn(reference=reference):
            columns["reference"] = reference
        case TransferOut(transfer_id=transfer, destination_location_id=destination):
            columns["transfer_id"] = transfer
            columns["counterpart_location_id"] = destination
        case TransferIn(transfer_id=transfer):
            columns["transfer_id"] = transfer
        case CycleCount(counted_quantity=counted):
            columns["counted_quantity"] = counted
    return columns


# ---------------------------------------------------------------------------
# Returns routed by order routing: the movements each disposition stands for.


class ReturnDisposition(StrEnum):
    """What order routing decided for returned units (omni.routing.v1.ReturnDisposition)."""

    RESTOCK = "restock"
    SEND_TO_DISTRIBUTION_CENTRE = "send_to_distribution_centre"
    QUARANTINE = "quarantine"
    WRITE_OFF = "write_off"


WRITTEN_OFF_REASON = "WRITTEN_OFF"
_RETURN_DEVICE_PREFIX = "return:"
# For a return id that does not fit "return:<return_id>" into a device id (longer
# than 57 characters, or with characters the id rule refuses). The readable form
# always starts with "return:", this one never does, so the two cannot meet.
_HASHED_RETURN_DEVICE_PREFIX = "return-sha256:"
_RETURN_DIGEST_LENGTH = 40  # hex characters, 160 bits


@dataclass(frozen=True)
class ReturnedLine:
    """Units of one SKU returned at a store, and what happens to them."""

    sku: str
    quantity: int
    disposition: ReturnDisposition | None
    destination_location_id: str = ""
    transfer_id: str = ""


@dataclass(frozen=True)
class RoutedReturn:
    """A customer return handed in at a store, with a disposition per line."""

    return_id: str
    location_id: str
    lines: tuple[ReturnedLine, ...]
    occurred_at: datetime | None = None


def return_device_id(return_id: str) -> str:
    """The device id the movements of a return are keyed by: stable, at most 64 characters.

    ``return:<return_id>`` when that is a valid identifier, otherwise
    ``return-sha256:`` and the first 40 hex digits of the id's SHA-256.
    """
    readable = _RETURN_DEVICE_PREFIX + return_id
    if ID_PATTERN.fullmatch(readable):
        return readable
    digest = hashlib.sha256(return_id.encode()).hexdigest()[:_RETURN_DIGEST_LENGTH]
    return _HASHED_RETURN_DEVICE_PREFIX + digest


def return_movements(routed: RoutedReturn) -> list[PostMovement]:
    """The movements of a routed return, in posting order, for one batch.

    Every line first comes back into the store as a customer return (reference:
    the return id): restocked into sellable, quarantined into quarantine,
    written off into damaged. Units sent to a distribution centre are then
    transferred out of the store's sellable stock on the line's transfer; units
    written off leave damaged with an adjustment ``WRITTEN_OFF``. The keys are
    ``(return_device_id(return_id), 1, 2, ...)`` in that order, so posting the
    same return again replays instead of counting twice.

    Raises InvalidArgument for a return without id or lines, or a line without a
    known disposition; quantities, SKUs, locations and transfers are checked by
    :func:`validate_batch` like those of any other batch.
    """
    problems: list[FieldViolation] = []
    if not routed.return_id:
        problems.append(FieldViolation("order_return.return_id", "the return id is required"))
    if not routed.lines:
        problems.append(FieldViolation("order_return.lines", "must contain at least one line"))
    for index, line in enumerate(routed.lines):
        if line.disposition is None:
            problems.append(
                FieldViolation(
                    f"order_return.lines[{index}].disposition", "is not a known disposition"
                )
            )
    if problems:
        raise InvalidArgument(problems, reason="INVALID_RETURN")
    device = return_device_id(routed.return_id)
    steps = [
        (line.sku, detail)
        for line in routed.lines
        for detail in _disposition_details(line, routed.return_id)
    ]
    return [
        PostMovement(IdempotencyKey(device, sequence), sku, routed.location_id, detail,
                     routed.occurred_at)
        for sequence, (sku, detail) in enumerate(steps, start=1)
    ]  # fmt: skip


def _disposition_details(line: ReturnedLine, reference: str) -> list[MovementDetail]:
    quantity = line.quantity
    match line.disposition:
        case ReturnDisposition.RESTOCK:
            return [CustomerReturn(quantity, StockState.SELLABLE, reference)]
        case ReturnDisposition.SEND_TO_DISTRIBUTION_CENTRE:
            return [
                CustomerReturn(quantity, StockState.SELLABLE, reference),
                TransferOut(line.transfer_id, line.destination_location_id, quantity),
            ]
        case ReturnDisposition.QUARANTINE:
            return [CustomerReturn(quantity, StockState.QUARANTINE, reference)]
        case ReturnDisposition.WRITE_OFF:
            return [
                CustomerReturn(quantity, StockState.DAMAGED, reference),
                Adjustment(-quantity, WRITTEN_OFF_REASON, StockState.DAMAGED),
            ]
    raise AssertionError(f"unvalidated return line {line!r}")


# ---------------------------------------------------------------------------
# Master data.


class LocationKind(StrEnum):
    """Store or distribution centre."""

    STORE = "store"
    DISTRIBUTION_CENTRE = "distribution_centre"


@dataclass(frozen=True)
class Location:
    """A store or distribution centre and what it can do."""

    location_id: str
    kind: LocationKind | None
    name: str
    city: str
    latitude: float
    longitude: float
    ship_from_store: bool = False
    click_and_collect: bool = False
    accepts_returns: bool = False
    daily_capacity: int = 0
    active: bool = True


@dataclass(frozen=True)
class Sku:
    """A variant of a product in the catalogue."""

    sku: str
    product_id: str
    name: str
    colour: str = ""
    size: str = ""
    barcode: str = ""


MAX_LOCATIONS_PER_REQUEST = 500
MAX_SKUS_PER_REQUEST = 1000
_BARCODE = re.compile(r"[0-9]{8,14}")


def _check_master_batch(
    field: str, id_field: str, ids: Sequence[str], noun: str, maximum: int
) -> list[FieldViolation]:
    """A batch of master data: not empty, not too large, every id well-formed and unique."""
    problems: list[FieldViolation] = []
    if not ids:
        problems.append(FieldViolation(field, f"must contain at least one {noun}"))
    if len(ids) > maximum:
        problems.append(FieldViolation(field, f"at most {maximum} per request"))
    seen: set[str] = set()
    for index, identifier in enumerate(ids):
        path = f"{field}[{index}].{id_field}"
        problems += check_id(identifier, path, f"the {noun} id")
        if identifier in seen:
            problems.append(FieldViolation(path, "appears twice in the request"))
        seen.add(identifier)
    return problems


def validate_locations(locations: Sequence[Location]) -> None:
    """Raise InvalidArgument naming every problem in a batch of locations."""
    problems: list[FieldViolation] = []
    problems += _check_master_batch(
        "locations", "location_id", [loc.location_id for loc in locations],
        "location", MAX_LOCATIONS_PER_REQUEST,
    )  # fmt: skip
    for index, location in enumerate(locations):
        path = f"locations[{index}]"
        if location.kind is None:
            problems.append(FieldViolation(f"{path}.kind", "store or distribution centre"))
        if not location.name.strip():
            problems.append(FieldViolation(f"{path}.name", "a name is required"))
        problems += check_text(location.name, f"{path}.name", MAX_NAME_LENGTH)
        problems += check_text(location.city, f"{path}.city", MAX_SHORT_TEXT_LENGTH)
        if not -90 <= location.latitude <= 90 or not -180 <= location.longitude <= 180:
            problems.append(FieldViolation(f"{path}.position", "latitude/longitude out of range"))
        if location.latitude == 0 and location.longitude == 0:
            problems.append(FieldViolation(f"{path}.position", "a position is required"))
        if location.daily_capacity < 0:
            problems.append(FieldViolation(f"{path}.capabilities.daily_capacity", "must be >= 0"))
    if problems:
        raise InvalidArgument(problems, reason="INVALID_LOCATIONS")


def validate_skus(skus: Sequence[Sku]) -> None:
    """Raise InvalidArgument naming every problem in a batch of SKUs."""
    problems: list[FieldViolation] = []
    problems += _check_master_batch(
        "skus", "sku", [sku.sku for sku in skus], "SKU", MAX_SKUS_PER_REQUEST
    )
    for index, sku in enumerate(skus):
        path = f"skus[{index}]"
        problems += check_id(sku.product_id, f"{path}.product_id", "the product id")
        if not sku.name.strip():
            problems.append(FieldViolation(f"{path}.name", "a name is required"))
        problems += check_text(sku.name, f"{path}.name", MAX_NAME_LENGTH)
        problems += check_text(sku.colour, f"{path}.colour", MAX_SHORT_TEXT_LENGTH)
        problems += check_text(sku.size, f"{path}.size", MAX_SHORT_TEXT_LENGTH)
        if sku.barcode and not _BARCODE.fullmatch(sku.barcode):
            problems.append(FieldViolation(f"{path}.barcode", "must be 8 to 14 digits"))
    if problems:
        raise InvalidArgument(problems, reason="INVALID_SKUS")


# -- fulfilment ----------------------------------------------------------------------

# Each fact of a fulfilment numbers its movements from its own block, so the
# facts of one fulfilment never share a key.
_FULFILMENT_SEQUENCE_BLOCKS = {"shipped": 0, "received": 1000, "collected": 2000}


@dataclass(frozen=True)
class FulfilmentFact:
    """Goods that moved for a fulfilment: shipped, received by transfer, or collected."""

    fact: str  # "shipped", "received" or "collected"
    fulfilment_id: str
    order_id: str
    location_id: str  # where the movement is posted
    lines: tuple[tuple[str, int], ...]  # (sku, units)
    transfer_to: str = ""  # shipped on a transfer to this pickup store
    occurred_at: datetime | None = None


def fulfilment_movements(fact: FulfilmentFact) -> list[PostMovement]:
    """The movements of a fulfilment fact, keyed ``fulfilment:<id>`` per fact.

    Shipped to a customer: a shipment (reference: the order). Shipped on a
    transfer: a transfer out to the pickup store, the fulfilment id being the
    transfer id. Received: the transfer in at the pickup store. Collected: a
    shipment from the pickup store to the customer.
    """
    details: list[tuple[str, MovementDetail]] = []
    for sku, units in fact.lines:
        if fact.fact == "shipped" and fact.transfer_to:
            details.append((sku, TransferOut(fact.fulfilment_id, fact.transfer_to, units)))
        elif fact.fact == "received":
            details.append((sku, TransferIn(fact.fulfilment_id, units)))
        else:
            details.append((sku, Shipment(units, fact.order_id)))
    device = fulfilment_device(fact.fulfilment_id)
    first = _FULFILMENT_SEQUENCE_BLOCKS[fact.fact] + 1
    return [
        PostMovement(IdempotencyKey(device, sequence), sku, fact.location_id, detail,
                     fact.occurred_at)
        for sequence, (sku, detail) in enumerate(details, start=first)
    ]  # fmt: skip
