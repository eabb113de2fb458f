"""Distances on the earth, for anything with a latitude and a longitude in degrees."""

from __future__ import annotations

import math
from typing import Protocol

EARTH_RADIUS_KM = 6371.0088  # the mean radius (IUGG)


class Point(Protocol):
    """A position in degrees (the planner's GeoPoint, the contract's GeoPoint)."""

    @property
    def latitude(self) -> float: ...

    @property
    def longitude(self) -> float: ...


def haversine_km(a: Point, b: Point) -> float:
    """Great-circle distance between two points, in kilometres."""
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlat = lat2 - lat1
    dlon = math.radians(b.longitude - a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
