"""Translation between the routing contract (protobuf) and the domain."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

from omni.common.v1 import types_pb2
from omni.ledger.v1 import resources_pb2 as ledger_pb
from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from omnistock import wire
from services.routing import domain, planner
from services.routing.domain import AllocationStatus, Disposition, ItemCondition, OrderStatus
from services.routing.planner import FulfilmentType, Method, Outcome, SourceKind

METHODS = {
    pb.DELIVERY_METHOD_SHIP_TO_HOME: Method.SHIP_TO_HOME,
    pb.DELIVERY_METHOD_CLICK_AND_COLLECT: Method.CLICK_AND_COLLECT,
}
METHODS_OUT = {v: k for k, v in METHODS.items()}
TYPES_OUT = {
    FulfilmentType.SHIP_FROM_STORE: pb.FULFILMENT_TYPE_SHIP_FROM_STORE,
    FulfilmentType.SHIP_FROM_DISTRIBUTION_CENTRE: pb.FULFILMENT_TYPE_SHIP_FROM_DISTRIBUTION_CENTRE,
    FulfilmentType.PICKUP_AT_STORE: pb.FULFILMENT_TYPE_PICKUP_AT_STORE,
    FulfilmentType.TRANSFER_TO_STORE: pb.FULFILMENT_TYPE_TRANSFER_TO_STORE,
}
OUTCOMES_OUT = {
    outcome: pb.CandidateOutcome.Value(f"CANDIDATE_OUTCOME_{outcome.name}") for outcome in Outcome
}
STATUSES_OUT = {
    status: pb.OrderStatus.Value(f"ORDER_STATUS_{status.name}") for status in OrderStatus
}
ALLOCATIONS_OUT = {
    status: pb.AllocationStatus.Value(f"ALLOCATION_STATUS_{status.name}")
    for status in AllocationStatus
}
CONDITIONS = {
    pb.ITEM_CONDITION_SELLABLE: ItemCondition.SELLABLE,
    pb.ITEM_CONDITION_DAMAGED: ItemCondition.DAMAGED,
    pb.ITEM_CONDITION_NEEDS_INSPECTION: ItemCondition.NEEDS_INSPECTION,
}
CONDITIONS_OUT = {v: k for k, v in CONDITIONS.items()}
DISPOSITIONS_OUT = {
    d: pb.ReturnDisposition.Value(f"RETURN_DISPOSITION_{d.name}") for d in Disposition
}
KINDS_OUT = {
    SourceKind.STORE: types_pb2.LOCATION_KIND_STORE,
    SourceKind.DISTRIBUTION_CENTRE: types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE,
}
KINDS_IN = {v: k for k, v in KINDS_OUT.items()}


# -- requests -------------------------------------------------------------------------


def customer_in(customer: pb.Customer, has_position: bool) -> domain.Customer:
    """The customer of a request."""
    position = (
        planner.GeoPoint(customer.position.latitude, customer.position.longitude)
        if has_position
        else None
    )
    return domain.Customer(
        position=position,
        postcode=customer.postcode,
        country=customer.country,
        pickup_location_id=customer.pickup_location_id,
    )


def order_in(
    request: service_pb.RouteOrderRequest | service_pb.QuoteOrderRequest,
) -> domain.OrderInput:
    """The order of a RouteOrder or QuoteOrder request."""
    options = request.options
    return domain.OrderInput(
        channel=request.channel,
        method=METHODS.get(request.delivery_method),
        customer=customer_in(request.customer, request.customer.HasField("position")),
        lines=tuple(domain.LineInput(line.sku, line.quantity) for line in request.lines),
        allow_split=options.allow_split,
        deliver_by=wire.timestamp_in(
            options.deliver_by, options.HasField("deliver_by"), "options.deliver_by"
        ),
        cart_reservation_id=request.cart_reservation_id,
        order_id=request.order_id if isinstance(request, service_pb.RouteOrderRequest) else "",
    )


def return_lines_in(request: service_pb.RouteReturnRequest) -> list[domain.ReturnInput]:
    """The lines of a RouteReturn request."""
    return [
        domain.ReturnInput(line.sku, line.quantity, CONDITIONS.get(line.condition))
        for line in request.lines
    ]


def location_in(location: ledger_pb.Location) -> planner.Location | None:
    """A location the ledger announced; None for a kind routing does not know."""
    kind = KINDS_IN.get(location.kind)
    if kind is None:
        return None
    caps = location.capabilities
    return planner.Location(
        location_id=location.location_id,
        kind=kind,
        name=location.name or location.location_id,
        position=planner.GeoPoint(location.position.latitude, location.position.longitude),
        ship_from_store=caps.ship_from_store,
        click_and_collect=caps.click_and_collect,
        accepts_returns=caps.accepts_returns,
        daily_capacity=caps.daily_capacity,
        closed=location.closed,
    )


# -- rules ----------------------------------------------------------------------------


# Rule fields that are plain numbers or text, the same on the wire and in the domain.
_SCALAR_RULES = (
    "shipment_cost_cents",
    "cost_per_km_cents",
    "store_handling_cents",
    "distribution_centre_handling_cents",
    "transfer_cost_cents",
    "split_margin_percent",
    "max_ship_from_store_km",
    "distribution_centre_delivery_days",
    "store_delivery_days",
    "transfer_days",
    "pickup_ready_hours",
    "nearby_store_km",
    "priority_step_cents",
    "max_replans",
    "time_zone",
)


def rules_in(rules: pb.RoutingRules) -> planner.Rules:
    """Rules as an admin sends them (the version is the service's to assign)."""
    return planner.Rules(
        version=0,
        excluded_location_ids=frozenset(rules.excluded_location_ids),
        priorities={p.location_id: p.priority for p in rules.priorities},
        **{name: getattr(rules, name) for name in _SCALAR_RULES},
    )


def rules_out(rules: planner.Rules, updated_at: datetime | None = None) -> pb.RoutingRules:
    """Rules on the wire."""
    out = pb.RoutingRules(
        version=rules.version,
        excluded_location_ids=sorted(rules.excluded_location_ids),
        priorities=[
            pb.LocationPriority(location_id=loc, priority=p)
            for loc, p in sorted(rules.priorities.items())
        ],
        **{name: getattr(rules, name) for name in _SCALAR_RULES},
    )
    if updated_at is not None:
        out.updated_at.CopyFrom(wire.timestamp_out(updated_at))
    return out


def rules_to_json(rules: planner.Rules) -> str:
    """Rules as stored (the version is the row's key)."""
    body = asdict(rules)
    body.pop("version")
    body["excluded_location_ids"] = sorted(rules.excluded_location_ids)
    body["priorities"] = dict(sorted(rules.priorities.items()))
    return json.dumps(body, sort_keys=True)


def rules_from_json(version: int, text: str) -> planner.Rules:
    """Rules as stored; fields added later keep their defaults."""
    body = json.loads(text)
    body["excluded_location_ids"] = frozenset(body.get("excluded_location_ids", ()))
    known = set(planner.Rules.__dataclass_fields__)
    return planner.Rules(version=version, **{k: v for k, v in body.items() if k in known})


# -- plans and orders ------------------------------------------------------------------


def plan_out(
    plan: planner.Plan, *, plan_number: int, planned_at: datetime, replans: int
) -> pb.Plan:
    """A plan on the wire."""
    out = pb.Plan(
        plan_number=plan_number,
        rules_version=plan.rules_version,
        shipments=[
            pb.PlannedShipment(
                shipment_number=n,
                source_location_id=s.source_id,
                source_kind=KINDS_OUT[s.source_kind],
                type=TYPES_OUT[s.type],
                lines=[
                    pb.PlannedLine(line_number=p.line_number, sku=p.sku, quantity=p.quantity)
                    for p in s.lines
                ],
                distance_km=s.distance_km,
                cost_cents=s.cost_cents,
                estimated_at=wire.timestamp_out(s.estimated_at),
                pickup_location_id=s.pickup_location_id,
            )
            for n, s in enumerate(plan.shipments, start=1)
        ],
        unsourced=[
            pb.UnsourcedLine(
                line_number=u.line_number, sku=u.sku, quantity=u.quantity, reason=u.reason
            )
            for u in plan.unsourced
        ],
        total_cost_cents=plan.total_cost_cents,
        candidates=[
            pb.CandidateReason(
                location_id=v.location_id,
                outcome=OUTCOMES_OUT[v.outcome],
                distance_km=v.distance_km,
                cost_cents=v.cost_cents,
                extra_cost_cents=v.extra_cost_cents,
                explanation=v.explanation,
            )
            for v in plan.verdicts
        ],
        nearby_stores=[
            pb.NearbyStore(
                location_id=s.location_id,
                name=s.name,
                distance_km=s.distance_km,
                ready_at=wire.timestamp_out(s.ready_at),
            )
            for s in plan.suggestions
        ],
        summary=plan.summary,
        replans=replans,
        unlisted=[
            pb.OutcomeCount(outcome=OUTCOMES_OUT[outcome], locations=count)
            for outcome, count in plan.unlisted
        ],
    )
    out.planned_at.CopyFrom(wire.timestamp_out(planned_at))
    if plan.estimated_at is not None:
        out.estimated_at.CopyFrom(wire.timestamp_out(plan.estimated_at))
    return out


def allocation_out(a: domain.Allocation) -> pb.Allocation:
    """An allocation on the wire."""
    return pb.Allocation(
        allocation_id=a.allocation_id,
        line_number=a.line_number,
        sku=a.sku,
        location_id=a.location_id,
        quantity=a.quantity,
        type=TYPES_OUT[a.type],
        pickup_location_id=a.pickup_location_id,
        reservation_id=a.reservation_id,
        reservation_line_number=a.reservation_line,
        status=ALLOCATIONS_OUT[a.status],
        fulfilled_quantity=a.fulfilled,
        plan_number=a.plan_number,
    )


def return_out(r: domain.OrderReturn) -> pb.OrderReturn:
    """A return on the wire."""
    return pb.OrderReturn(
        return_id=r.return_id,
        order_id=r.order_id,
        location_id=r.location_id,
        lines=[
            pb.ReturnLine(
                line_number=line.line_number,
                sku=line.sku,
                quantity=line.quantity,
                condition=CONDITIONS_OUT[line.condition],
                disposition=DISPOSITIONS_OUT[line.disposition],
                destination_location_id=line.destination_location_id,
                transfer_id=line.transfer_id,
                explanation=line.explanation,
            )
            for line in r.lines
        ],
        created_at=wire.timestamp_out(r.created_at),
    )


def order_out(
    order: domain.Order, plan: pb.Plan | bytes | None, returns: list[bytes] | None = None
) -> pb.Order:
    """An order on the wire; ``plan`` as built or as stored, ``returns`` as stored."""
    c = order.customer
    out = pb.Order(
        order_id=order.order_id,
        channel=order.channel,
        delivery_method=METHODS_OUT[order.method],
        customer=pb.Customer(
            postcode=c.postcode, country=c.country, pickup_location_id=c.pickup_location_id
        ),
        options=pb.RoutingOptions(allow_split=order.allow_split),
        lines=[
            pb.OrderLine(
                line_number=line.line_number,
                sku=line.sku,
                quantity=line.quantity,
                cancelled_quantity=line.cancelled,
                fulfilled_quantity=line.fulfilled,
                returned_quantity=line.returned,
            )
            for line in order.lines
        ],
        status=STATUSES_OUT[order.status],
        allocations=[
            allocation_out(a)
            for a in sorted(
                order.allocations,
                key=lambda a: (a.plan_number, a.line_number, a.location_id, a.allocation_id),
            )
        ],
        failed_location_ids=list(order.failed),
        cart_reservation_id=order.cart_reservation_id,
        attention_reason=order.attention_reason,
    )
    if c.position is not None:
        out.customer.position.latitude = c.position.latitude
        out.customer.position.longitude = c.position.longitude
    if order.deliver_by is not None:
        out.options.deliver_by.CopyFrom(wire.timestamp_out(order.deliver_by))
    if isinstance(plan, pb.Plan):
        out.plan.CopyFrom(plan)
    elif plan:
        out.plan.ParseFromString(plan)
    for body in returns or ():
        out.returns.add().ParseFromString(body)
    if order.created_at is not None:
        out.created_at.CopyFrom(wire.timestamp_out(order.created_at))
    if order.updated_at is not None:
        out.updated_at.CopyFrom(wire.timestamp_out(order.updated_at))
    return out
