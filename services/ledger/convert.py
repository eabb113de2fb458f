"""Translation between the wire (omni.ledger.v1 messages) and the ledger's domain.

Conversion is lenient on purpose: a missing or unknown field becomes an empty
value that ``domain.validate_batch`` reports together with every other problem
of the batch, so the caller gets all of them in one answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from omni.common.v1 import types_pb2
from omni.ledger.v1 import events_pb2, resources_pb2
from omni.routing.v1 import events_pb2 as routing_events
from omni.routing.v1 import resources_pb2 as routing_resources
from omnistock.errors import FieldViolation, InvalidArgument
from omnistock.wire import timestamp_in, timestamp_out
from services.ledger import domain

_STATES = {
    types_pb2.STOCK_STATE_SELLABLE: domain.StockState.SELLABLE,
    types_pb2.STOCK_STATE_DAMAGED: domain.StockState.DAMAGED,
    types_pb2.STOCK_STATE_QUARANTINE: domain.StockState.QUARANTINE,
    types_pb2.STOCK_STATE_IN_TRANSIT: domain.StockState.IN_TRANSIT,
}
_STATES_OUT = {state: number for number, state in _STATES.items()}

_KINDS_OUT = {
    domain.MovementKind.RECEIPT: resources_pb2.MOVEMENT_KIND_RECEIPT,
    domain.MovementKind.ADJUSTMENT: resources_pb2.MOVEMENT_KIND_ADJUSTMENT,
    domain.MovementKind.TRANSFER_OUT: resources_pb2.MOVEMENT_KIND_TRANSFER_OUT,
    domain.MovementKind.TRANSFER_IN: resources_pb2.MOVEMENT_KIND_TRANSFER_IN,
    domain.MovementKind.CYCLE_COUNT: resources_pb2.MOVEMENT_KIND_CYCLE_COUNT,
    domain.MovementKind.SHIPMENT: resources_pb2.MOVEMENT_KIND_SHIPMENT,
    domain.MovementKind.RETURN: resources_pb2.MOVEMENT_KIND_RETURN,
    domain.MovementKind.STATE_CHANGE: resources_pb2.MOVEMENT_KIND_STATE_CHANGE,
}

_DISPOSITIONS = {
    routing_resources.RETURN_DISPOSITION_RESTOCK: domain.ReturnDisposition.RESTOCK,
    routing_resources.RETURN_DISPOSITION_SEND_TO_DISTRIBUTION_CENTRE: (
        domain.ReturnDisposition.SEND_TO_DISTRIBUTION_CENTRE
    ),
    routing_resources.RETURN_DISPOSITION_QUARANTINE: domain.ReturnDisposition.QUARANTINE,
    routing_resources.RETURN_DISPOSITION_WRITE_OFF: domain.ReturnDisposition.WRITE_OFF,
}

_LOCATION_KINDS = {
    types_pb2.LOCATION_KIND_STORE: domain.LocationKind.STORE,
    types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE: domain.LocationKind.DISTRIBUTION_CENTRE,
}
_LOCATION_KINDS_OUT = {kind: number for number, kind in _LOCATION_KINDS.items()}


def state_in(value: int) -> domain.StockState | None:
    """A wire stock state; None when unspecified or unknown."""
    return _STATES.get(types_pb2.StockState.ValueType(value))


def state_out(state: domain.StockState) -> types_pb2.StockState.ValueType:
    """The wire value of a stock state."""
    return _STATES_OUT[state]


def location_kind_in(value: int) -> domain.LocationKind | None:
    """A wire location kind; None when unspecified or unknown."""
    return _LOCATION_KINDS.get(types_pb2.LocationKind.ValueType(value))


def states_filter(values: Sequence[int], field: str) -> list[domain.StockState]:
    """Stock states asked for in a query; an unknown or unspecified value is an error."""
    states = [state_in(value) for value in values]
    bad = [f"{field}[{i}]" for i, state in enumerate(states) if state is None]
    if bad:
        raise InvalidArgument([FieldViolation(name, "is not a known stock state") for name in bad])
    return [state for state in states if state is not None]


def location_kind_filter(value: int) -> domain.LocationKind | None:
    """A location kind asked for in a query: None for all, an error when unknown."""
    if value == types_pb2.LOCATION_KIND_UNSPECIFIED:
        return None
    kind = location_kind_in(value)
    if kind is None:
        raise InvalidArgument([FieldViolation("kind", f"{value} is not a known location kind")])
    return kind


def movement_in(message: resources_pb2.MovementInput, index: int) -> domain.PostMovement:
    """The command for one movement of a PostMovements request."""
    detail: domain.MovementDetail | None
    match message.WhichOneof("kind"):
        case "receipt":
            r = message.receipt
            detail = domain.Receipt(r.quantity, state_in(r.state), r.reference)
        case "adjustment":
            a = message.adjustment
            detail = domain.Adjustment(a.quantity_delta, a.reason_code, state_in(a.state))
        case "transfer_out":
            t = message.transfer_out
            detail = domain.TransferOut(t.transfer_id, t.destination_location_id, t.quantity)
        case "transfer_in":
            detail = domain.TransferIn(
                message.transfer_in.transfer_id, message.transfer_in.quantity
            )
        case "cycle_count":
            c = message.cycle_count
            detail = domain.CycleCount(c.counted_quantity, state_in(c.state))
        case "shipment":
            detail = domain.Shipment(message.shipment.quantity, message.shipment.reference)
        case "customer_return":
            cr = message.customer_return
            detail = domain.CustomerReturn(cr.quantity, state_in(cr.state), cr.reference)
        case "state_change":
            sc = message.state_change
            detail = domain.StateChange(
                sc.quantity, state_in(sc.from_state), state_in(sc.to_state), sc.reason_code
            )
        case _:
            detail = None
    return domain.PostMovement(
        key=domain.IdempotencyKey(message.key.device_id, message.key.sequence),
        sku=message.sku,
        location_id=message.location_id,
        detail=detail,
        occurred_at=timestamp_in(
            message.occurred_at,
            message.HasField("occurred_at"),
            f"movements[{index}].occurred_at",
        ),
    )


def kind_out(kind: domain.MovementKind) -> resources_pb2.MovementKind.ValueType:
    """The wire value of a movement kind."""
    return _KINDS_OUT[kind]


def stock_key_out(key: domain.StockKey) -> types_pb2.StockKey:
    """The wire form of a stock key."""
    return types_pb2.StockKey(sku=key.sku, location_id=key.location_id, state=state_out(key.state))


def posting_out(posting: domain.Posting) -> resources_pb2.Posting:
    """The wire form of a posting."""
    return resources_pb2.Posting(
        stock=stock_key_out(posting.stock),
        quantity_delta=posting.quantity_delta,
        on_hand_after=posting.on_hand_after,
        balance_version=posting.balance_version,
        ledger_sequence=posting.ledger_sequence,
    )


def key_out(key: domain.IdempotencyKey) -> resources_pb2.IdempotencyKey:
    """The wire form of an idempotency key."""
    return resources_pb2.IdempotencyKey(device_id=key.device_id, sequence=key.sequence)


def movement_out(movement: domain.RecordedMovement) -> resources_pb2.Movement:
    """The wire form of a recorded movement."""
    return resources_pb2.Movement(
        movement_id=movement.movement_id,
        key=key_out(movement.key),
        kind=kind_out(movement.kind),
        sku=movement.sku,
        location_id=movement.location_id,
        postings=[posting_out(p) for p in movement.postings],
        occurred_at=timestamp_out(movement.occurred_at),
        recorded_at=timestamp_out(movement.recorded_at),
        reason_code=movement.reason_code,
        transfer_id=movement.transfer_id,
        counterpart_location_id=movement.counterpart_location_id,
        reference=movement.reference,
        counted_quantity=movement.counted_quantity,
    )


def stock_moved(movement: domain.RecordedMovement) -> events_pb2.StockMoved:
    """The StockMoved event of a recorded movement."""
    return events_pb2.StockMoved(movement=movement_out(movement))


def location_in(message: resources_pb2.Location) -> domain.Location:
    """A location from the wire."""
    caps = message.capabilities
    return domain.Location(
        location_id=message.location_id,
        kind=location_kind_in(message.kind),
        name=message.name,
        city=message.city,
        latitude=message.position.latitude,
        longitude=message.position.longitude,
        ship_from_store=caps.ship_from_store,
        click_and_collect=caps.click_and_collect,
        accepts_returns=caps.accepts_returns,
        daily_capacity=caps.daily_capacity,
        active=not message.closed,
    )


def location_out(location: domain.Location) -> resources_pb2.Location:
    """The wire form of a location."""
    assert location.kind is not None
    return resources_pb2.Location(
        location_id=location.location_id,
        kind=_LOCATION_KINDS_OUT[location.kind],
        name=location.name,
        city=location.city,
        position=types_pb2.GeoPoint(latitude=location.latitude, longitude=location.longitude),
        capabilities=resources_pb2.LocationCapabilities(
            ship_from_store=location.ship_from_store,
            click_and_collect=location.click_and_collect,
            accepts_returns=location.accepts_returns,
            daily_capacity=location.daily_capacity,
        ),
        closed=not location.active,
    )


def sku_in(message: resources_pb2.Sku) -> domain.Sku:
    """A SKU from the wire."""
    return domain.Sku(
        message.sku, message.product_id, message.name, message.colour, message.size, message.barcode
    )


def sku_out(sku: domain.Sku) -> resources_pb2.Sku:
    """The wire form of a SKU."""
    return resources_pb2.Sku(
        sku=sku.sku,
        product_id=sku.product_id,
        name=sku.name,
        colour=sku.colour,
        size=sku.size,
        barcode=sku.barcode,
    )


def location_upserted(location: domain.Location) -> events_pb2.LocationUpserted:
    """The LocationUpserted event of a stored location."""
    return events_pb2.LocationUpserted(location=location_out(location))


def sku_upserted(sku: domain.Sku) -> events_pb2.SkuUpserted:
    """The SkuUpserted event of a stored SKU."""
    return events_pb2.SkuUpserted(sku=sku_out(sku))


def routed_return_in(event: routing_events.ReturnRouted) -> domain.RoutedReturn:
    """The return of order routing's ReturnRouted; an unknown disposition becomes None."""
    order_return = event.order_return
    return domain.RoutedReturn(
        return_id=order_return.return_id,
        location_id=order_return.location_id,
        lines=tuple(
            domain.ReturnedLine(
                sku=line.sku,
                quantity=line.quantity,
                disposition=_DISPOSITIONS.get(
                    routing_resources.ReturnDisposition.ValueType(line.disposition)
                ),
                destination_location_id=line.destination_location_id,
                transfer_id=line.transfer_id,
            )
            for line in order_return.lines
        ),
        occurred_at=timestamp_in(
            order_return.created_at,
            order_return.HasField("created_at"),
            "order_return.created_at",
        ),
    )
