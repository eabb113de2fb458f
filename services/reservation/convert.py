"""Translation between the reservation protos and the domain's values."""

from __future__ import annotations

from datetime import datetime

from omni.reservation.v1 import events_pb2, resources_pb2
from omni.reservation.v1 import reservation_service_pb2 as pb
from omnistock.errors import FieldViolation, InvalidArgument
from omnistock.wire import duration_in, duration_out, timestamp_out, to_datetime
from services.reservation import domain

_KINDS = {
    resources_pb2.RESERVATION_KIND_CART: domain.Kind.CART,
    resources_pb2.RESERVATION_KIND_ORDER: domain.Kind.ORDER,
}
_KINDS_OUT = {kind: value for value, kind in _KINDS.items()}
_LINE_STATUS_OUT = {
    domain.LineStatus.ACTIVE: resources_pb2.LINE_STATUS_ACTIVE,
    domain.LineStatus.RELEASED: resources_pb2.LINE_STATUS_RELEASED,
    domain.LineStatus.EXPIRED: resources_pb2.LINE_STATUS_EXPIRED,
    domain.LineStatus.CONSUMED: resources_pb2.LINE_STATUS_CONSUMED,
    domain.LineStatus.SHORT: resources_pb2.LINE_STATUS_SHORT,
}
_LINE_STATUS_IN = {value: status for status, value in _LINE_STATUS_OUT.items()}
_STATUS_OUT = {
    domain.LineStatus.ACTIVE: resources_pb2.RESERVATION_STATUS_ACTIVE,
    domain.LineStatus.RELEASED: resources_pb2.RESERVATION_STATUS_RELEASED,
    domain.LineStatus.EXPIRED: resources_pb2.RESERVATION_STATUS_EXPIRED,
    domain.LineStatus.CONSUMED: resources_pb2.RESERVATION_STATUS_CONSUMED,
    domain.LineStatus.SHORT: resources_pb2.RESERVATION_STATUS_SHORT,
}
_STATUS_IN = {value: status for status, value in _STATUS_OUT.items()}


def reserve_in(request: pb.ReserveRequest) -> domain.Reserve:
    """A Reserve request as the domain's command."""
    return domain.Reserve(
        request_id=request.request_id,
        channel=request.channel,
        reference=request.reference,
        kind=_KINDS.get(request.kind),
        lines=tuple(
            domain.ReserveLine(line.sku, line.location_id, line.quantity) for line in request.lines
        ),
        ttl=duration_in(request.ttl, request.HasField("ttl"), "ttl"),
    )


def list_reservations_in(request: pb.ListReservationsRequest) -> domain.ListReservations:
    """A ListReservations request as the domain's query; an unknown status becomes None."""
    return domain.ListReservations(
        channel=request.channel,
        reference=request.reference,
        statuses=tuple(_STATUS_IN.get(status) for status in request.statuses),
    )


def reservation_out(reservation: domain.Reservation) -> resources_pb2.Reservation:
    """A domain reservation as its proto."""
    out = resources_pb2.Reservation(
        reservation_id=reservation.reservation_id,
        channel=reservation.channel,
        reference=reservation.reference,
        kind=_KINDS_OUT[reservation.kind],
        status=_STATUS_OUT[reservation.status],
        lines=[
            resources_pb2.ReservationLine(
                line_number=line.line_number,
                sku=line.sku,
                location_id=line.location_id,
                quantity=line.quantity,
                consumed_quantity=line.consumed_quantity,
                held_quantity=line.held,
                released_quantity=line.released_quantity,
                status=_LINE_STATUS_OUT[line.status],
            )
            for line in reservation.lines
        ],
        created_at=timestamp_out(reservation.created_at),
        updated_at=timestamp_out(reservation.updated_at),
    )
    if reservation.expires_at is not None:
        out.expires_at.CopyFrom(timestamp_out(reservation.expires_at))
    return out


def reservation_in(message: resources_pb2.Reservation) -> domain.Reservation:
    """A stored answer (a Reservation proto) back as the domain's value."""
    return domain.Reservation(
        reservation_id=message.reservation_id,
        channel=message.channel,
        reference=message.reference,
        kind=_KINDS[message.kind],
        lines=tuple(
            domain.Line(
                line_number=line.line_number,
                sku=line.sku,
                location_id=line.location_id,
                quantity=line.quantity,
                consumed_quantity=line.consumed_quantity,
                status=_LINE_STATUS_IN[line.status],
            )
            for line in message.lines
        ),
        created_at=to_datetime(message.created_at),
        updated_at=to_datetime(message.updated_at),
        expires_at=to_datetime(message.expires_at) if message.HasField("expires_at") else None,
    )


def encode_reservation(reservation: domain.Reservation) -> bytes:
    """The bytes an idempotent call stores as its first answer."""
    return reservation_out(reservation).SerializeToString()


def decode_reservation(data: bytes) -> domain.Reservation:
    """The first answer of an idempotent call, from its stored bytes."""
    return reservation_in(resources_pb2.Reservation.FromString(data))


def figure_out(figure: domain.Figure) -> resources_pb2.Availability:
    """An availability figure as its proto."""
    return resources_pb2.Availability(
        sku=figure.sku,
        location_id=figure.location_id,
        channel=figure.channel,
        on_hand=figure.on_hand,
        reserved=figure.reserved,
        safety_stock=figure.safety_stock,
        available=figure.available,
        low_stock=figure.low_stock,
        version=figure.version,
    )


def figure_in(message: resources_pb2.Availability) -> domain.Figure:
    """An availability figure from an event."""
    return domain.Figure(
        sku=message.sku,
        location_id=message.location_id,
        channel=message.channel,
        on_hand=message.on_hand,
        reserved=message.reserved,
        safety_stock=message.safety_stock,
        available=message.available,
        low_stock=message.low_stock,
        version=message.version,
    )


def availability_changed(
    figures: list[domain.Figure], movement_recorded_at: datetime | None
) -> events_pb2.AvailabilityChanged:
    """The event carrying new figures of one (sku, location) or one channel network."""
    event = events_pb2.AvailabilityChanged(figures=[figure_out(f) for f in figures])
    if movement_recorded_at is not None:
        event.movement_recorded_at.CopyFrom(timestamp_out(movement_recorded_at))
    return event


def rules_in(message: resources_pb2.ChannelRules) -> domain.ChannelRules:
    """Channel rules from a SetChannelRules request."""
    ttl = duration_in(message.cart_ttl, message.HasField("cart_ttl"), "rules.cart_ttl")
    if ttl is None:
        raise InvalidArgument([FieldViolation("rules.cart_ttl", "is required")])
    return domain.ChannelRules(
        channel=message.channel,
        location_ids=tuple(message.location_ids),
        cart_ttl=ttl,
        safety_stock=message.safety_stock,
        low_stock_threshold=message.low_stock_threshold,
    )


def rules_out(rules: domain.ChannelRules) -> resources_pb2.ChannelRules:
    """Channel rules as their proto."""
    return resources_pb2.ChannelRules(
        channel=rules.channel,
        location_ids=list(rules.location_ids),
        cart_ttl=duration_out(rules.cart_ttl),
        safety_stock=rules.safety_stock,
        low_stock_threshold=rules.low_stock_threshold,
    )
