"""Domain metrics of the fulfilment service (``omni_fulfilment_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TASKS_CREATED = Counter(
    "omni_fulfilment_tasks_created_total",
    "Fulfilment tasks created from routed orders, by kind.",
    ["kind"],
)
STEPS = Counter(
    "omni_fulfilment_steps_total",
    "Steps staff took on tasks (accept, reject, pick, pack, ship, receive, ready, collect, "
    "cancel), counted once per request id.",
    ["step"],
)
SHORT_PICKED_UNITS = Counter(
    "omni_fulfilment_short_picked_units_total",
    "Units a location could not find when picking; routing sources them elsewhere.",
)
WRONG_PICKUP_CODES = Counter(
    "omni_fulfilment_wrong_pickup_codes_total",
    "Collections refused because the pickup code did not match.",
)
EXPIRED = Counter(
    "omni_fulfilment_expired_total",
    "Tasks ended by the expiry sweeper, by cause: not_accepted (rerouted) or "
    "not_collected (pickup released).",
    ["cause"],
)
# Every cause is exported from the start, at 0, so that the first expiry is
# seen by increase() and rate() instead of creating its series.
for _cause in ("not_accepted", "not_collected"):
    EXPIRED.labels(_cause)

OPEN_TASKS = Gauge(
    "omni_fulfilment_open_tasks",
    "Tasks not yet ended, by kind and status (refreshed by the gauge sweeper).",
    ["kind", "status"],
)
OLDEST_OPEN_TASK_AGE = Gauge(
    "omni_fulfilment_oldest_unaccepted_task_age_seconds",
    "Age of the oldest task still waiting to be accepted, by kind (0 when none).",
    ["kind"],
)
