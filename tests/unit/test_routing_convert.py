"""Routing rules cross the wire and the database unchanged."""

from __future__ import annotations

from dataclasses import fields, replace

from omni.routing.v1 import resources_pb2 as pb
from services.routing import convert
from services.routing.planner import Rules


def test_every_rule_field_is_translated() -> None:
    domain_fields = {f.name for f in fields(Rules)}
    wire_fields = {f.name for f in pb.RoutingRules.DESCRIPTOR.fields} - {"updated_at"}
    assert domain_fields == wire_fields


def test_rules_round_trip_through_the_wire_and_the_database() -> None:
    rules = Rules(
        version=7,
        shipment_cost_cents=610,
        cost_per_km_cents=3,
        split_margin_percent=15,
        max_ship_from_store_km=120,
        excluded_location_ids=frozenset({"store-leiden", "store-zwolle"}),
        priorities={"dc-tilburg": 2, "store-utrecht": -1},
        priority_step_cents=25,
        max_replans=5,
        time_zone="Europe/Brussels",
    )

    through_wire = convert.rules_in(convert.rules_out(rules))
    through_database = convert.rules_from_json(7, convert.rules_to_json(rules))

    assert through_wire == replace(rules, version=0)  # the service assigns versions
    assert through_database == rules
