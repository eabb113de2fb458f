"""The demo network is realistic: real Dutch coordinates, valid barcodes, stable stock."""

from __future__ import annotations

from omni.common.v1 import types_pb2
from services.demo.network import build_locations, build_opening_stock, build_skus, read_demo


def ean13_valid(code: str) -> bool:
    digits = [int(d) for d in code]
    return sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10 == 0


def test_locations_sit_at_their_real_cities() -> None:
    locations = {loc.location_id: loc for loc in build_locations(read_demo())}
    utrecht = locations["store-utrecht"]
    assert utrecht.name == "Utrecht Centraal"
    assert abs(utrecht.position.latitude - 52.09) < 0.05
    assert abs(utrecht.position.longitude - 5.12) < 0.05
    assert all(50.7 < loc.position.latitude < 53.6 for loc in locations.values())  # NL
    kinds = [loc.kind for loc in locations.values()]
    assert kinds.count(types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE) == 2


def test_skus_have_sizes_colours_and_valid_barcodes() -> None:
    skus = build_skus(read_demo())
    assert len(skus) == len({s.sku for s in skus}) == 49
    assert "JKT-RAIN-NVY-M" in {s.sku for s in skus}
    assert all(len(s.barcode) == 13 and ean13_valid(s.barcode) for s in skus)
    assert len({s.barcode for s in skus}) == len(skus)


def test_opening_stock_is_deterministic_with_unique_keys() -> None:
    document = read_demo()
    locations, skus = build_locations(document), build_skus(document)
    first = build_opening_stock(document, locations, skus)
    second = build_opening_stock(document, locations, skus)
    assert first == second
    assert len({m.key.sequence for m in first}) == len(first)
    assert all(m.receipt.quantity > 0 for m in first)
