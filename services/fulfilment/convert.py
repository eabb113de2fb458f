"""Translation between the fulfilment contract (protobuf) and the domain."""

from __future__ import annotations

from omni.fulfilment.v1 import events_pb2
from omni.fulfilment.v1 import resources_pb2 as pb
from omni.routing.v1 import resources_pb2 as routing_pb
from omnistock import wire
from services.fulfilment.domain import Fulfilment, Kind, Status

KINDS_OUT = {kind: pb.FulfilmentType.Value(f"FULFILMENT_TYPE_{kind.name}") for kind in Kind}
# Routing names the same four kinds in its own package.
KINDS_FROM_ROUTING = {
    routing_pb.FulfilmentType.Value(f"FULFILMENT_TYPE_{kind.name}"): kind for kind in Kind
}
STATUSES_OUT = {s: pb.FulfilmentStatus.Value(f"FULFILMENT_STATUS_{s.name}") for s in Status}
STATUSES_IN = {v: k for k, v in STATUSES_OUT.items()}


def fulfilment_out(f: Fulfilment) -> pb.Fulfilment:
    """A task on the wire (never its pickup code)."""
    out = pb.Fulfilment(
        fulfilment_id=f.fulfilment_id,
        order_id=f.order_id,
        channel=f.channel,
        location_id=f.location_id,
        type=KINDS_OUT[f.kind],
        pickup_location_id=f.pickup_location_id,
        items=[
            pb.FulfilmentItem(
                line_number=i.line_number, sku=i.sku, quantity=i.quantity, picked_quantity=i.picked
            )
            for i in f.items
        ],
        status=STATUSES_OUT[f.status],
        carrier=f.carrier,
        tracking_number=f.tracking_number,
        reason_code=f.reason_code,
        cancel_on_arrival=f.cancel_on_arrival,
    )
    for field, value in (
        ("created_at", f.created_at),
        ("updated_at", f.updated_at),
        ("accept_by", f.accept_by),
        ("collect_by", f.collect_by),
    ):
        if value is not None:
            getattr(out, field).CopyFrom(wire.timestamp_out(value))
    return out


def lines(pairs: list[tuple[str, int]]) -> list[events_pb2.FulfilmentLine]:
    """Units per SKU as event lines (zero quantities left out)."""
    return [events_pb2.FulfilmentLine(sku=sku, quantity=q) for sku, q in pairs if q > 0]
