"""Domain metrics of the reservation service (``omni_reservation_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from omnistock.metrics import LATENCY_BUCKETS

RESERVE_OUTCOMES = Counter(
    "omni_reservation_reserve_total",
    "Reserve calls by outcome: ok, replayed, insufficient, invalid, conflict.",
    ["outcome"],
)
RESERVED_UNITS = Counter(
    "omni_reservation_reserved_units_total",
    "Units newly held by Reserve.",
)
ACTIVE_HOLDS = Gauge(
    "omni_reservation_active_holds",
    "Reservations with at least one active line (refreshed by the expiry sweeper).",
)
HELD_UNITS = Gauge(
    "omni_reservation_held_units",
    "Units held by active reservations (refreshed by the expiry sweeper).",
)
ENDED_LINES = Counter(
    "omni_reservation_lines_ended_total",
    "Reservation lines that ended, by how: released, expired, consumed, short.",
    ["status"],
)
EXPIRED_HOLDS = Counter(
    "omni_reservation_expired_total",
    "Cart holds released by the expiry sweeper.",
)
SHORT_LINES = Counter(
    "omni_reservation_short_lines_total",
    "Lines marked short because on-hand fell below what was held, by trigger "
    "(loss: damage or count; overdue: a departure never consumed; resync).",
    ["trigger"],
)
# Every trigger is exported from the start, at 0, so that the first short line
# is seen by increase() and rate() instead of creating its series.
for _trigger in ("loss", "overdue", "resync"):
    SHORT_LINES.labels(_trigger)

PROJECTION_RESYNCS = Counter(
    "omni_reservation_projection_resyncs_total",
    "Times a gap in the ledger's balance versions made the projection resync from the ledger.",
)
MOVEMENT_TO_AVAILABILITY = Histogram(
    "omni_reservation_movement_to_availability_seconds",
    "Time from the ledger recording a movement to the availability change it causes "
    "being committed here.",
    buckets=LATENCY_BUCKETS,
)
WATCH_SUBSCRIBERS = Gauge(
    "omni_reservation_watch_subscribers",
    "Open WatchAvailability streams on this replica.",
)
WATCH_UPDATES = Counter(
    "omni_reservation_watch_updates_total",
    "Figures for watchers by outcome: sent, coalesced (replaced an unsent one), "
    "stale (older than one already sent).",
    ["outcome"],
)
WATCH_DROPPED = Counter(
    "omni_reservation_watch_dropped_subscribers_total",
    "Watchers told to resubscribe because they fell too far behind.",
)
